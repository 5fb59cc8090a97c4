"""The bounded store: LRU eviction under a budget, pins, one copy of a shared NAR."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.agent import AgentProcess
from tests.support.nixenv import Closure, hash_part, nix_copy, nix_env, publish
from tests.support.upstream import UpstreamServer


def cli(agent: AgentProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", *args, "--socket", str(agent.socket)],
                          capture_output=True, text=True, timeout=120)


def status(agent: AgentProcess) -> dict:
    return json.loads(cli(agent, "status", "--json").stdout)["store"]


@pytest.fixture(scope="module")
def twin_paths(tmp_path_factory: pytest.TempPathFactory, signing_key: tuple[Path, str],
               published_cache: Path) -> list[str]:
    """Two store paths with different names and identical contents: one NAR."""
    work = tmp_path_factory.mktemp("twins")
    paths = []
    for name in ("twin-a", "twin-b"):
        d = work / name
        d.mkdir()
        (d / "data").write_bytes(bytes(range(256)) * 400)
        out = subprocess.run(["nix-store", "--add", str(d)], env=nix_env(), check=True,
                             capture_output=True, text=True)
        paths.append(out.stdout.strip())
    publish(paths, published_cache, signing_key[0])
    return paths


def test_a_nar_shared_by_two_narinfos_is_stored_and_counted_once(
        tmp_path: Path, upstream_server: UpstreamServer, signing_key: tuple[Path, str],
        twin_paths: list[str]) -> None:
    # Without re-encoding: during its grace period an old encoding is a second file.
    with AgentProcess(tmp_path / "a", [upstream_server.url], [signing_key[1]],
                      "--recompress", "none") as agent:
        for i, p in enumerate(twin_paths):
            r = nix_copy(agent.url, tmp_path / f"n{i}", [p], [signing_key[1]])
            assert r.returncode == 0, r.stderr
        nars = list((agent.store / "nar").iterdir())
        assert len(nars) == 1
        st = status(agent)
        assert st["entries"] == {"nar": 1, "narinfo": 2}
        assert st["usage"]["nars"] == nars[0].stat().st_size
        assert st["used_bytes"] > st["usage"]["nars"]  # the index and narinfos count too

        # Evicting the NAR removes both narinfos first: none is left pointing at nothing.
        r = cli(agent, "gc", "--json")
        assert r.returncode == 0
        assert status(agent)["entries"] == {"nar": 1, "narinfo": 2}  # under budget: kept
    with AgentProcess(tmp_path / "b", [upstream_server.url], [signing_key[1]],
                      "--store-budget", "1", store=agent.store) as small:
        assert json.loads(cli(small, "gc", "--json").stdout)["evicted_files"] == []
        assert status(small)["entries"] == {"nar": 0, "narinfo": 0}
        assert not list(small.store.glob("*.narinfo"))


def test_eviction_keeps_pinned_closures_and_stays_within_budget(
        tmp_path: Path, upstream_server: UpstreamServer, signing_key: tuple[Path, str],
        small_closure: Closure, big_path_closure: Closure) -> None:
    # Room for the small closure and the index, not for the 8 MB path.
    budget = 2 * small_closure.total_nar_size + (1 << 20)
    with AgentProcess(tmp_path / "a", [upstream_server.url], [signing_key[1]],
                      "--store-budget", str(budget), "--gc-interval", "3600",
                      "--recompress", "none") as agent:
        pinned = cli(agent, "prewarm", "--store-path", small_closure.roots[0], "--pin")
        assert pinned.returncode == 0, pinned.stderr
        assert cli(agent, "prewarm", "--store-path", big_path_closure.roots[0]).returncode == 0
        assert status(agent)["used_bytes"] > budget

        dry = json.loads(cli(agent, "gc", "--dry-run", "--json").stdout)
        assert dry["evicted_files"] and status(agent)["used_bytes"] > budget  # nothing removed
        done = json.loads(cli(agent, "gc", "--json").stdout)
        assert sorted(done["evicted_files"]) == sorted(dry["evicted_files"])
        st = status(agent)
        assert st["used_bytes"] <= budget
        for p in small_closure.paths:
            assert (agent.store / f"{hash_part(p)}.narinfo").exists(), p
        assert not (agent.store / f"{hash_part(big_path_closure.roots[0])}.narinfo").exists()
        assert agent.metric("flox_node_cache_evicted_bytes_total") == done["evicted_bytes"]
        assert agent.metric("flox_node_cache_gc_duration_seconds_count") >= 1

        # Evicted paths come back on demand.
        r = nix_copy(agent.url, tmp_path / "n", big_path_closure.roots, [signing_key[1]])
        assert r.returncode == 0, r.stderr
