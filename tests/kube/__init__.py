"""Shared helpers for the Kubernetes tests: a recording Prewarmer and object builders.

The agent talks to `tests.support.kubeapi.FakeKubeAPI` through the real kubernetes-asyncio
client; only the prefetcher behind the `Prewarmer` contract is replaced, by `FakePrewarmer`,
whose jobs can be told to succeed, fail or hold (and report progress) per ref.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.kube.agent import KubeOptions, run_kubernetes
from agent.kube.watch import WatchOptions

Obj = dict[str, Any]

# short intervals so the suite stays fast; the code paths are the production ones
FAST = KubeOptions(watch=WatchOptions(timeout_seconds=30, read_timeout=1.0, request_timeout=5.0,
                                      page_size=2, backoff_base=0.2, backoff_cap=0.5,
                                      min_stream_seconds=0.05),
                   report_interval=0.1, request_timeout=0.5, aggregate_interval=0.1,
                   lease_duration=1.0, lease_renew=0.2)
BOOKMARK_INTERVAL = 0.2  # the fixture's server: well within FAST's read timeout


@dataclass
class FakeProgress:
    paths_done: int = 0
    paths_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0


_ids = itertools.count(1)


@dataclass
class FakeJob:
    ref: str
    id: str = field(default_factory=lambda: f"job-{next(_ids)}")
    state: str = "running"
    error: str | None = None
    progress: FakeProgress = field(default_factory=lambda: FakeProgress(0, 10, 0, 1000))
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait(self) -> None:
        await self.done.wait()

    def advance(self, paths: int, nbytes: int) -> None:
        self.progress.paths_done, self.progress.bytes_done = paths, nbytes

    def finish(self, error: str | None = None) -> None:
        if error is None:
            self.advance(self.progress.paths_total, self.progress.bytes_total)
        self.state, self.error = ("failed", error) if error else ("succeeded", None)
        self.done.set()


class FakePrewarmer:
    """Records calls. By default a job succeeds at once; `hold` keeps it running, `fail_with`
    makes it fail with that error."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None, str | None]] = []
        self.unpins: list[str] = []
        self.pins: dict[str, set[str]] = {}  # holder -> refs
        self.jobs: dict[str, FakeJob] = {}  # running jobs, joined by identical requests
        self.hold: set[str] = set()
        self.fail_with: dict[str, str] = {}

    async def prewarm(self, ref: str, *, pin: str | None = None,
                      system: str | None = None) -> FakeJob:
        self.calls.append((ref, pin, system))
        if pin:
            self.pins.setdefault(pin, set()).add(ref)
        job = self.jobs.get(ref)
        if job is None or job.done.is_set():
            job = self.jobs[ref] = FakeJob(ref)
            if ref in self.fail_with:
                job.finish(self.fail_with[ref])
            elif ref not in self.hold:
                job.finish()
        return job

    def unpin(self, holder: str) -> None:
        self.unpins.append(holder)
        self.pins.pop(holder, None)

    def refs(self) -> list[str]:
        return [c[0] for c in self.calls]


async def eventually(pred: Callable[[], Any], timeout: float = 5.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or pred}")
        await asyncio.sleep(0.02)


async def stays(pred: Callable[[], Any], duration: float = 0.4) -> None:
    """Assert `pred` holds for a while (for "nothing happens" checks)."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        assert pred()
        await asyncio.sleep(0.02)


def node(name: str, labels: dict[str, str] | None = None, flox: bool = True) -> Obj:
    lab = {"kubernetes.io/hostname": name, **(labels or {})}
    if flox:
        lab["flox.dev/enabled"] = "true"
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": lab}}


def pod(name: str, node_name: str | None, ref: str | None, *, ns: str = "default",
        runtime: str | None = "flox", phase: str = "Running") -> Obj:
    meta: Obj = {"name": name, "namespace": ns, "labels": {"app": name}}
    if ref:
        meta["annotations"] = {"flox.dev/environment": ref}
    spec: Obj = {"containers": [{"name": "main", "image": "flox/empty:1.0.0"}]}
    if node_name:
        spec["nodeName"] = node_name
    if runtime:
        spec["runtimeClassName"] = runtime
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec,
            "status": {"phase": phase}}


def deployment(name: str, ref: str, *, node_selector: dict[str, str] | None = None,
               ns: str = "default") -> Obj:
    spec: Obj = {"runtimeClassName": "flox",
                 "containers": [{"name": "main", "image": "flox/empty:1.0.0"}]}
    if node_selector:
        spec["nodeSelector"] = node_selector
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name},
                                               "annotations": {"flox.dev/environment": ref}},
                                  "spec": spec}}}


def prewarm_resource(name: str, refs: list[str], *, selector: dict[str, str] | None = None,
                     pin: bool = True, deadline: str | None = None) -> Obj:
    spec: Obj = {"environments": refs, "nodeSelector": selector or {}, "pin": pin}
    if deadline:
        spec["deadline"] = deadline
    return {"apiVersion": "nodecache.flox.dev/v1alpha1", "kind": "EnvironmentPrewarm",
            "metadata": {"name": name}, "spec": spec}


class Agents:
    """Runs `run_kubernetes` tasks (one per node) in the test's loop; cancels them at the end."""

    def __init__(self, kubeconfig: str) -> None:
        self.kubeconfig = kubeconfig
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, node_name: str, prewarmer: FakePrewarmer | None = None,
              options: KubeOptions = FAST, system: str | None = "x86_64-linux"
              ) -> FakePrewarmer:
        prewarmer = prewarmer or FakePrewarmer()
        self.tasks.append(asyncio.get_running_loop().create_task(run_kubernetes(
            prewarmer, node_name=node_name, kubeconfig=self.kubeconfig, system=system,
            options=options, pin_holders=lambda: list(prewarmer.pins))))
        return prewarmer

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        results = await asyncio.gather(*self.tasks, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                raise r
