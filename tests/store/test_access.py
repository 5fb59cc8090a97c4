"""Direct reads seen through inotify, in-process: opens by others count, the agent's own
announced opens do not, and without inotify the agent says so and tracks nothing. (The real
node, a nix-daemon reading the store as a file:// substituter: tests/node/test_direct_reads.py.)
"""

import asyncio
import hashlib
import logging
import lzma
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from agent.nix.hashes import Hash
from agent.nix.narinfo import NarInfo
from agent.nix.storepath import StorePath
from agent.store import access
from agent.store.access import DirectReads
from agent.store.store import Store
from tests.store.conftest import commit

HASH = "a" * 32


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A store holding one committed NAR (narinfo HASH)."""
    store = Store(tmp_path / "store")
    nar = b"nix-archive-1 pretend" * 100
    packed = lzma.compress(nar)
    info = NarInfo(store_path=StorePath(HASH, "p"), url="nar/x.nar.xz", compression="xz",
                   nar_hash=Hash("sha256", hashlib.sha256(nar).digest()), nar_size=len(nar))
    commit(store, info, packed)
    yield store
    store.close()


def direct_reads(kind: str) -> float:
    return REGISTRY.get_sample_value("flox_node_cache_direct_reads_total", {"kind": kind}) or 0


async def settled() -> None:
    """Let the event loop read what inotify has queued."""
    for _ in range(20):
        await asyncio.sleep(0.01)


async def test_opens_by_others_count_and_the_agents_own_do_not(store: Store) -> None:
    row = store.narinfo_row(HASH)
    assert row is not None
    nar = Path(store.nar_file_path(row.nar_file))
    reads = DirectReads(store, grace=300)
    assert reads.start()
    try:
        before = direct_reads("nar")
        with access.open_binary(nar) as f:  # the agent's own (sendfile, scrub, re-encode)
            f.read()
        await settled()
        assert direct_reads("nar") == before and reads.recently_opened() == set()

        await asyncio.to_thread(nar.read_bytes)  # someone else
        await settled()
        assert direct_reads("nar") == before + 1
        assert reads.recently_opened() == {row.nar_file}
    finally:
        reads.close()


async def test_a_narinfo_read_protects_its_nar_for_the_grace_only(store: Store) -> None:
    row = store.narinfo_row(HASH)
    assert row is not None
    kept, forgotten = DirectReads(store, grace=300), DirectReads(store, grace=0)
    assert kept.start() and forgotten.start()
    try:
        before = direct_reads("narinfo")
        await asyncio.to_thread((store.layout.root / f"{HASH}.narinfo").read_text)
        await settled()
        assert direct_reads("narinfo") == before + 2  # one per watcher
        assert kept.recently_opened() == {row.nar_file}
        assert forgotten.recently_opened() == set()
    finally:
        kept.close()
        forgotten.close()


def test_announced_opens_are_consumed_once_and_lost_ones_forgotten(
        monkeypatch: pytest.MonkeyPatch) -> None:
    opens = access.OwnOpens()
    assert opens.announce("nar/x.nar") is None  # nobody watching: nothing recorded
    opens.watchers = 1
    opens.announce("/store/nar/x.nar")
    opens.announce("/store/nar/x.nar")
    assert [opens.consume("x.nar") for _ in range(3)] == [True, True, False]
    monkeypatch.setattr(access, "OWN_OPEN_TTL", 0.0)
    for i in range(2 * access.PENDING_NAMES):
        opens.announce(f"nar/{i}.nar")
    assert len(opens._pending) <= access.PENDING_NAMES


async def test_a_store_that_cannot_be_watched_is_logged_and_not_tracked(
        store: Store, caplog: pytest.LogCaptureFixture) -> None:
    shutil.rmtree(store.layout.nar_dir)  # inotify_add_watch fails (ENOENT)
    reads = DirectReads(store, grace=300)
    with caplog.at_level(logging.WARNING, logger="agent.store.access"):
        assert reads.start() is False
    assert "direct reads of the store are not tracked" in caplog.text
    assert REGISTRY.get_sample_value("flox_node_cache_direct_reads_tracked") == 0
    assert reads.recently_opened() == set()
    reads.close()
