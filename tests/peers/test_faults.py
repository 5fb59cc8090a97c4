"""Peers that fail, vanish or lie (issue 15): clients still get valid copies, nothing bad is
committed, and a bad peer costs its timeout once."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp

from agent.peers.rendezvous import ranked
from tests.peers.conftest import QUICK, PeerCluster
from tests.support.agent import AgentProcess
from tests.support.nixenv import (
    Closure,
    hash_part,
    nar_request_path,
    nix_copy_async,
    path_valid_in,
)
from tests.support.upstream import Fault, UpstreamServer

MakeCluster = Callable[..., PeerCluster]
NIX32 = "0123456789abcdfghijklmnpqrsvwxyz"


async def _copy(agent: AgentProcess, closure: Closure, dest: Path, key: str) -> None:
    r = await nix_copy_async(agent.url, dest, closure.roots, [key], extra_config=QUICK)
    assert r.returncode == 0, r.stderr
    assert all(path_valid_in(dest, p) for p in closure.paths)


def _verify_store(store: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "agent", "verify", "--store", str(store)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def _hostile(cache: Path, cluster: PeerCluster, agent_url: str, hashes: list[str],
             fault: tuple[str, Fault]) -> UpstreamServer:
    """A peer that lies, ranked above the agent for at least one of `hashes` (the port, hence
    its id, decides; try another port until it is)."""
    for _ in range(20):
        server = UpstreamServer(cache, host=cluster.net.gateway).start()
        if any(ranked([agent_url, server.url], h)[0] == server.url for h in hashes):
            server.set_fault(*fault)
            return server
        server.stop()
    raise AssertionError("no port made the hostile peer an owner")


async def _hostile_peer_case(make: MakeCluster, cache: Path, closure: Closure,
                             tmp_path: Path, fault: tuple[str, Fault]) -> tuple[
                                 AgentProcess, UpstreamServer, PeerCluster]:
    cluster = make(0)
    hashes = [hash_part(p) for p in closure.paths]
    # The agent's future peer id: its host is the next one the network hands out.
    own = f"http://{cluster.net.prefix}.{10 + len(cluster.net.hosts)}"
    hostile = _hostile(cache, cluster, own, hashes, fault)
    (agent,) = cluster.add_agents(1, extra_peers=(hostile.url,))
    return agent, hostile, cluster


async def test_hostile_peer_with_forged_signatures_is_refused_and_counted(
        peer_cluster: MakeCluster, published_cache: Path, small_closure: Closure,
        tmp_path: Path) -> None:
    agent, hostile, cluster = await _hostile_peer_case(
        peer_cluster, published_cache, small_closure, tmp_path,
        ("*.narinfo", Fault("bad_signature")))
    try:
        await _copy(agent, small_closure, tmp_path / "pod", cluster.key)
        lies = hostile.count("*.narinfo")
        assert lies >= 1
        assert agent.metric("flox_node_cache_peer_rejected_total", reason="signature") == lies
        assert agent.metric("flox_node_cache_verification_failures_total",
                            reason="signature") == lies
        assert agent.metric("flox_node_cache_peer_circuit_open") == 1
        # Every path came from the real upstream, once; the liar was asked no more.
        for path in small_closure.paths:
            assert cluster.upstream.counts[f"/{hash_part(path)}.narinfo"] == 1
        assert hostile.count("/nar/*") == 0
    finally:
        hostile.stop()
    _verify_store(agent.store)


async def test_hostile_peer_with_flipped_nar_bytes_is_refused_and_clients_still_succeed(
        peer_cluster: MakeCluster, published_cache: Path, small_closure: Closure,
        tmp_path: Path) -> None:
    agent, hostile, cluster = await _hostile_peer_case(
        peer_cluster, published_cache, small_closure, tmp_path, ("/nar/*", Fault("tamper")))
    try:
        await _copy(agent, small_closure, tmp_path / "pod", cluster.key)
        lies = hostile.count("/nar/*")
        assert lies >= 1
        rejected = sum(agent.metric("flox_node_cache_peer_rejected_total", reason=r)
                       for r in ("file_hash", "nar_hash", "decompress", "nar_size"))
        assert rejected == lies
        assert agent.metric("flox_node_cache_peer_circuit_open") == 1
        # The clients got nothing from the liar: every NAR they hold came from the upstream.
        assert cluster.upstream.count("/nar/*") == len(small_closure.paths)
    finally:
        hostile.stop()
    _verify_store(agent.store)


async def test_black_holed_peer_costs_its_timeout_once(
        peer_cluster: MakeCluster, small_closure: Closure, tmp_path: Path) -> None:
    cluster = peer_cluster(3, "--peer-timeout", "1", "--circuit-cooldown", "300")
    client, peers_i = 0, [1, 2]
    # Random, absent paths (the upstream says 404) and the peer agent 0 asks first for each:
    # the owner, or when agent 0 owns it, the next one.
    keys = ["".join(secrets.choice(NIX32) for _ in range(32)) for _ in range(200)]
    ids = [cluster.peer_url(i) for i in range(3)]
    first_asked = {k: ids.index(next(p for p in ranked(ids, k) if p != ids[client]))
                   for k in keys}
    cut = max(peers_i, key=lambda i: sum(v == i for v in first_asked.values()))
    theirs = [k for k in keys if first_asked[k] == cut][:6]
    cluster.net.cut(cluster.hosts[cut])
    agent = cluster.agents[client]
    peer = cluster.peer_url(cut)
    async with aiohttp.ClientSession() as http:
        for key in theirs:
            async with http.get(f"{agent.url}/{key}.narinfo") as r:
                # a dead peer never turns the upstream's "not found" into an error
                assert r.status == 404, await r.text()
    assert agent.metric("flox_node_cache_peer_errors_total", peer=peer, reason="timeout") == 1
    assert agent.metric("flox_node_cache_peer_errors_total", peer=peer,
                        reason="circuit_open") == len(theirs) - 1
    assert agent.metric("flox_node_cache_peer_circuit_open", peer=peer) == 1
    status = subprocess.run([sys.executable, "-m", "agent", "status", "--json", "--socket",
                             str(agent.socket)], capture_output=True, text=True, timeout=60)
    peers = json.loads(status.stdout)["store"]["peers"]
    assert peers == {cluster.peer_url(i): "circuit_open" if i == cut else "ok" for i in peers_i}
    shown = subprocess.run([sys.executable, "-m", "agent", "status", "--socket",
                            str(agent.socket)], capture_output=True, text=True, timeout=60)
    assert f"{peer} (circuit_open)" in shown.stdout, shown.stdout
    # Real clients meanwhile work through the others and the upstream.
    await _copy(agent, small_closure, tmp_path / "pod", cluster.key)
    assert agent.metric("flox_node_cache_peer_errors_total", peer=peer, reason="timeout") == 1


async def test_owner_killed_while_streaming_a_large_nar(
        peer_cluster: MakeCluster, published_cache: Path, big_path_closure: Closure,
        tmp_path: Path) -> None:
    cluster = peer_cluster(3)
    big = big_path_closure.roots[0]
    owner = cluster.owner(hash_part(big))
    others = [i for i in range(3) if i != owner]
    # The owner's upstream download drips, so the kill lands in the middle of it.
    cluster.upstream.set_fault(nar_request_path(published_cache, big),
                               Fault("drip", chunk=64 * 1024, delay=0.05, times=1))
    copies = [asyncio.create_task(nix_copy_async(
        cluster.agents[i].url, tmp_path / f"pod{i}-{c}", big_path_closure.roots, [cluster.key],
        extra_config=QUICK)) for i in others for c in range(2)]
    # Wait until the owner is streaming the big NAR to its peers, then kill it.
    for _ in range(400):
        if sum(cluster.agents[i].metric("flox_node_cache_peer_received_bytes_total")
               for i in others) > 1 << 20:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the owner never streamed the NAR to its peers")
    cluster.agents[owner].kill9()
    results = await asyncio.gather(*copies)
    for r in results:
        assert r.returncode == 0, r.stderr
    for i in others:
        for c in range(2):
            assert all(path_valid_in(tmp_path / f"pod{i}-{c}", p)
                       for p in big_path_closure.paths)
    # The survivors saw the owner break off mid-stream and went on elsewhere.
    owner_id = cluster.peer_url(owner)
    assert sum(cluster.agents[i].metric("flox_node_cache_peer_errors_total", peer=owner_id)
               for i in others) >= 1
    for i in range(3):  # nothing partial committed anywhere, the dead owner's store included
        _verify_store(cluster.agents[i].store)


async def test_new_agent_warms_entirely_from_peers(
        peer_cluster: MakeCluster, small_closure: Closure, tmp_path: Path) -> None:
    cluster = peer_cluster(3)
    await _copy(cluster.agents[0], small_closure, tmp_path / "pod0", cluster.key)
    cluster.upstream.reset_counts()
    # A node joins (the others learn of it only through discovery, not here).
    (new,) = cluster.add_agents(1)
    r = subprocess.run([sys.executable, "-m", "agent", "prewarm", "--socket", str(new.socket),
                        *[a for p in small_closure.roots for a in ("--store-path", p)]],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert cluster.upstream.requests == []
    # prewarm used the read-through path, hence the peers: one NAR from a peer per path
    assert new.metric("flox_node_cache_peer_requests_total", kind="nar", code="200") \
        == len(small_closure.paths)
    await _copy(new, small_closure, tmp_path / "pod-new", cluster.key)
    assert cluster.upstream.requests == []
