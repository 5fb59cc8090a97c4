"""A node's Nix reading the agent's store straight from its directory (issue 16), with a real
nix-daemon configured as the node-config overlay does: the store as a `file://` substituter
first, the agent's HTTP URL second. The agent never sees those reads over HTTP; it counts them
and keeps their files from the filesystem (agent/store/access.py)."""

from __future__ import annotations

import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.node.conftest import admin, eventually, prewarm
from tests.support.agent import AgentProcess
from tests.support.nixdaemon import NixDaemon, scratch_dir
from tests.support.nixenv import Closure, hash_part, nar_request_path
from tests.support.upstream import Fault, UpstreamServer

# A budget of one byte: a gc pass evicts all it may.
TINY_BUDGET = ("--store-budget", "1", "--gc-interval", "3600")


@pytest.fixture
def scratch() -> Iterator[Path]:
    with scratch_dir("access-direct-") as d:
        yield d


def node(scratch: Path, agent: AgentProcess, key: str) -> NixDaemon:
    """The node's daemon as the overlay configures it: the store first, then the agent."""
    return NixDaemon(scratch / "node", keys=[key], substituters=[
        f"file://{agent.store}?priority=-2", f"{agent.url}?priority=-1"])


def nar_file(store: Path, path: str) -> str:
    """The `nar/...` file the store's narinfo for `path` points to."""
    return nar_request_path(store, path).lstrip("/")


def file_size(store: Path, path: str) -> int:
    text = (store / f"{hash_part(path)}.narinfo").read_text()
    return int(next(line[10:] for line in text.splitlines() if line.startswith("FileSize: ")))


def recompressed(agent: AgentProcess, n: int) -> None:
    eventually(lambda: agent.metric("flox_node_cache_recompressions_total", outcome="ok") >= n,
               f"{n} NARs re-encoded")


def test_a_pod_start_from_the_store_is_counted_and_moves_access_times(
        scratch: Path, upstream_server: UpstreamServer, signing_key: tuple[Path, str],
        small_closure: Closure, big_path_closure: Closure) -> None:
    key = signing_key[1]
    agent = AgentProcess(scratch / "agent", [upstream_server.url], [key], *TINY_BUDGET,
                         "--direct-read-grace", "0")
    with agent, node(scratch, agent, key) as daemon:
        prewarm(agent, big_path_closure.roots, pin=False)  # older
        prewarm(agent, small_closure.roots, pin=False)     # newer
        recompressed(agent, len(big_path_closure.paths) + len(small_closure.paths))
        # Reading a narinfo in the store is a direct read (and an access) too: the test reads
        # them all now, the big closure's first, so that alone leaves it least recently used.
        big = [nar_file(agent.store, p) for p in big_path_closure.paths]
        big_bytes = sum(file_size(agent.store, p) for p in big_path_closure.paths)
        small = [nar_file(agent.store, p) for p in small_closure.paths]
        # The agent's own opens (re-encoding, and a NAR sent over HTTP) are not direct reads.
        with urllib.request.urlopen(f"{agent.url}/{small[0]}", timeout=10) as r:
            assert r.status == 200 and r.read()
        nar_lookups = agent.metric("flox_node_cache_lookups_total", kind="nar")
        assert agent.metric("flox_node_cache_direct_reads_tracked") == 1
        assert agent.metric("flox_node_cache_direct_reads_total", kind="nar") == 0
        narinfo_reads = agent.metric("flox_node_cache_direct_reads_total", kind="narinfo")

        pod = daemon.realise(*big_path_closure.roots)
        assert pod.returncode == 0, pod.stderr
        n = len(big_path_closure.paths)
        # Nothing reached the agent over HTTP, yet every NAR and narinfo read was seen.
        assert agent.metric("flox_node_cache_lookups_total", kind="nar") == nar_lookups
        eventually(lambda: agent.metric("flox_node_cache_direct_reads_total", kind="nar") == n,
                   f"{n} direct NAR reads")
        assert agent.metric("flox_node_cache_direct_reads_total", kind="narinfo") >= \
            narinfo_reads + n
        assert agent.metric("flox_node_cache_direct_read_bytes_total") == big_bytes

        # LRU: the closure just read directly is now the most recently used.

        def read_closure_last() -> bool:
            order = admin(agent, "POST", "/v1/gc", {"dry_run": True})["evicted_files"]
            return max(map(order.index, small)) < min(map(order.index, big))
        eventually(read_closure_last, "the directly read closure last in LRU order", 15)


def test_eviction_keeps_files_the_node_just_opened(
        scratch: Path, upstream_server: UpstreamServer, published_cache: Path,
        signing_key: tuple[Path, str], small_closure: Closure,
        big_path_closure: Closure) -> None:
    key = signing_key[1]
    agent = AgentProcess(scratch / "agent", [upstream_server.url], [key], *TINY_BUDGET,
                         "--recompress", "none")  # default --direct-read-grace (300 s)
    with agent, node(scratch, agent, key) as daemon:
        prewarm(agent, small_closure.roots + big_path_closure.roots, pin=False)
        pod = daemon.realise(*small_closure.roots)
        assert pod.returncode == 0, pod.stderr
        # The upstream's file names (kept, not re-encoded): opening a narinfo in the store
        # would protect its NAR.
        read = {nar_file(published_cache, p) for p in small_closure.paths}
        unread = {nar_file(published_cache, p) for p in big_path_closure.paths}
        eventually(lambda: agent.metric("flox_node_cache_direct_reads_total", kind="nar")
                   == len(read), "direct reads seen")

        result = admin(agent, "POST", "/v1/gc", {})
        assert set(result["evicted_files"]) == unread  # the rest is far over the budget
        assert all((agent.store / f).exists() for f in read)
        assert not any((agent.store / f).exists() for f in unread)


def test_a_nar_gone_after_its_narinfo_was_read_falls_through_to_the_agent(
        scratch: Path, upstream_server: UpstreamServer, published_cache: Path,
        signing_key: tuple[Path, str], small_closure: Closure) -> None:
    """The daemon reads the root's narinfo from the store, then substitutes its references
    (one held up at the upstream) before it opens the root's NAR; meanwhile the NAR is
    evicted. The daemon falls through to the agent's URL, which fetches it again."""
    key = signing_key[1]
    root, ref = small_closure.chain[0], small_closure.chain[1]
    agent = AgentProcess(scratch / "agent", [upstream_server.url], [key], *TINY_BUDGET,
                         "--direct-read-grace", "0", "--recompress", "none")
    with agent, node(scratch, agent, key) as daemon:
        # Only the root is in the store; its references come through the agent.
        with urllib.request.urlopen(f"{agent.url}/{hash_part(root)}.narinfo", timeout=10):
            pass
        root_nar = nar_request_path(published_cache, root)
        with urllib.request.urlopen(f"{agent.url}{root_nar}", timeout=10) as r:
            r.read()
        stored = agent.store / nar_file(agent.store, root)
        assert stored.exists()
        ref_nar = nar_request_path(published_cache, ref)
        upstream_server.set_fault(ref_nar, Fault("delay", delay=5, times=1))

        pod: list[subprocess.CompletedProcess[str]] = []
        start = threading.Thread(target=lambda: pod.append(daemon.realise(root)))
        start.start()
        try:
            eventually(lambda: upstream_server.count(ref_nar) >= 1, "the reference requested")
            evicted = admin(agent, "POST", "/v1/gc", {})["evicted_files"]
        finally:
            start.join(120)
        assert str(stored.relative_to(agent.store)) in evicted
        assert pod[0].returncode == 0, pod[0].stderr + daemon.logs()
        assert daemon.valid(root)
        # The daemon went for the store first (the NAR was gone: Nix 2.8 says "is not valid"),
        # then to the agent, which fetched the root's NAR again.
        assert sources_tried(pod[0].stderr, root) == [f"file://{agent.store}", agent.url]
        assert upstream_server.count(root_nar) == 2


def test_a_nar_deleted_behind_the_agents_back_falls_through_too(
        scratch: Path, upstream_server: UpstreamServer, published_cache: Path,
        signing_key: tuple[Path, str], small_closure: Closure) -> None:
    key = signing_key[1]
    root = small_closure.chain[0]
    agent = AgentProcess(scratch / "agent", [upstream_server.url], [key],
                         "--recompress", "none")
    with agent, node(scratch, agent, key) as daemon:
        prewarm(agent, small_closure.roots, pin=False)
        (agent.store / nar_file(published_cache, root)).unlink()  # the narinfo stays
        pod = daemon.realise(root)
        assert sources_tried(pod.stderr, root) == [f"file://{agent.store}", agent.url]
        assert pod.returncode == 0, pod.stderr


def sources_tried(client_output: str, path: str) -> list[str]:
    """The substituters the daemon copied `path` from, in order, as the client reports."""
    prefix = f"copying path '{path}' from '"
    return [line[len(prefix):-4] for line in client_output.splitlines()
            if line.startswith(prefix)]
