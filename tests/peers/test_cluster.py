"""Agents on separate test hosts fetch from each other (issue 15): real agents in network
namespaces, real Nix clients, one counting upstream on the bridge."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp

from tests.peers.conftest import QUICK, PeerCluster
from tests.support.nixenv import Closure, hash_part, nix_copy_async, path_valid_in
from tests.support.upstream import Fault

MakeCluster = Callable[..., PeerCluster]


async def _copy_all(cluster: PeerCluster, closure: Closure, tmp_path: Path, per_agent: int,
                    agents: list[int] | None = None) -> None:
    runs = [(i, c) for i in (agents if agents is not None else range(len(cluster.agents)))
            for c in range(per_agent)]
    results = await asyncio.gather(*[
        nix_copy_async(cluster.agents[i].url, tmp_path / f"client-{i}-{c}", closure.roots,
                       [cluster.key], extra_config=QUICK) for i, c in runs])
    for (i, c), r in zip(runs, results, strict=True):
        assert r.returncode == 0, f"client {c} of agent {i}: {r.stderr}"
        assert all(path_valid_in(tmp_path / f"client-{i}-{c}", p) for p in closure.paths)


async def test_cold_closure_crosses_the_upstream_once_for_the_whole_cluster(
        peer_cluster: MakeCluster, small_closure: Closure, tmp_path: Path) -> None:
    cluster = peer_cluster(4)
    # Slow the upstream so the clients of every node really overlap.
    cluster.upstream.set_fault("*", Fault("delay", delay=0.3))
    await _copy_all(cluster, small_closure, tmp_path, per_agent=2)

    counts = cluster.upstream.counts
    for path in small_closure.paths:
        assert counts[f"/{hash_part(path)}.narinfo"] == 1, counts
    nar_gets = {p: n for p, n in counts.items() if p.startswith("/nar/")}
    assert len(nar_gets) == len(small_closure.paths)
    assert set(nar_gets.values()) == {1}, nar_gets
    # Every node served its clients; the non-owners got their misses from peers.
    from_peers = sum(a.metric("flox_node_cache_lookups_total", kind="nar", source="peer")
                     for a in cluster.agents)
    assert from_peers > 0
    assert sum(a.metric("flox_node_cache_peer_served_bytes_total")
               for a in cluster.agents) > 0


async def test_peer_listener_refuses_requests_without_the_token(
        peer_cluster: MakeCluster, small_closure: Closure) -> None:
    cluster = peer_cluster(2)
    url = f"{cluster.peer_url(0)}/{hash_part(small_closure.roots[0])}.narinfo"
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer wrong"},
                        {"Authorization": "Basic " + cluster.token}):
            async with http.get(url, headers=headers) as r:
                assert r.status == 401, headers
        old = cluster.token
        async with http.get(url, headers={"Authorization": f"Bearer {old}"}) as r:
            assert r.status == 200
        # The Secret rotates: the file changes, the old token stops working without a restart.
        cluster.token_file.write_text("rotated-" + old + "\n")
        async with http.get(url, headers={"Authorization": f"Bearer {old}"}) as r:
            assert r.status == 401
        async with http.get(url, headers={"Authorization": f"Bearer rotated-{old}"}) as r:
            assert r.status == 200
    assert cluster.agents[0].metric("flox_node_cache_peer_unauthorized_total") == 4
    assert cluster.upstream.count("*.narinfo") == 1  # refused requests fetched nothing


async def test_a_narinfo_from_a_peer_still_finds_its_nar_after_a_restart(
        peer_cluster: MakeCluster, small_closure: Closure) -> None:
    cluster = peer_cluster(2)
    h = hash_part(small_closure.roots[0])
    # Asked of the agent that does not own it. (Asking agent 0 for a path agent 1 owns had no
    # such path among these 7 in 1 run of 128: ownership depends on the run's ports.)
    agent = cluster.agents[1 - cluster.owner(h)]
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{agent.url}/{h}.narinfo") as r:
            assert r.status == 200
            nar = next(line[5:] for line in (await r.text()).splitlines()
                       if line.startswith("URL: "))
        agent.stop()
        agent.start()  # the same store: the narinfo is known, its NAR is not fetched yet
        async with http.get(f"{agent.url}/{nar}") as r:
            assert r.status == 200
            await r.read()
    assert agent.metric("flox_node_cache_lookups_total", kind="nar", source="peer") == 1
    assert cluster.upstream.count("/nar/*") == 1  # by the owner, for its peer


async def test_a_forwarded_request_is_never_forwarded_again(
        peer_cluster: MakeCluster, small_closure: Closure, big_path_closure: Closure) -> None:
    cluster = peer_cluster(2)
    hashes = [hash_part(p) for p in small_closure.paths + big_path_closure.paths]
    # The agent owning most of these paths (at least 4 of 7), and the other one.
    owner = max((0, 1), key=lambda i: sum(cluster.owner(h) == i for h in hashes))
    asked = 1 - owner
    first, second = [h for h in hashes if cluster.owner(h) == owner][:2]
    auth = {"Authorization": f"Bearer {cluster.token}", "X-Flox-Peer-Hop": "1"}
    async with aiohttp.ClientSession() as http:
        # As a peer would: the asked agent reads through its own upstream, not the owner.
        async with http.get(f"{cluster.peer_url(asked)}/{first}.narinfo", headers=auth) as r:
            assert r.status == 200
            text = await r.text()
        nar = next(line[5:] for line in text.splitlines() if line.startswith("URL: "))
        async with http.get(f"{cluster.peer_url(asked)}/{nar}", headers=auth) as r:
            assert r.status == 200
            await r.read()
        assert cluster.upstream.counts[f"/{first}.narinfo"] == 1
        assert cluster.upstream.count("/nar/*") == 1
        assert cluster.agents[owner].metric("flox_node_cache_http_requests_total",
                                            listener="peer") == 0
        assert cluster.agents[asked].metric("flox_node_cache_peer_requests_total") == 0
        # The same agent asked by a local client does go to the owner.
        async with http.get(f"{cluster.agents[asked].url}/{second}.narinfo") as r:
            assert r.status == 200
    assert cluster.agents[asked].metric("flox_node_cache_peer_requests_total",
                                        kind="narinfo") == 1
    assert cluster.agents[owner].metric("flox_node_cache_http_requests_total",
                                        listener="peer") == 1


async def test_an_upstream_error_at_the_owner_is_never_a_not_found(
        peer_cluster: MakeCluster, small_closure: Closure) -> None:
    cluster = peer_cluster(2)
    h = hash_part(small_closure.roots[0])
    owner = cluster.owner(h)  # whichever it is this run (ownership follows the ports)
    other = cluster.agents[1 - owner]
    cluster.upstream.set_fault(f"/{h}.narinfo", Fault("status", code=500))
    auth = {"Authorization": f"Bearer {cluster.token}"}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{cluster.peer_url(owner)}/{h}.narinfo", headers=auth) as r:
            assert r.status == 503  # the owner, asked as a peer: an error, not an answer
            assert "X-Flox-Peer-Not-Found" not in r.headers
        async with http.get(f"{other.url}/{h}.narinfo") as r:
            assert r.status == 503  # and a client of another node gets an error too
        # The owner itself works: it stays in use (its circuit closed) and is asked again.
        owner_url = cluster.peer_url(owner)  # labelled with its URL, like an upstream
        assert other.metric("flox_node_cache_peer_circuit_open", peer=owner_url) == 0
        cluster.upstream.clear_faults()
        async with http.get(f"{other.url}/{h}.narinfo") as r:
            assert r.status == 200
        assert other.metric("flox_node_cache_lookups_total", kind="narinfo",
                            source="peer") == 1
        absent = "0" * 32
        async with http.get(f"{owner_url}/{absent}.narinfo", headers=auth) as r:
            assert r.status == 404 and r.headers["X-Flox-Peer-Not-Found"] == "upstreams"


async def test_a_prewarm_on_every_node_downloads_the_closure_once(
        peer_cluster: MakeCluster, small_closure: Closure) -> None:
    cluster = peer_cluster(3)
    cluster.upstream.set_fault("*", Fault("delay", delay=0.2))  # the prewarms overlap
    prewarms = await asyncio.gather(*[asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "prewarm", "--socket", str(a.socket),
        *[x for p in small_closure.roots for x in ("--store-path", p)],
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE) for a in cluster.agents])
    for proc in prewarms:
        _, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
    counts = cluster.upstream.counts
    for path in small_closure.paths:
        assert counts[f"/{hash_part(path)}.narinfo"] == 1, counts
    assert sorted(n for p, n in counts.items() if p.startswith("/nar/")) \
        == [1] * len(small_closure.paths)
