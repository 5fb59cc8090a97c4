"""API load of the agents' Kubernetes side: N node agents (the real `run_kubernetes`, all in
this process) against the in-process API server (tests/support/kubeapi.py), one
EnvironmentPrewarm selecting every node. Reports, per node and per prewarm, the API requests
the agents made and the watch events the server delivered, from the prewarm's creation until
every node is Ready. The target is flat in N; each node's status writes reaching every other
node's watch make it grow with N today.

    .venv/bin/python -m loadtest.kube_load --nodes 10 50 200 [--steps 4] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.kube.agent import KubeOptions, run_kubernetes
from agent.kube.watch import WatchOptions
from tests.support.kubeapi import FakeKubeAPI

WATCHERS_PER_AGENT = 8  # node, pods, prewarms, five workload kinds
OPTIONS = KubeOptions(watch=WatchOptions(), report_interval=0.25)


@dataclass
class Progress:
    paths_done: int = 0
    paths_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0


@dataclass
class SteppedJob:
    """A prefetch that advances `steps` times, `step` seconds apart, then succeeds."""

    ref: str
    steps: int
    step: float
    id: str = "job"
    state: str = "running"
    error: str | None = None
    progress: Progress = field(default_factory=Progress)

    def __post_init__(self) -> None:
        self.progress = Progress(0, self.steps, 0, self.steps * 1000)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        for i in range(1, self.steps + 1):
            await asyncio.sleep(self.step)
            self.progress.paths_done, self.progress.bytes_done = i, i * 1000
        self.state = "succeeded"

    async def wait(self) -> None:
        await self._task


class SteppedPrewarmer:
    def __init__(self, steps: int, step: float) -> None:
        self.steps, self.step = steps, step

    async def prewarm(self, ref: str, *, pin: str | None = None,
                      system: str | None = None) -> SteppedJob:
        return SteppedJob(ref, self.steps, self.step)

    def unpin(self, holder: str) -> None:
        pass


async def _until(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _ready(api: FakeKubeAPI, n: int) -> bool:
    nodes = ((api.get("EnvironmentPrewarm", "load").get("status") or {}).get("nodes")) or {}
    return sum(1 for e in nodes.values() if e.get("phase") == "Ready") == n


async def measure(n: int, steps: int, step: float) -> dict[str, float]:
    with FakeKubeAPI() as api, tempfile.TemporaryDirectory() as tmp:
        config = str(api.write_kubeconfig(Path(tmp) / "kubeconfig"))
        for i in range(n):
            api.create({"apiVersion": "v1", "kind": "Node", "metadata": {
                "name": f"node-{i}", "labels": {"flox.dev/enabled": "true"}}})
        agents = [asyncio.get_running_loop().create_task(run_kubernetes(
            SteppedPrewarmer(steps, step), node_name=f"node-{i}", kubeconfig=config,
            system="x86_64-linux", options=OPTIONS)) for i in range(n)]
        try:
            await _until(lambda: api.open_watches() == n * WATCHERS_PER_AGENT + 1, 120,
                         "every watch open")  # + the lease holder's NodePrewarm watch
            requests, events, started = len(api.requests), api.events_sent, time.monotonic()
            api.create({"apiVersion": "nodecache.flox.dev/v1alpha1",
                        "kind": "EnvironmentPrewarm", "metadata": {"name": "load"},
                        "spec": {"environments": ["acme/web"]}})
            await _until(lambda: _ready(api, n), 300, "every node Ready")
            seconds = time.monotonic() - started
            await asyncio.sleep(1.0)  # the last writes' events reach everyone
            return {"nodes": n, "seconds_to_ready": round(seconds, 2),
                    "requests_per_node": round((len(api.requests) - requests) / n, 1),
                    "watch_events_per_node": round((api.events_sent - events) / n, 1)}
        finally:
            for task in agents:
                task.cancel()
            await asyncio.gather(*agents, return_exceptions=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.kube_load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, nargs="+", default=[10, 50, 200])
    p.add_argument("--steps", type=int, default=4, help="progress steps of each node's job")
    p.add_argument("--step", type=float, default=0.3, help="seconds between steps")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # retried status writes under load are expected
    results = []
    print(f"{'nodes':>6} {'s to Ready':>11} {'requests/node':>14} {'watch events/node':>18}")
    for n in args.nodes:
        r = asyncio.run(measure(n, args.steps, args.step))
        results.append(r)
        print(f"{r['nodes']:>6} {r['seconds_to_ready']:>11} {r['requests_per_node']:>14} "
              f"{r['watch_events_per_node']:>18}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
