"""Scenario "pod start on a prewarmed node": what the containerd shim waits for.

A pod start is the shim's untrusted `nix-store -r ROOT` against the node's nix-daemon (a real
daemon on a chroot store, REFERENCE §6). For the web and ml closures, four nodes, each a fresh
daemon:
  realised      the agent realised the pinned closure into the node's store beforehand
                (--realise-into-node pinned, through the node-relay): nothing to copy;
  warm agent    the daemon substitutes from an agent that has the closure;
  file://       the daemon substitutes from an uncompressed file:// cache (the local limit);
  direct        the daemon substitutes from the upstream itself.
Target: the realised start under 0.1 s whatever the closure's size.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

from loadtest.report import Measurement
from loadtest.report import Target as Goal
from tests.support.agent import AgentProcess
from tests.support.nixdaemon import NixDaemon, NodeRelay, scratch_dir
from tests.support.nixenv import Closure

SCENARIO = "pod start on a prewarmed node"
REALISED_GOAL = Goal("<=", 0.1, text="< 0.1 s")


@contextlib.contextmanager
def node(substituters: list[str], keys: list[str]) -> Iterator[NixDaemon]:
    with scratch_dir("loadtest-node-") as d, NixDaemon(d, substituters=substituters,
                                                       keys=keys) as daemon:
        yield daemon


def pod_start(daemon: NixDaemon, root: str) -> float:
    """Seconds for the shim's untrusted realisation of `root`; raises if it fails."""
    started = time.perf_counter()
    proc = daemon.realise(root)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"pod start of {root} failed: {proc.stderr[-2000:]}")
    return elapsed


async def _realised(agent: AgentProcess, roots: list[str], timeout: float = 1800) -> None:
    """Prewarm `roots` pinned and wait until the agent reports every holder rooted."""
    async with agent.unix_session() as s:
        for root in roots:
            async with s.post("http://agent/v1/prewarm",
                              json={"store_paths": [root], "pin": True}) as r:
                r.raise_for_status()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            async with s.get("http://agent/v1/status") as r:
                node_store = (await r.json())["node_store"]
            states = list(node_store.get("holders", {}).values())
            if len(states) == len(roots) and all(st == "rooted" for st in states):
                return
            if node_store.get("state") == "error" or any(st.startswith("failed")
                                                         for st in states):
                raise RuntimeError(f"realisation failed: {node_store}")
            await asyncio.sleep(0.2)
    raise RuntimeError(f"closures not realised after {timeout}s")


async def pod_starts(workdir: Path, upstream_url: str, file_cache: Path, keys: list[str],
                     closures: dict[str, Closure]) -> list[Measurement]:
    """The four nodes for each closure of `closures` (name -> closure); one measurement each."""
    out: list[Measurement] = []
    roots = {name: c.roots[0] for name, c in closures.items()}
    timings: dict[tuple[str, str], float] = {}
    with scratch_dir("loadtest-node-") as d:
        agent = AgentProcess(workdir / "agent-realise", [upstream_url], keys,
                             "--realise-into-node", "pinned",
                             "--nix-daemon-socket", str(d / "relay" / "socket"),
                             "--node-gcroots-dir", str(workdir / "gcroots"),
                             "--log-level", "info")
        daemon = NixDaemon(d, substituters=[agent.url], keys=keys)
        with daemon, NodeRelay(daemon, d / "relay" / "socket"), agent:
            await _realised(agent, list(roots.values()))
            for name, root in roots.items():
                timings[("realised", name)] = pod_start(daemon, root)
                with node([agent.url], keys) as fresh:
                    timings[("warm agent", name)] = pod_start(fresh, root)
    for name, root in roots.items():
        with node([f"file://{file_cache.resolve()}"], keys) as fresh:
            timings[("file:// uncompressed", name)] = pod_start(fresh, root)
        with node([upstream_url], keys) as fresh:
            timings[("direct upstream", name)] = pod_start(fresh, root)
    hows = ("realised", "warm agent", "file:// uncompressed", "direct upstream")
    for (how, name), seconds in sorted(timings.items(),
                                       key=lambda kv: (kv[0][1], hows.index(kv[0][0]))):
        c = closures[name]
        out.append(Measurement(
            SCENARIO, f"{name} closure, {how}", [seconds], "s", better="lower",
            baseline_name="file:// uncompressed" if how != "file:// uncompressed" else None,
            baseline_samples=[timings[("file:// uncompressed", name)]]
            if how != "file:// uncompressed" else None,
            target=REALISED_GOAL if how == "realised" else None,
            details={"paths": len(c.paths), "nar_bytes": c.total_nar_size}))
    return out
