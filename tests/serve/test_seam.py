"""The read-through path in-process, with its remote sources faked behind the Source interface.

The real store on a real filesystem, real verification; only the sources are in memory, so
ordering, coalescing, verification and in-use marks can be checked exactly.
"""

import asyncio
import hashlib
import lzma
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from agent.nix.hashes import Hash
from agent.nix.nar import build as build_nar
from agent.nix.narinfo import NarInfo
from agent.nix.signing import SecretKey, add_signature
from agent.nix.storepath import StorePath
from agent.readthrough import NarHandle, ReadThrough, Unavailable, UnknownNar
from agent.store.index import NarRow
from agent.store.store import Store
from agent.upstream.client import CircuitBreaker, UpstreamError

KEY = SecretKey.generate("seam-test-1")


def _entry(char: str, content: bytes, refs: tuple[str, ...] = ()) -> tuple[NarInfo, bytes]:
    """A signed narinfo and its xz file for a one-file store path."""
    nar = build_nar(content)
    packed = lzma.compress(nar)
    info = NarInfo(
        store_path=StorePath(char * 32, f"p-{char}"), url=f"nar/{char}.nar.xz",
        compression="xz", nar_hash=Hash("sha256", hashlib.sha256(nar).digest()),
        nar_size=len(nar), file_hash=Hash("sha256", hashlib.sha256(packed).digest()),
        file_size=len(packed), references=tuple(StorePath(r * 32, f"p-{r}") for r in refs))
    return add_signature(info, KEY), packed


class FakeSource:
    """A binary cache in memory that counts what it is asked and can fail on purpose. With
    `relays`, it stands for the peers: asking it makes another agent fetch, and its NAR bytes
    reach clients only verified."""

    throughput = 0.0

    def __init__(self, name: str, entries: dict[str, tuple[NarInfo, bytes]] | None = None, *,
                 error: bool = False, gate: asyncio.Event | None = None,
                 relays: bool = False) -> None:
        self.name, self.url = name, f"fake://{name}/"
        self.entries = entries or {}
        self.error = error
        self.gate = gate  # NAR bytes wait for it: lets a test pile up concurrent askers
        self.breaker = CircuitBreaker(name, 3, 30)
        self.narinfo_calls: list[str] = []
        self.nar_calls: list[tuple[str, bool]] = []  # (url, relay)
        self.refusals: list[tuple[str, str]] = []
        self.tamper = False
        self._relays = relays
        self.kind = "peer" if relays else "upstream"
        self.stream_unverified = not relays

    def relays(self, hash_part: str) -> bool:
        return self._relays

    def rejected(self, url: str, reason: str) -> str | None:
        self.refusals.append((url, reason))
        hash_part = next((h for h, (info, _) in self.entries.items() if info.url == url), None)
        self.entries.pop(hash_part or "", None)  # like a peer's open circuit: not asked again
        return hash_part if self._relays else None

    async def get_narinfo(self, hash_part: str) -> NarInfo | None:
        self.narinfo_calls.append(hash_part)
        await asyncio.sleep(0.01)  # a round trip: concurrent askers overlap
        if self.error:
            raise UpstreamError(self.name, "http_503", "HTTP 503")
        entry = self.entries.get(hash_part)
        return entry[0] if entry else None

    @asynccontextmanager
    async def nar(self, url: str, *, relay: bool = True) -> AsyncIterator[AsyncIterator[bytes]]:
        self.nar_calls.append((url, relay))
        data = next(packed for info, packed in self.entries.values() if info.url == url)
        if self.tamper:
            data = data[:-10] + bytes(b ^ 1 for b in data[-10:])

        async def chunks() -> AsyncIterator[bytes]:
            if self.gate:
                await self.gate.wait()
            for i in range(0, len(data), 1000):
                yield data[i:i + 1000]
        yield chunks()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = Store(tmp_path / "store")
    yield s
    s.close()


def _readthrough(store: Store, *sources: FakeSource, **kw: object) -> ReadThrough:
    return ReadThrough(store, list(sources), [KEY.public()], **kw)  # type: ignore[arg-type]


async def _chunks(nar: NarHandle) -> AsyncIterator[bytes]:
    """A live NAR's bytes as a client receives them: spans are read from the transfer's file."""
    async for piece in nar.pieces():
        yield piece if isinstance(piece, bytes) else os.pread(piece.fd, piece.count, piece.offset)


async def _read_all(rt: ReadThrough, file: str) -> bytes:
    async with rt.open_nar(file) as nar:
        if nar.committed:
            fd, size = nar.open()
            try:
                return os.pread(fd, size, 0)
            finally:
                os.close(fd)
        return b"".join([c async for c in _chunks(nar)])


async def test_sources_are_asked_in_order_and_errors_fall_through(store: Store) -> None:
    info, packed = _entry("a", b"hello")
    broken = FakeSource("broken", error=True)
    empty = FakeSource("empty")
    full = FakeSource("full", {"a" * 32: (info, packed)})
    rt = _readthrough(store, broken, empty, full)
    found = await rt.narinfo("a" * 32)
    assert found.source == "upstream" and found.row is not None
    assert broken.narinfo_calls == empty.narinfo_calls == full.narinfo_calls == ["a" * 32]
    assert f"StorePath: {info.store_path}" in found.row.text
    assert (await rt.narinfo("a" * 32)).source == "local"  # recorded: no second ask
    assert len(full.narinfo_calls) == 1


async def test_an_error_is_unavailable_not_a_miss(store: Store) -> None:
    rt = _readthrough(store, FakeSource("empty"), FakeSource("broken", error=True))
    with pytest.raises(Unavailable):
        await rt.narinfo("b" * 32)


async def test_a_miss_everywhere_is_remembered_for_the_negative_ttl(store: Store) -> None:
    empty = FakeSource("empty")
    rt = _readthrough(store, empty, negative_ttl=60.0)
    assert (await rt.narinfo("c" * 32)).row is None
    assert (await rt.narinfo("c" * 32)).source == "not_found"
    assert empty.narinfo_calls == ["c" * 32]


async def test_concurrent_askers_share_one_narinfo_and_one_nar_fetch(store: Store) -> None:
    info, packed = _entry("d", b"shared" * 50_000)
    gate = asyncio.Event()
    source = FakeSource("up", {"d" * 32: (info, packed)}, gate=gate)
    rt = _readthrough(store, source)
    lookups = await asyncio.gather(*(rt.narinfo("d" * 32) for _ in range(20)))
    assert len(source.narinfo_calls) == 1
    assert sorted({x.source for x in lookups}) == ["coalesced", "upstream"]
    file = lookups[0].row.nar_file
    readers = [asyncio.create_task(_read_all(rt, file)) for _ in range(20)]
    await asyncio.sleep(0.05)
    assert file in rt.busy()  # being written and read: never evicted meanwhile
    gate.set()
    bodies = await asyncio.gather(*readers)
    assert source.nar_calls == [(info.url, True)]
    assert set(bodies) == {packed}
    assert rt.busy() == set()
    assert store.nar_row(file).committed


async def test_tampered_bytes_are_never_completed_nor_committed(store: Store) -> None:
    info, packed = _entry("h", b"precious" * 10_000)
    source = FakeSource("up", {"h" * 32: (info, packed)})
    source.tamper = True
    rt = _readthrough(store, source)
    file = (await rt.narinfo("h" * 32)).row.nar_file
    received = bytearray()
    with pytest.raises(Exception, match=r"FileHash|corrupt"):
        async with rt.open_nar(file) as nar:
            async for chunk in _chunks(nar):
                received += chunk
    assert bytes(received) != packed and len(received) < len(packed)  # never the whole file
    assert store.nar_row(file) is None  # the pending entry is dropped: the next ask refetches
    assert not any(store.layout.nar_dir.iterdir())


async def test_an_unsigned_narinfo_is_refused(store: Store) -> None:
    info, packed = _entry("f", b"x")
    source = FakeSource("up", {"f" * 32: (info.with_sigs(()), packed)})
    rt = _readthrough(store, source)
    found = await rt.narinfo("f" * 32)
    assert found.row is None and found.reason == "not signed"


async def test_a_miss_says_which_untrusted_keys_signed_it_even_from_the_negative_cache(
        store: Store) -> None:
    info, packed = _entry("e", b"x")
    other = add_signature(info.with_sigs(()), SecretKey.generate("elsewhere-1"))
    source = FakeSource("up", {"e" * 32: (other, packed)})
    rt = _readthrough(store, FakeSource("empty"), source, negative_ttl=60.0)
    for _ in range(2):
        found = await rt.narinfo("e" * 32)
        assert found.row is None and found.reason == "signed by an untrusted key: elsewhere-1"
    assert source.narinfo_calls == ["e" * 32]


async def test_a_commit_landing_during_a_lookup_neither_loses_the_nar_nor_fetches_it_again(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A transfer commits from a worker thread while the event loop reads the index: a lookup
    that saw the row before the commit and the file after it must still get the one NAR."""
    info, packed = _entry("h", b"z" * 50_000)
    source = FakeSource("up", {"h" * 32: (info, packed)})
    rt = _readthrough(store, source)
    file = (await rt.narinfo("h" * 32)).row.nar_file
    held: list[tuple[Callable[..., object], tuple[object, ...], asyncio.Future[object]]] = []
    run_io, nar_row = store.run_io, store.nar_row

    def hold_the_commit(fn: Callable[..., object], *args: object) -> Awaitable[object]:
        if getattr(fn, "__name__", "") != "_commit":
            return run_io(fn, *args)
        held.append((fn, args, asyncio.get_running_loop().create_future()))
        return held[-1][2]

    def commit_lands_after_the_read(f: str) -> NarRow | None:
        row = nar_row(f)
        if held:
            fn, args, done = held.pop()
            done.set_result(fn(*args))
        return row

    monkeypatch.setattr(store, "run_io", hold_the_commit)
    first = asyncio.create_task(_read_all(rt, file))
    async with asyncio.timeout(10):
        while not held:  # everything verified; the commit is with the "thread"
            await asyncio.sleep(0.01)
    monkeypatch.setattr(store, "nar_row", commit_lands_after_the_read)
    assert await _read_all(rt, file) == packed
    assert await first == packed
    assert source.nar_calls == [(info.url, True)]  # one download, nothing lost
    assert store.nar_present(file) and nar_row(file).committed


async def test_upstream_downloads_wait_for_a_turn_and_peer_downloads_take_none(
        store: Store) -> None:
    gate = asyncio.Event()
    entries = {c * 32: _entry(c, c.encode() * 20_000) for c in "jklmn"}
    upstream = FakeSource("up", dict(entries), gate=gate)
    peers = FakeSource("peers", dict(entries), gate=gate, relays=True)
    for sources, asked in (([upstream], upstream), ([peers], peers)):
        rt = _readthrough(Store(store.layout.root.parent / asked.name), *sources,
                          upstream_downloads=2)
        files = [(await rt.narinfo(h)).row.nar_file for h in entries]
        readers = [asyncio.create_task(_read_all(rt, f)) for f in files]
        await asyncio.sleep(0.1)
        # two open at the upstream, the others wait (no temporary file yet); peers: all five
        assert len(asked.nar_calls) == (2 if asked is upstream else 5)
        assert REGISTRY.get_sample_value(
            "flox_node_cache_upstream_downloads_waiting") == (3 if asked is upstream else 0)
        assert rt.busy() == set(files)  # waiting downloads are in flight all the same
        gate.set()
        assert await asyncio.gather(*readers) == [packed for _, packed in entries.values()]
        assert len(asked.nar_calls) == 5
        assert REGISTRY.get_sample_value("flox_node_cache_upstream_downloads_waiting") == 0
        gate.clear()
        rt.store.close()


async def test_uncached_streams_wait_for_turns_of_their_own(store: Store) -> None:
    """NARs evicted after clients read their narinfos are streamed again, uncached, each with
    a decoder: at most --upstream-downloads at once, on turns that the store's downloads do
    not share, so streams held open by slow clients never hold up a download."""
    entries = {c * 32: _entry(c, c.encode() * 20_000) for c in "pqrs"}
    up = FakeSource("up", dict(entries))
    rt = _readthrough(store, up, upstream_downloads=2)
    files = [(await rt.narinfo(h)).row.nar_file for h in entries]
    evicted, stored = files[:3], files[3]
    for file in evicted:
        await rt.fetch_nar(file)
        store.remove_nar(file)
    up.gate = asyncio.Event()
    asked = len(up.nar_calls)
    streams = [asyncio.create_task(_read_all(rt, f)) for f in evicted]
    await asyncio.sleep(0.1)
    assert len(up.nar_calls) == asked + 2  # two streams open at the source, one waits
    assert REGISTRY.get_sample_value("flox_node_cache_upstream_downloads_waiting") == 1
    download = asyncio.create_task(rt.fetch_nar(stored))
    await asyncio.sleep(0.1)
    assert len(up.nar_calls) == asked + 3  # the download did not wait for the streams
    up.gate.set()
    packed = [p for _, p in entries.values()]
    assert await asyncio.gather(*streams) == packed[:3]
    assert await download == len(packed[3])
    assert len(up.nar_calls) == asked + 4
    assert REGISTRY.get_sample_value("flox_node_cache_upstream_downloads_waiting") == 0
    assert all(store.nar_row(f) is None for f in evicted)  # streamed, not cached


async def test_a_committed_nar_is_in_use_while_its_handle_is_open(store: Store) -> None:
    info, packed = _entry("g", b"y" * 1000)
    rt = _readthrough(store, FakeSource("up", {"g" * 32: (info, packed)}))
    file = (await rt.narinfo("g" * 32)).row.nar_file
    assert await rt.fetch_nar(file) == len(packed)
    assert await rt.fetch_nar(file) == 0  # present now
    async with rt.open_nar(file) as nar:
        assert nar.source == "local" and nar.committed
        assert rt.busy() == {file}
    assert rt.busy() == set()
    with pytest.raises(UnknownNar):
        rt.open_nar("nar/" + "0" * 52 + ".nar.xz")


async def test_a_forwarded_request_is_never_relayed_nor_joins_a_fetch_that_relays(
        store: Store) -> None:
    entries = {c * 32: _entry(c, c.encode()) for c in "jk"}
    peers = FakeSource("peers", entries, relays=True)
    up = FakeSource("up", entries)
    rt = _readthrough(store, peers, up)
    # A local client's fetch asks the peers; a forwarded request meanwhile does not join it
    # (that fetch may wait on the agent that forwarded) and goes to the upstream.
    local = asyncio.create_task(rt.narinfo("j" * 32))
    await asyncio.sleep(0)
    forwarded = await rt.narinfo("j" * 32, forwarded=True)
    assert (await local).source == "peer" and forwarded.source == "upstream"
    assert peers.narinfo_calls == ["j" * 32] and up.narinfo_calls == ["j" * 32]
    # A forwarded request's fetch relays nothing, so a local client may join it.
    forwarded_task = asyncio.create_task(rt.narinfo("k" * 32, forwarded=True))
    await asyncio.sleep(0)
    assert (await rt.narinfo("k" * 32)).source == "coalesced"
    assert (await forwarded_task).source == "upstream"
    assert peers.narinfo_calls == ["j" * 32] and up.narinfo_calls == ["j" * 32, "k" * 32]


async def test_a_nar_from_the_peers_is_fetched_without_relaying_for_a_forwarded_request(
        store: Store) -> None:
    info, packed = _entry("m", b"m" * 1000)
    peers = FakeSource("peers", {"m" * 32: (info, packed)}, relays=True)
    rt = _readthrough(store, peers)
    file = (await rt.narinfo("m" * 32)).row.nar_file
    async with rt.open_nar(file, forwarded=True) as nar:
        assert nar.source == "peer"
        assert b"".join([c async for c in _chunks(nar)]) == packed
    assert peers.nar_calls == [(info.url, False)]


async def test_bytes_of_a_source_not_trusted_to_stream_reach_nobody_until_verified(
        store: Store) -> None:
    noise = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(2000))
    info, packed = _entry("n", noise)  # incompressible: many chunks
    assert len(packed) > 10_000
    peers = FakeSource("peers", {"n" * 32: (info, packed)}, relays=True)
    peers.tamper = True
    up = FakeSource("up", {"n" * 32: (info, packed)})
    rt = _readthrough(store, peers, up)
    found = await rt.narinfo("n" * 32)
    assert found.source == "peer"
    received = bytearray()
    with pytest.raises(Exception, match=r"FileHash|corrupt"):
        async with rt.open_nar(found.row.nar_file) as nar:
            async for chunk in _chunks(nar):
                received += chunk
    assert received == b""  # a peer's bytes are held back whole, not just the last chunk
    assert [url for url, _ in peers.refusals] == [info.url]
    # The refusal looked the path up again before the client was told: the upstream has it.
    assert up.narinfo_calls == ["n" * 32]
    assert await _read_all(rt, found.row.nar_file) == packed
    assert up.nar_calls == [(info.url, True)]
