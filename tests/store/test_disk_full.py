"""A full disk does not stop the agent: it starts, serves what it has, serves misses without
caching them, and eviction frees space (issue 12). A real 3 MB tmpfs, the real agent."""

import json
import subprocess
import sys
from pathlib import Path

import aiohttp

from tests.store.conftest import fill
from tests.store.test_faults import verify, wait_for
from tests.support.agent import AgentProcess
from tests.support.nixenv import Closure, hash_part, nix_copy, path_valid_in
from tests.support.upstream import UpstreamServer


def cli(agent: AgentProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", *args, "--socket", str(agent.socket)],
                          capture_output=True, text=True, timeout=120)


def warm(tmp_path: Path, store: Path, upstream: UpstreamServer, key: str,
         closure: Closure) -> None:
    """Cache a closure in `store`, then stop (the agent leaves its reserve behind)."""
    with AgentProcess(tmp_path / "warm", [upstream.url], [key], store=store) as agent:
        assert nix_copy(agent.url, tmp_path / "warm-node", closure.roots, [key]).returncode == 0
        wait_for(lambda: (store / ".reserve").exists(), "the reserve")


async def test_a_full_disk_starts_serves_hits_and_serves_cold_paths_uncached(
        tmp_path: Path, tiny_tmpfs: Path, upstream_server: UpstreamServer,
        signing_key: tuple[Path, str], small_closure: Closure, big_path_closure: Closure,
        published_cache: Path) -> None:
    key = signing_key[1]
    store = tiny_tmpfs / "store"
    warm(tmp_path, store, upstream_server, key, small_closure)
    fill(tiny_tmpfs)
    upstream_server.reset_counts()
    with AgentProcess(tmp_path / "full", [upstream_server.url], [key], store=store) as agent:
        # Started (no ENOSPC exit): the cached closure is served from the store.
        r = nix_copy(agent.url, tmp_path / "hit", small_closure.roots, [key])
        assert r.returncode == 0, r.stderr
        assert upstream_server.count("/nar/*") == 0
        async with aiohttp.ClientSession() as s, s.get(f"{agent.metrics_url}/readyz") as resp:
            assert resp.status == 200

        # Whatever room opening the index left is taken too: nothing can be written now.
        fill(tiny_tmpfs, "filler-2")
        cold = big_path_closure.roots[0]
        async with aiohttp.ClientSession() as s, \
                s.get(f"{agent.url}/{hash_part(cold)}.narinfo") as resp:
            assert resp.status == 200  # served, not a 500
            text = await resp.text()
        url = next(x[5:] for x in text.splitlines() if x.startswith("URL: "))
        async with aiohttp.ClientSession() as s, s.get(f"{agent.url}/{url}") as resp:
            assert resp.status == 200
            assert await resp.read() == (published_cache / url).read_bytes()
        r = nix_copy(agent.url, tmp_path / "cold", big_path_closure.roots, [key])
        assert r.returncode == 0, r.stderr
        assert all(path_valid_in(tmp_path / "cold", p) for p in big_path_closure.paths)
        assert not (store / f"{hash_part(cold)}.narinfo").exists()  # not cached
        assert agent.metric("flox_node_cache_store_disk_full") == 1
        assert agent.metric("flox_node_cache_nar_refetches_total") >= 1
    assert agent.proc is not None and agent.proc.returncode == 0
    assert not [r for r in agent.log_records() if r.get("level") in ("ERROR", "CRITICAL")
                or "Traceback" in json.dumps(r)]


async def test_eviction_frees_space_on_a_full_disk(
        tmp_path: Path, tiny_tmpfs: Path, upstream_server: UpstreamServer,
        signing_key: tuple[Path, str], small_closure: Closure) -> None:
    key = signing_key[1]
    store = tiny_tmpfs / "store"
    # The budget holds the closure's two largest paths, not all four.
    budget = small_closure.total_nar_size - 1000
    with AgentProcess(tmp_path / "a", [upstream_server.url], [key], "--gc-interval", "3600",
                      "--recompress", "none", "--store-budget", str(budget), store=store) \
            as agent:
        assert nix_copy(agent.url, tmp_path / "n1", small_closure.roots, [key]).returncode == 0
        (store / ".reserve").unlink(missing_ok=True)  # filled by someone else, reserve or not
        fill(tiny_tmpfs)
        # A hit whose access time cannot be written: eviction must not need that write.
        assert nix_copy(agent.url, tmp_path / "n2", small_closure.roots, [key]).returncode == 0

        gc = cli(agent, "gc", "--json")
        assert gc.returncode == 0, gc.stderr
        result = json.loads(gc.stdout)
        assert result["evicted_files"], result
        for file in result["evicted_files"]:
            assert not (store / file).exists()
        st = json.loads(cli(agent, "status", "--json").stdout)["store"]
        assert st["free_bytes"] >= result["evicted_bytes"] > 0

        # The room it made is used again: an evicted path is fetched and cached once more.
        evicted = [p for p in small_closure.paths
                   if not (store / f"{hash_part(p)}.narinfo").exists()]
        assert evicted
        r = nix_copy(agent.url, tmp_path / "n3", [small_closure.chain[-1]], [key])
        assert r.returncode == 0, r.stderr
        wait_for(lambda: (store / f"{hash_part(small_closure.chain[-1])}.narinfo").exists(),
                 "the smallest path to be cached again")
    assert verify(store).returncode == 0


async def test_a_disk_full_without_a_reserve_starts_read_only_and_serves_hits(
        tmp_path: Path, tiny_tmpfs: Path, upstream_server: UpstreamServer,
        signing_key: tuple[Path, str], small_closure: Closure) -> None:
    key = signing_key[1]
    store = tiny_tmpfs / "store"
    warm(tmp_path, store, upstream_server, key, small_closure)
    (store / ".reserve").unlink()  # e.g. the first start of a new version on a full disk
    fill(tiny_tmpfs)
    upstream_server.reset_counts()
    with AgentProcess(tmp_path / "full", [upstream_server.url], [key], store=store) as agent:
        r = nix_copy(agent.url, tmp_path / "hit", small_closure.roots, [key])
        assert r.returncode == 0, r.stderr
        assert upstream_server.count("/nar/*") == 0
        assert agent.metric("flox_node_cache_store_disk_full") == 1
        async with aiohttp.ClientSession() as s, s.get(f"{agent.metrics_url}/readyz") as resp:
            assert resp.status == 200
            assert (await resp.json())["checks"]["index"] == "read_only"
        assert any(rec["msg"].startswith("no room on the disk to open the index")
                   for rec in agent.log_records())
    assert agent.proc is not None and agent.proc.returncode == 0
    (tiny_tmpfs / "filler").unlink()
    assert verify(store).returncode == 0  # nothing was lost or half-written


def test_a_budget_larger_than_the_disk_is_flagged(
        tmp_path: Path, tiny_tmpfs: Path, upstream_server: UpstreamServer,
        signing_key: tuple[Path, str]) -> None:
    with AgentProcess(tmp_path / "a", [upstream_server.url], [signing_key[1]],
                      "--store-budget", "1G", store=tiny_tmpfs / "store") as agent:
        st = json.loads(cli(agent, "status", "--json").stdout)["store"]
        assert st["budget_exceeds_disk"] is True
        assert "more than the disk can hold" in " ".join(cli(agent, "status").stdout.split())
        assert any(r["msg"].startswith("store budget is more than the disk can hold")
                   for r in agent.log_records())
    with AgentProcess(tmp_path / "b", [upstream_server.url], [signing_key[1]],
                      store=tiny_tmpfs / "store") as agent:  # the default: 25% of the disk
        st = json.loads(cli(agent, "status", "--json").stdout)["store"]
        assert st["budget_exceeds_disk"] is False
        assert st["budget_bytes"] == 3 * 2**20 // 4
