"""Direct reads without inotify: the agent says so and runs on with no tracking
(the tracking itself is shown with a real nix-daemon in tests/node/test_direct_reads.py)."""

import logging
import shutil
from pathlib import Path

import pytest

from agent.store import access
from agent.store.access import DirectReads
from agent.store.store import Store


async def test_a_store_that_cannot_be_watched_is_logged_and_not_tracked(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = Store(tmp_path / "store")
    try:
        shutil.rmtree(store.layout.nar_dir)  # inotify_add_watch fails (ENOENT)
        reads = DirectReads(store, grace=300)
        with caplog.at_level(logging.WARNING, logger="agent.store.access"):
            assert reads.start() is False
        assert "direct reads of the store are not tracked" in caplog.text
        assert reads.recently_opened() == set()
        # With nobody watching, the agent's own opens are not recorded (memory stays bounded).
        assert access.OWN_OPENS.announce(store.layout.cache_info) is None
        reads.close()
    finally:
        store.close()
