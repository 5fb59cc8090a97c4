"""Scenarios beyond one agent: pods starting on a node whose Nix store already holds the closure
(realised by the agent through the node's nix-daemon), and a rollout to N nodes with and
without peers. Registered in scenarios.SCENARIOS like every other scenario."""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import replace
from pathlib import Path

from loadtest import load as ld
from loadtest.compare import Target
from loadtest.node_realise import pod_starts
from loadtest.report import Measurement
from loadtest.runner import Run
from tests.support.agent import AgentProcess, free_port


async def pod_start(r: Run, mode: str) -> None:
    """Pod starts on a prewarmed node through a real nix-daemon and an untrusted client:
    realised, warm agent, file:// uncompressed and direct upstream, for web and ml; one round
    of all four per repeat (each round's ratio pairs measurements made side by side)."""
    rounds = [await pod_starts(r.tmp("node-realise"), r.up.url, r.caches.uncompressed, r.keys,
                               {"web": r.envs.web, "ml": r.envs.ml})
              for _ in range(r.opts.repeats)]
    for same in zip(*rounds, strict=True):  # one measurement of each round, in the same order
        first = same[0]
        r.add(replace(first, recompress=mode, samples=[x for m in same for x in m.samples],
                      baseline_samples=[x for m in same for x in m.baseline_samples or []]
                      or None))


def _nodes(r: Run, mode: str, n: int, token: Path | None) -> list[AgentProcess]:
    """N agents, each on its own loopback address (127.0.0.10+i) as on separate nodes; with
    `token`, each knows the others as peers."""
    hosts = [f"127.0.0.{10 + i}" for i in range(n)]
    peer_ports = [free_port(h) for h in hosts]
    peers = [a for h, p in zip(hosts, peer_ports, strict=True)
             for a in ("--peer", f"http://{h}:{p}")] if token else []
    agents: list[AgentProcess] = []
    try:
        for host, port in zip(hosts, peer_ports, strict=True):
            extra = [*peers, "--peer-listen", f"{host}:{port}",
                     "--peer-token-file", str(token)] if token else []
            agents.append(AgentProcess(r.tmp(f"node-{host}"), [r.up.url], r.keys,
                                       "--recompress", mode, "--log-level", "info", *extra,
                                       host=host).start())
    except BaseException:
        for a in agents:
            r.stop(a)
        raise
    return agents


async def peer_rollout(r: Run, mode: str) -> None:
    """N cold nodes with M pods each start the web environment at once, without then with
    peers, in interleaved rounds: upstream bytes per closure byte (N without peers, 1.00 with)
    and the pods' wall time."""
    n, m = r.opts.nodes, r.opts.pods_per_node
    token = r.tmp("peer-token") / "token"
    token.write_text(secrets.token_hex(32) + "\n")
    ratio: dict[bool, list[float]] = {False: [], True: []}
    wall: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(r.opts.repeats):
        for with_peers in (False, True):
            agents = _nodes(r, mode, n, token if with_peers else None)
            try:
                r.up.reset_counts()
                t0 = time.perf_counter()
                copies = await asyncio.gather(*(
                    ld.nix_realises([a.url], r.envs.web.roots[0], r.keys, r.nodes("pods"), m)
                    for a in agents))
                wall[with_peers].append(time.perf_counter() - t0)
            finally:
                for a in agents:
                    r.stop(a)
            for c in copies:
                r.check(c, f"rollout to {n} nodes, {'with' if with_peers else 'no'} peers")
            usage = ld.upstream_usage(r.up, r.caches, r.envs.web.paths)
            ratio[with_peers].append(usage["upstream_bytes_per_unique_nar"]
                                     * usage["unique_nars"] / usage["nar_bytes_unique"])
    r.add(Measurement("rollout to N nodes", f"{n} nodes x {m} pods, with peers: upstream "
                      "bytes / closure bytes", ratio[True], "x", better="lower",
                      recompress=mode, baseline_name="without peers",
                      baseline_samples=ratio[False],
                      target=Target("<=", 1.0, text="= 1.00")))
    r.add(Measurement("rollout to N nodes", f"{n} nodes x {m} pods: wall with peers",
                      wall[True], "s", better="lower", recompress=mode,
                      baseline_name="without peers", baseline_samples=wall[False]))
