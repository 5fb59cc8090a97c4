"""The store facade on its own: one copy per NAR, and correct file fields when deduplicating."""

import asyncio
import hashlib
import lzma
from pathlib import Path

from agent.nix.hashes import Hash
from agent.nix.narinfo import NarInfo
from agent.nix.narinfo import parse as parse_narinfo
from agent.nix.storepath import StorePath
from agent.store.index import NarInfoRow
from agent.store.store import Store
from tests.store.conftest import commit, held_by_a_worker


def _info(hash_char: str, nar: bytes) -> NarInfo:
    """An upstream narinfo without FileHash/FileSize (they are optional)."""
    return NarInfo(store_path=StorePath(hash_char * 32, f"p-{hash_char}"),
                   url=f"nar/{hash_char}.nar.xz", compression="xz",
                   nar_hash=Hash("sha256", hashlib.sha256(nar).digest()), nar_size=len(nar))


NAR = b"nix-archive-1 pretend" * 100
PACKED = lzma.compress(NAR)


def _fetched(store: Store, hash_char: str, listing: bytes | None = None) -> NarInfoRow:
    """The narinfo of a path whose (xz) NAR was fetched and committed, as a Transfer does."""
    return commit(store, _info(hash_char, NAR), PACKED, listing)


def test_a_second_narinfo_for_a_committed_nar_gets_its_real_file_fields(tmp_path: Path) -> None:
    nar, packed = NAR, PACKED
    store = Store(tmp_path / "store")
    first = _fetched(store, "a")
    file_hash = Hash("sha256", hashlib.sha256(packed).digest())

    second = parse_narinfo(store.remember(_info("b", nar), "http://up/").text)
    assert second.url == first.nar_file  # one copy
    assert second.file_hash == file_hash and second.file_size == len(packed)
    assert (store.layout.root / "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb.narinfo").exists()
    assert store.usage()["nars"] == len(packed)


def test_a_listing_lives_as_long_as_some_encoding_of_its_nar(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    row = _fetched(store, "c", listing=b'{"version":1,"root":{"type":"regular"}}')
    assert store.read_listing("c" * 32) == b'{"version":1,"root":{"type":"regular"}}'
    store.remove_nar(row.nar_file)
    assert store.read_listing("c" * 32) is None
    assert not any(store.layout.listing_dir.iterdir())


async def test_an_access_flush_waits_for_the_index_in_a_worker_not_in_the_event_loop(
        tmp_path: Path) -> None:
    """Uses are written every few seconds; when a worker holds the index (here a transaction
    plays a commit's part) the write waits for it in a thread, and hits go on meanwhile."""
    store = Store(tmp_path / "store")
    row = _fetched(store, "d")
    assert store.narinfo_row(row.hash) is not None
    store.touch_narinfo(row.hash)
    with held_by_a_worker(store._index):
        flush = asyncio.create_task(store.flush_access())
        await asyncio.sleep(0.2)  # returns: the event loop is not held
        assert not flush.done()
        assert store.narinfo_row(row.hash) is not None  # a hit meanwhile
    await flush
    assert store._index.take_access() is None  # written
    store.close()
