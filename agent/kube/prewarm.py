"""The agent side of EnvironmentPrewarm: prefetch on matching nodes and report per node.

Each agent writes only `status.nodes.<its node>` with a JSON merge patch on the status
subresource, so agents never overwrite each other. Work restarts when `metadata.generation`
changes (spec edits take effect; status writes do not bump it). A deadline marks the node
Failed "deadline exceeded" but does not cancel the prefetch: the node still turns Ready when
it finishes, so a late node ends up warm.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from kubernetes_asyncio.client import ApiClient, CoreV1Api, CustomObjectsApi
from kubernetes_asyncio.client.exceptions import ApiException

from agent.kube.client import COMPONENT, GROUP, KIND, PLURAL, VERSION
from agent.kube.taint import Warmth
from agent.kube.types import Job, Prewarmer

log = logging.getLogger(__name__)
Obj = dict[str, Any]
MERGE_PATCH = "application/merge-patch+json"
DEADLINE_EXCEEDED = "deadline exceeded"
EVENT_NAMESPACE = "default"  # where core/v1 Events about cluster-scoped objects live


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: str | None) -> float | None:
    """Unix time of an RFC 3339 timestamp (None when absent or unparsable)."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        log.warning("ignoring unparsable deadline %r", text)
        return None


def selector_matches(selector: dict[str, str] | None, labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def prewarm_holder(name: str) -> str:
    return f"prewarm:{name}"


class PrewarmHandler:
    """Watch handler for EnvironmentPrewarm resources: one worker per resource."""

    def __init__(self, api: ApiClient, prewarmer: Prewarmer, *, node_name: str,
                 system: str | None, report_interval: float = 2.0,
                 warmth: Warmth | None = None) -> None:
        self.warmth = warmth or Warmth()  # which prewarms keep the warm taint on this node
        self.custom, self.core = CustomObjectsApi(api), CoreV1Api(api)
        self.prewarmer, self.node_name, self.system = prewarmer, node_name, system
        self.report_interval = report_interval
        self.node_labels: dict[str, str] = {}
        self.objects: dict[str, Obj] = {}
        self.workers: dict[str, tuple[int, asyncio.Task[None]]] = {}

    async def resync(self, objects: list[Obj]) -> None:
        names = {o["metadata"]["name"] for o in objects}
        for name in [n for n in self.objects if n not in names]:
            await self._forget(name)
        for obj in objects:
            await self._consider(obj)
        self.warmth.known()

    async def event(self, type_: str, obj: Obj) -> None:
        if type_ == "DELETED":
            await self._forget(obj["metadata"]["name"])
        else:
            await self._consider(obj)

    async def set_node_labels(self, labels: dict[str, str]) -> None:
        if labels != self.node_labels:
            self.node_labels = dict(labels)
            for obj in list(self.objects.values()):
                await self._consider(obj)

    async def close(self) -> None:
        for name in list(self.workers):
            await self._stop(name)

    async def _consider(self, obj: Obj) -> None:
        name = obj["metadata"]["name"]
        generation = int(obj["metadata"].get("generation") or 1)
        self.objects[name] = obj
        selector = (obj.get("spec") or {}).get("nodeSelector")
        if not selector_matches(selector, self.node_labels):
            self.warmth.gone(name)
            if name in self.workers:  # an edit moved it off this node
                await self._stop(name)
                self.prewarmer.unpin(prewarm_holder(name))
                await self._reporter(obj).clear()
            return
        if name in self.workers and self.workers[name][0] == generation:
            return  # a status write (ours or another node's), not a spec change
        await self._stop(name)
        self.warmth.waiting(name)
        task = asyncio.get_running_loop().create_task(self._worker(obj))
        self.workers[name] = (generation, task)

    async def _forget(self, name: str) -> None:
        self.objects.pop(name, None)
        self.warmth.gone(name)
        await self._stop(name)
        self.prewarmer.unpin(prewarm_holder(name))

    async def _stop(self, name: str) -> None:
        _, task = self.workers.pop(name, (0, None))
        if task:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _reporter(self, obj: Obj) -> Reporter:
        return Reporter(self.custom, self.core, obj, self.node_name)

    async def _worker(self, obj: Obj) -> None:
        try:
            await PrewarmWork(self, obj).run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("prewarm worker failed", extra={"fields": {
                "prewarm": obj["metadata"]["name"]}})


class Reporter:
    """Writes this node's entry of one resource's status, and Events."""

    def __init__(self, custom: CustomObjectsApi, core: CoreV1Api, obj: Obj,
                 node_name: str) -> None:
        self.custom, self.core, self.obj, self.node = custom, core, obj, node_name
        self.name = obj["metadata"]["name"]

    async def status(self, phase: str, jobs: list[Job], message: str = "",
                     node_store: Obj | None = None) -> None:
        entry: Obj = {"phase": phase, **_totals(jobs), "message": message,
                      "lastUpdate": now_rfc3339(),
                      "observedGeneration": int(self.obj["metadata"].get("generation") or 1)}
        if node_store is not None:
            entry["nodeStore"] = node_store
        await self._patch({"status": {"nodes": {self.node: entry}}})

    async def clear(self) -> None:
        await self._patch({"status": {"nodes": {self.node: None}}})

    async def _patch(self, body: Obj) -> None:
        try:
            await self.custom.patch_cluster_custom_object_status(
                GROUP, VERSION, PLURAL, self.name, body, _content_type=MERGE_PATCH)
        except ApiException as e:
            # 404: deleted meanwhile (the watch will tell us); anything else: next report retries
            level = logging.DEBUG if e.status == 404 else logging.WARNING
            log.log(level, "status patch of %s failed: %s %s", self.name, e.status, e.reason)

    async def warn(self, message: str) -> None:
        meta = self.obj["metadata"]
        ts = now_rfc3339()
        event = {
            "metadata": {"name": f"{self.name}.{uuid.uuid4().hex[:16]}",
                         "namespace": EVENT_NAMESPACE},
            "involvedObject": {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
                               "name": self.name, "uid": meta.get("uid"),
                               "resourceVersion": meta.get("resourceVersion")},
            "reason": "PrewarmFailed", "message": f"node {self.node}: {message}",
            "type": "Warning", "count": 1, "firstTimestamp": ts, "lastTimestamp": ts,
            "source": {"component": COMPONENT, "host": self.node},
            "reportingComponent": COMPONENT, "reportingInstance": self.node,
        }
        try:
            await self.core.create_namespaced_event(EVENT_NAMESPACE, event)
        except ApiException as e:
            log.warning("cannot create event for %s: %s %s", self.name, e.status, e.reason)


class PrewarmWork:
    """One generation of one resource on this node: Pending -> Pulling -> Ready | Failed."""

    def __init__(self, handler: PrewarmHandler, obj: Obj) -> None:
        self.h, self.obj = handler, obj
        self.spec: Obj = obj.get("spec") or {}
        self.name: str = obj["metadata"]["name"]
        self.report = handler._reporter(obj)

    async def run(self) -> None:
        holder = prewarm_holder(self.name)
        await self.report.status("Pending", [])
        self.h.prewarmer.unpin(holder)  # pins of an edited-away generation must not linger
        try:
            jobs = await self._start_jobs(holder)
        except Exception as e:
            await self._fail([], f"cannot start prefetch: {e}")
            return
        late = await self._follow(jobs, parse_rfc3339(self.spec.get("deadline")))
        failed = [j for j in jobs if j.state == "failed"]
        if failed:
            await self._fail(jobs, "; ".join(f"{j.ref}: {j.error or 'failed'}" for j in failed))
        else:
            message = "ready after the deadline" if late else ""
            await self.report.status("Ready", jobs, message)
            # Realised into the node's own Nix store (agent/node): reported once settled.
            node_status = getattr(self.h.prewarmer, "node_status", None)
            if node_status is not None and self.spec.get("pin", True):
                await self.report.status("Ready", jobs, message, await node_status(holder))
            self.h.warmth.ready(self.name)  # after realisation: warm means realised too

    async def _start_jobs(self, holder: str) -> list[Job]:
        pin = holder if self.spec.get("pin", True) else None
        system = self.spec.get("system") or self.h.system
        return [await self.h.prewarmer.prewarm(ref, pin=pin, system=system)
                for ref in self.spec.get("environments") or []]

    async def _follow(self, jobs: list[Job], deadline: float | None) -> bool:
        """Report progress until every job ends; True when the deadline passed first."""
        waiter = asyncio.ensure_future(asyncio.gather(*(j.wait() for j in jobs)))
        late, last = False, None
        try:
            while not waiter.done():
                remaining = None if deadline is None else deadline - time.time()
                if remaining is not None and remaining <= 0 and not late:
                    late = True
                    p = _totals(jobs)
                    await self._fail(jobs, f"{DEADLINE_EXCEEDED} ({p['pathsDone']}/"
                                           f"{p['pathsTotal']} paths)")
                elif not late and _totals(jobs) != last:
                    last = _totals(jobs)  # unchanged progress is not rewritten: every write
                    await self.report.status("Pulling", jobs)  # wakes every agent's watch
                timeout = self.h.report_interval
                if remaining is not None and remaining > 0:
                    timeout = min(timeout, remaining)
                await asyncio.wait({waiter}, timeout=timeout)
        finally:
            waiter.cancel()  # only stops waiting; the prefetch jobs keep running
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await waiter
        return late

    async def _fail(self, jobs: list[Job], message: str) -> None:
        log.warning("prewarm %s failed on this node: %s", self.name, message)
        await self.report.status("Failed", jobs, message)
        await self.report.warn(message)


def _totals(jobs: list[Job]) -> dict[str, int]:
    return {"pathsDone": sum(j.progress.paths_done for j in jobs),
            "pathsTotal": sum(j.progress.paths_total for j in jobs),
            "bytesDone": sum(j.progress.bytes_done for j in jobs),
            "bytesTotal": sum(j.progress.bytes_total for j in jobs)}
