"""The read-through path: the one owner of "give me this narinfo / this NAR".

Every consumer (the HTTP routes, prefetch, and other agents through the peer listener) calls
`narinfo(hash)` or `open_nar(file)`. The answer comes from, in order:
  1. the local store (committed entries);
  2. a transfer already in flight (any number of askers share one download);
  3. the remote sources, in their configured order (peers, then upstreams).
Every byte from a remote source is verified (narinfo signature; FileSize, FileHash, NarSize,
NarHash) before it is committed to the store or completes any client's stream.

One hop: a request another agent forwarded to this one (`forwarded=True`, the peer listener's)
is answered from the store and the sources that do not relay it (`Source.relays`) only, and
joins only narinfo fetches that relay nothing: otherwise two agents whose views of the cluster
differ could each wait on the other's fetch. A NAR transfer it starts asks its source with
`relay=False`; it may join a transfer in flight (which does not wait on it).

`open_nar` returns a NarHandle: a committed file or a live transfer, which holds the file's
in-use mark (eviction and scrub skip it) and records the access while it is open.
"""

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from agent import metrics
from agent.nix.narinfo import NarInfo
from agent.nix.signing import PublicKey, SecretKey, add_signature, signature_problem, verified_by
from agent.store.index import NarInfoRow, NarRow
from agent.store.recompress import in_encoding
from agent.store.store import Store
from agent.store.transfer import NarOpener, Span, StoreFull, Transfer, passthrough
from agent.upstream.client import CircuitBreaker, UpstreamError

log = logging.getLogger(__name__)
NEGATIVE_ENTRIES = 100_000
NOT_FOUND = "not found in any upstream"


class Source(Protocol):
    """A binary cache the read-through path asks on a miss (an upstream, or the peers).

    `get_narinfo` returns the narinfo of the path, or None when the source does not have it;
    both it and `nar` raise UpstreamError when the source cannot answer or answers something
    else (never "not found"). `relays(hash)`: whether asking it for that path may make another
    agent fetch it (the peers); `nar(url, relay=False)` must not. `rejected(url, reason)` is
    told when what it sent for a narinfo or NAR URL failed verification, and returns a narinfo
    hash to look up again (from the other sources), if any."""

    name: str    # in logs
    url: str     # identity: recorded with a NAR not yet fetched, to fetch it from there
    kind: str    # metric label of what it served: "upstream" or "peer"
    throughput: float  # measured bytes/s, 0 until known
    breaker: CircuitBreaker
    # Whether clients may read a NAR from it before the whole file is verified (the newest
    # chunk is held back either way); a peer's bytes reach clients only verified.
    stream_unverified: bool

    async def get_narinfo(self, hash_part: str) -> NarInfo | None: ...
    def nar(self, url: str, *,
            relay: bool = True) -> AbstractAsyncContextManager[AsyncIterator[bytes]]: ...
    def relays(self, hash_part: str) -> bool: ...
    def rejected(self, url: str, reason: str) -> str | None: ...


class Unavailable(Exception):
    """No source could answer (errors, not "not found"): clients get 503, never 404."""


class UnknownNar(Exception):
    """A NAR file no narinfo of this store names."""


class Lookup:
    __slots__ = ("reason", "row", "source")

    def __init__(self, row: NarInfoRow | None, source: str, reason: str = NOT_FOUND) -> None:
        self.row = row
        self.source = source  # local | coalesced | upstream, peer (a Source's kind) | not_found
        self.reason = reason  # why row is None, for people ("signed by an untrusted key: ...")


class ReadThrough:
    def __init__(self, store: Store, sources: list[Source], keys: list[PublicKey], *,
                 require_signatures: bool = True, signing_key: SecretKey | None = None,
                 negative_ttl: float = 30.0, recompress_level: int = 3,
                 upstream_downloads: int = 16,
                 on_committed: Callable[[str], None] = lambda file: None) -> None:
        self.store = store
        self.sources = sources
        self.keys = keys
        self.require_signatures = require_signatures
        self.signing_key = signing_key
        self.negative_ttl = negative_ttl
        self.recompress_level = recompress_level
        self._on_committed = on_committed
        self._negative: dict[str, tuple[float, str]] = {}  # hash -> (until, reason)
        # (hash, whether the fetch relays to another agent) -> the fetch in flight
        self._narinfo_inflight: dict[tuple[str, bool], asyncio.Future[Lookup]] = {}
        self._transfers: dict[str, Transfer] = {}
        # Turns for NAR downloads from upstreams: each holds a decoder (its window is most of
        # the agent's memory under load). Peer downloads take none: they may wait on another
        # agent, whose own downloads could be waiting for a turn here.
        self._upstream_turns = asyncio.Semaphore(upstream_downloads)
        # As many turns for uncached streams (a full disk, a NAR evicted under a client): each
        # holds a decoder too. Turns of their own: a stream lasts as long as its client reads,
        # and a slow client must not hold up the store's downloads.
        self._stream_turns = asyncio.Semaphore(upstream_downloads)
        self._in_use: Counter[str] = Counter()

    def _count(self, kind: str, source: str) -> None:
        metrics.LOOKUPS.labels(kind, source).inc()

    # --- narinfo ---------------------------------------------------------------------------

    def local_narinfo(self, hash_part: str) -> NarInfoRow | None:
        """The narinfo this store holds for a hash part, counted as a local hit; None when the
        answer needs another source (the HTTP fast path's question: serve/fastpath.py)."""
        row = self.store.narinfo_row(hash_part)
        if row is not None:
            self.store.touch_narinfo(hash_part)
            self._count("narinfo", "local")
        return row

    async def narinfo(self, hash_part: str, forwarded: bool = False) -> Lookup:
        """The narinfo for a hash part; Lookup.row is None when no source has it. Raises
        Unavailable when a source that might have it could not answer. `forwarded`: another
        agent asks (never relayed further)."""
        row = self.local_narinfo(hash_part)
        if row is not None:
            return Lookup(row, "local")
        until, reason = self._negative.get(hash_part, (0.0, NOT_FOUND))
        if until > time.monotonic():
            self._count("narinfo", "not_found")
            return Lookup(None, "not_found", reason)
        try:
            found = await self._coalesced_narinfo(hash_part, forwarded)
        except Unavailable:
            self._count("narinfo", "error")
            raise
        self._count("narinfo", found.source)
        return found

    async def _coalesced_narinfo(self, hash_part: str, forwarded: bool) -> Lookup:
        inflight = self._narinfo_inflight.get((hash_part, False))
        if inflight is None and not forwarded:
            inflight = self._narinfo_inflight.get((hash_part, True))
        if inflight is not None:
            metrics.COALESCED_WAITERS.inc()
            try:
                found = await asyncio.shield(inflight)
                return Lookup(found.row, "coalesced", found.reason)
            finally:
                metrics.COALESCED_WAITERS.dec()
        sources = [s for s in self.sources if not (forwarded and s.relays(hash_part))]
        key = (hash_part, any(s.relays(hash_part) for s in sources))
        task = asyncio.ensure_future(self._fetch_narinfo(hash_part, sources))
        self._narinfo_inflight[key] = task
        task.add_done_callback(lambda _: self._narinfo_inflight.pop(key, None))
        return await asyncio.shield(task)

    async def _fetch_narinfo(self, hash_part: str, sources: list[Source]) -> Lookup:
        errors: list[UpstreamError] = []
        reason = NOT_FOUND
        for source in sources:
            try:
                info = await source.get_narinfo(hash_part)
            except UpstreamError as e:
                errors.append(e)
                continue
            if info is None:
                continue
            problem = self._signature_problem(info)
            if problem is not None:  # the path is not available from here: a miss, with why
                reason = _rejected(source, info, problem)
                source.rejected(f"{hash_part}.narinfo", "signature")
                continue
            log.info("narinfo fetched", extra={"fields": {
                "source": source.name, "store_path": info.store_path.path(),
                "nar_size": info.nar_size}})
            if self.signing_key:
                info = add_signature(info, self.signing_key)
            return Lookup(self.store.remember(info, source.url), source.kind)
        if errors:
            raise Unavailable("; ".join(str(e) for e in errors))
        self._remember_missing(hash_part, reason)
        return Lookup(None, "not_found", reason)

    def _remember_missing(self, hash_part: str, reason: str) -> None:
        now = time.monotonic()
        self._negative[hash_part] = (now + self.negative_ttl, reason)
        if len(self._negative) > NEGATIVE_ENTRIES:
            self._negative = {h: v for h, v in self._negative.items() if v[0] > now}

    def _signature_problem(self, info: NarInfo) -> str | None:
        """None when the narinfo is signed by a trusted key (or signatures are not required)."""
        if not self.require_signatures or verified_by(info, self.keys) is not None:
            return None
        return signature_problem(info, self.keys)

    async def listing(self, hash_part: str) -> bytes | None:
        """The `.ls` listing of a store path this store holds (never fetched: a client that
        gets none reads the NAR instead)."""
        return await self.store.run_io(self.store.read_listing, hash_part)

    # --- NAR -------------------------------------------------------------------------------

    def open_nar(self, file: str, forwarded: bool = False) -> "NarHandle":
        """A committed NAR or the transfer that is fetching it (started if needed), to be used
        at once as `async with`. Raises UnknownNar when no narinfo names the file,
        Unavailable when its source is gone. `forwarded`: another agent asks."""
        # One read of the row: a transfer's commit lands from a worker thread at any moment,
        # so a second read could find it committed when the first did not.
        row = self.store.nar_row(file)
        if row is not None and row.committed:
            if self.store.nar_present(file):
                return self._local_handle(row)
            self.store.lose_nar(file)  # deleted behind our back: a miss from now on
            row = None
        if row is None:
            return self._stream_again(file, forwarded)
        try:
            transfer, joined = self._transfer(row, forwarded)
        except Unavailable:
            self._count("nar", "error")
            raise
        kind = self._source(row).kind
        return NarHandle(self, row, "coalesced" if joined else kind, transfer, kind)

    def local_nar(self, file: str) -> "NarHandle | None":
        """A committed NAR this store holds, as open_nar gives it; None when the answer needs
        more (a transfer, a source: the HTTP fast path's question, which opens the file and
        leaves a lost one to open_nar; a handle counts once it is held, so that one is
        counted once, there)."""
        row = self.store.nar_row(file)
        if row is None or not row.committed:
            return None
        return self._local_handle(row)

    def _local_handle(self, row: NarRow) -> "NarHandle":
        return NarHandle(self, row, "local", None, "local")

    async def fetch_nar(self, file: str) -> int:
        """Make a NAR present (prefetch); returns the bytes fetched from a source (0 if it was
        local or another asker's download brought it)."""
        row = self.store.nar_row(file)
        if row is None and self.store.uncached_nar(file) is not None:
            raise StoreFull("not stored: the store's disk is full")
        if row is None:
            raise UnknownNar(file)
        if row.committed and self.store.nar_present(file):
            return 0
        if row.committed:
            self.store.lose_nar(file)
            raise Unavailable("the NAR file was missing: its paths are fetched again next time")
        transfer, joined = self._transfer(row)
        received = await transfer.wait()
        return 0 if joined else received

    def _stream_again(self, file: str, forwarded: bool) -> "NarHandle":
        """A NAR the store no longer holds (evicted or lost after a client read its narinfo,
        or never stored on a full disk): streamed from its source, verified, not cached. The
        original of a re-encoded NAR is re-encoded on the way; if that does not give the
        same bytes, verification fails the transfer and the Nix client tries its next
        substituter. Without a source: UnknownNar (404), which Nix also falls through."""
        row = self.store.uncached_nar(file)
        source = self._find_source(row) if row is not None else None
        if row is None or source is None:
            self._count("nar", "not_found")
            raise UnknownNar(file)
        metrics.NAR_REFETCHES.inc()
        url = row.source_url or ""
        opener = in_encoding(lambda: source.nar(url, relay=not forwarded), row.compression,
                             self.recompress_level, self.store.run_io)
        return NarHandle(self, row, source.kind, None, source.kind, opener)

    def _find_source(self, row: NarRow) -> Source | None:
        if row.source_url is None:
            return None
        return next((s for s in self.sources if s.url == row.source), None)

    def _source(self, row: NarRow) -> Source:
        source = self._find_source(row)
        if source is None:
            raise Unavailable(f"no configured source serves {row.file}")
        return source

    def _transfer(self, row: NarRow, forwarded: bool = False) -> tuple[Transfer, bool]:
        """The download of this NAR in flight, started if needed: (transfer, joined)."""
        running = self._transfers.get(row.file)
        if running is not None and not running.done:  # a finished one failed: not committed
            return running, True
        source, url = self._source(row), row.source_url or ""

        async def refused(reason: str) -> None:
            again = source.rejected(url, reason)
            if again:  # look it up elsewhere before the clients, who got nothing, retry
                with contextlib.suppress(Exception):
                    await self.narinfo(again, forwarded)

        transfer = Transfer(self.store, row.file, row.expected(),
                            lambda: source.nar(url, relay=not forwarded), source.name,
                            self._on_committed, verified_only=not source.stream_unverified,
                            on_rejected=refused,
                            turn=self._upstream_turns if source.kind == "upstream" else None,
                            stream_turn=self._stream_turns)
        self._transfers[row.file] = transfer
        transfer.task.add_done_callback(lambda _: self._transfers.pop(row.file, None))
        return transfer, False

    # --- what is in use --------------------------------------------------------------------

    def busy(self) -> set[str]:
        """NAR files being sent or written right now: eviction and scrub leave them alone."""
        return set(self._in_use) | set(self._transfers)

    def _acquire(self, file: str) -> None:
        self._in_use[file] += 1

    def _release(self, file: str, served: int, source: str, kind: str) -> None:
        self._in_use[file] -= 1
        if self._in_use[file] <= 0:
            del self._in_use[file]
        metrics.SERVED_BYTES.labels(kind).inc(served)
        if source in ("local", "coalesced"):
            self.count_savings(served)

    def count_savings(self, nbytes: int) -> None:
        """What the cache saved: upstream bytes, and the seconds they would have taken."""
        if nbytes <= 0:
            return
        metrics.BYTES_AVOIDED.inc(nbytes)
        rate = max((s.throughput for s in self.sources), default=0.0)
        if rate > 0:  # only once a real upstream rate has been measured
            metrics.SECONDS_AVOIDED.inc(nbytes / rate)

    async def aclose(self) -> None:
        """Stop every download in flight (the agent is stopping)."""
        transfers = list(self._transfers.values())
        for t in transfers:
            t.task.cancel()
        await asyncio.gather(*(t.task for t in transfers), return_exceptions=True)


class NarHandle:
    """One consumer's hold on a NAR: a committed file (`path`) or a live transfer (`chunks`).
    While open it keeps the file in use; it records the access and the bytes served."""

    def __init__(self, owner: ReadThrough, row: NarRow, source: str,
                 transfer: Transfer | None, kind: str,
                 uncached: NarOpener | None = None) -> None:
        self._owner = owner
        self.row = row
        self.source = source  # the lookup's: local, coalesced or the source's kind
        self.kind = kind      # where the bytes come from: local or the source's kind
        self.transfer = transfer
        self._uncached = uncached  # streamed from the source, not stored
        self.served = 0  # body bytes the consumer sent on

    @property
    def size(self) -> int | None:
        return self.row.file_size

    @property
    def committed(self) -> bool:
        """The NAR is a file of the store (not a transfer or a stream)."""
        return self.transfer is None and self._uncached is None

    def open(self) -> tuple[int, int]:
        """(a descriptor of the committed file, which the caller closes, its size); OSError
        when the file is gone. Opened in the event loop, as nginx does: the store's directories
        are few and hot, and a thread hand-off per request cost more CPU than the open."""
        return self._owner.store.open_nar(self.row.file)

    def pieces(self) -> AsyncIterator[Span | bytes]:
        """A live transfer (or an uncached stream) as it arrives and is verified: spans of
        its file, to send from there, or bytes."""
        if self._uncached is not None:
            return passthrough(self._owner.store, self.row.expected(), self._uncached,
                               turn=self._owner._stream_turns)
        assert self.transfer is not None
        return self.transfer.pieces()

    def acquire(self) -> None:
        """Hold the NAR (as `async with`) until `release`; the lookup counts from here."""
        self._owner._count("nar", self.source)
        self._owner._acquire(self.row.file)
        if self.transfer is None and self._uncached is None:
            self._owner.store.touch_nar(self.row.file)
        if self.source == "coalesced":
            metrics.COALESCED_WAITERS.inc()

    def release(self) -> None:
        if self.source == "coalesced":
            metrics.COALESCED_WAITERS.dec()
        self._owner._release(self.row.file, self.served, self.source, self.kind)

    async def __aenter__(self) -> "NarHandle":
        self.acquire()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()


def _rejected(source: Source, info: NarInfo, problem: str) -> str:
    """Count and log a narinfo refused for its signature; the reason a client is given."""
    metrics.VERIFY_FAILURES.labels("signature").inc()
    log.warning("narinfo rejected", extra={"fields": {
        "source": source.name, "store_path": info.store_path.path(), "reason": "signature",
        "error": problem}})
    return problem
