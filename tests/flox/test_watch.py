"""GenerationWatch against real floxmeta repositories served by git's own smart HTTP."""

import asyncio
import logging
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from agent.flox.floxhub import FloxHub, ResolvedEnv
from agent.flox.watch import GenerationWatch
from tests.support.fixtures import FIXTURES
from tests.support.floxmeta import Floxmeta
from tests.support.gitserver import GitHTTPServer, dead_url

GEN = [(FIXTURES / "floxhub-generations" / f"gen{n}.manifest.lock").read_text()
       for n in (1, 2, 3)]
TOKEN = "watch-token-SECRET-5b7e"


@pytest.fixture
def floxmeta(tmp_path: Path) -> Floxmeta:
    meta = Floxmeta(tmp_path / "floxhub")
    meta.add_generation("alice", "tools", GEN[0])
    meta.add_generation("alice", "tools", GEN[1])
    return meta


@pytest.fixture
def hub(server: GitHTTPServer, tmp_path: Path) -> FloxHub:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    return FloxHub(server.url, tmp_path / "cache", token_file, timeout=20)


class Recorder:
    def __init__(self, failures: int = 0) -> None:
        self.calls: list[ResolvedEnv] = []
        self.failures = failures
        self.event = asyncio.Event()

    async def __call__(self, resolved: ResolvedEnv) -> None:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("prefetch failed")
        self.calls.append(resolved)
        self.event.set()


def changes() -> float:
    return REGISTRY.get_sample_value("flox_node_cache_floxhub_generation_changes_total") or 0.0


async def test_notices_a_push_and_calls_once(hub: FloxHub, floxmeta: Floxmeta) -> None:
    seen = Recorder()
    watch = GenerationWatch(hub, 60)
    watch.track("alice", "tools")
    assert watch.tracked() == {("alice", "tools")}
    before = changes()
    await watch.check_once(seen)  # baseline: generation 2 is what is live now
    await watch.check_once(seen)
    assert seen.calls == []
    assert floxmeta.add_generation("alice", "tools", GEN[2]) == 3
    await watch.check_once(seen)
    assert [(r.ref.name, r.generation, r.lockfile_text) for r in seen.calls] == [
        ("tools", 3, GEN[2])]
    await watch.check_once(seen)
    assert len(seen.calls) == 1
    assert changes() == before + 1


async def test_known_generation_makes_first_round_a_change(hub: FloxHub) -> None:
    seen = Recorder()
    watch = GenerationWatch(hub, 60)
    watch.track("alice", "tools", generation=2)
    await watch.check_once(seen)
    assert seen.calls == []
    watch.untrack("alice", "tools")
    watch.track("alice", "tools", generation=1)
    await watch.check_once(seen)
    assert [r.generation for r in seen.calls] == [2]


async def test_rollback_is_a_change_but_other_commits_are_not(hub: FloxHub,
                                                              floxmeta: Floxmeta) -> None:
    seen = Recorder()
    watch = GenerationWatch(hub, 60)
    watch.track("alice", "tools")
    await watch.check_once(seen)
    floxmeta.commit("alice", "tools", {"README": b"notes"}, "unrelated commit")
    await watch.check_once(seen)
    assert seen.calls == []
    floxmeta.switch_generation("alice", "tools", 1)
    await watch.check_once(seen)
    assert [(r.generation, r.lockfile_text) for r in seen.calls] == [(1, GEN[0])]


async def test_run_loop_notices_a_push(hub: FloxHub, floxmeta: Floxmeta) -> None:
    seen = Recorder()
    watch = GenerationWatch(hub, 0.05)
    watch.track("alice", "tools")
    task = asyncio.create_task(watch.run(seen))
    try:
        await asyncio.sleep(0.3)  # a few rounds: the baseline is taken
        assert seen.calls == []
        floxmeta.add_generation("alice", "tools", GEN[2])
        await asyncio.wait_for(seen.event.wait(), 20)
        await asyncio.sleep(0.3)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert [r.generation for r in seen.calls] == [3]


async def test_failing_callback_is_retried(hub: FloxHub, floxmeta: Floxmeta,
                                           caplog: pytest.LogCaptureFixture) -> None:
    seen = Recorder(failures=1)
    watch = GenerationWatch(hub, 60)
    watch.track("alice", "tools")
    await watch.check_once(seen)
    floxmeta.add_generation("alice", "tools", GEN[2])
    before = changes()
    await watch.check_once(seen)
    assert seen.calls == [] and "prefetch failed" in caplog.text
    await watch.check_once(seen)
    assert [r.generation for r in seen.calls] == [3]
    assert changes() == before + 1  # noticed once, delivered on the retry


async def test_errors_never_stop_the_watch(hub: FloxHub, tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    seen = Recorder()
    watch = GenerationWatch(hub, 60)
    watch.track("alice", "absent")
    watch.track("nobody", "tools")
    watch.track("alice", "tools", generation=1)
    await watch.check_once(seen)
    assert "alice/absent is not on FloxHub" in caplog.text
    assert "watch of nobody/tools failed" in caplog.text
    assert [r.generation for r in seen.calls] == [2]

    dead = GenerationWatch(FloxHub(dead_url(), tmp_path / "c2", timeout=5), 60)
    dead.track("alice", "tools")
    await dead.check_once(seen)
    assert "watch of alice/tools failed" in caplog.text
    assert TOKEN not in caplog.text


async def test_retrack_with_a_handled_generation_is_not_a_change(hub: FloxHub,
                                                                 floxmeta: Floxmeta) -> None:
    seen = Recorder()
    watch = GenerationWatch(hub, 60)
    watch.track("alice", "tools")
    await watch.check_once(seen)
    floxmeta.add_generation("alice", "tools", GEN[2])
    watch.track("alice", "tools", generation=3)  # a pod already resolved and prefetched it
    await watch.check_once(seen)
    assert seen.calls == []
    assert watch.tracked() == {("alice", "tools")}
