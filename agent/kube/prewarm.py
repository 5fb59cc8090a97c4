"""The agent side of EnvironmentPrewarm: prefetch on matching nodes and report per node.

Each agent writes its progress only to its own NodePrewarm (`status.prewarms.<name>`, a JSON
merge patch on the status subresource); the agent holding the Lease folds those into each
EnvironmentPrewarm's `status.nodes` (agent/kube/aggregate.py). A failed write is retried until
it lands or is superseded, and after every relist each node writes its current entries again. Work
restarts when the uid or `metadata.generation` changes (spec edits take effect; status writes
do not bump it). A deadline marks the node Failed "deadline exceeded" but does not cancel the
prefetch: the node still turns Ready when it finishes, so a late node ends up warm.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
from kubernetes_asyncio.client import (
    ApiClient,
    CoreV1Api,
    CustomObjectsApi,
    V1DeleteOptions,
    V1Preconditions,
)
from kubernetes_asyncio.client.exceptions import ApiException

from agent.kube.aggregate import NODE_PLURAL
from agent.kube.client import COMPONENT, GROUP, KIND, PLURAL, VERSION
from agent.kube.taint import Warmth
from agent.kube.types import Job, Prewarmer
from agent.kube.watch import Backoff, retry_after

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


def prewarm_holder(name: str, ref: str) -> str:
    """One holder per ref: a holder pins one closure, and one named after an explicit
    generation stays on it when the live generation moves (agent/flox/watch.py)."""
    return f"prewarm:{name}:{ref}"


def prewarm_of_holder(holder: str) -> str | None:
    """The prewarm name a holder of `prewarm_holder` (or of an older version's
    `prewarm:<name>`) belongs to."""
    kind, _, rest = holder.partition(":")
    name = rest.partition(":")[0]
    return name if kind == "prewarm" and name else None


def finished_for(obj: Obj, ttl: float, now: float) -> bool:
    """Every node that reported has finished the current generation, the last over `ttl`
    seconds ago (ttlSecondsAfterFinished, as for a Job)."""
    gen = int(obj["metadata"].get("generation") or 1)
    entries = list((((obj.get("status") or {}).get("nodes")) or {}).values())
    if not entries or any(e.get("phase") not in ("Ready", "Failed")
                          or int(e.get("observedGeneration") or 0) != gen for e in entries):
        return False
    last = max(parse_rfc3339(e.get("lastUpdate")) or now for e in entries)
    return now - last >= ttl


@dataclass
class Worker:
    uid: str
    generation: int
    task: asyncio.Task[None]


class PrewarmHandler:
    """Watch handler for EnvironmentPrewarm resources: one worker per resource on this node.

    Work is keyed by uid and generation: a resource deleted and recreated under the same name
    (even unseen, during a watch gap) is new work; a status write is not.
    """

    def __init__(self, api: ApiClient, prewarmer: Prewarmer, *, node_name: str,
                 system: str | None, report_interval: float = 2.0,
                 request_timeout: float = 30.0,
                 pin_holders: Callable[[], Iterable[str]] = tuple,
                 warmth: Warmth | None = None) -> None:
        self.custom, self.core = CustomObjectsApi(api), CoreV1Api(api)
        self.prewarmer, self.node_name, self.system = prewarmer, node_name, system
        self.report_interval, self.request_timeout = report_interval, request_timeout
        self.node_labels: dict[str, str] = {}
        self.objects: dict[str, Obj] = {}
        self.workers: dict[str, Worker] = {}
        self.reporters: dict[str, Reporter] = {}  # while the object exists: its node entry
        self.pinned: dict[str, set[str]] = {}  # name -> pin holders taken for it
        self.pin_holders = pin_holders  # every holder in the node's store (survives restarts)
        self.labels_known = False
        self.listeners: list[Callable[[], None]] = []  # told of every change (the aggregator)
        self._retiring: set[Reporter] = set()  # clearing the entry of a deleted resource
        self.warmth = warmth or Warmth()  # which prewarms keep the warm taint on this node
        self._listed = False

    async def resync(self, objects: list[Obj]) -> None:
        names = {o["metadata"]["name"] for o in objects}
        for name in [n for n in self.objects if n not in names]:
            await self._forget(name)
        for obj in objects:
            await self._consider(obj)
        self._listed = True
        self._maybe_all_known()
        self._reconcile_pins()
        await self._prune_entries()
        for reporter in self.reporters.values():
            reporter.resend()  # whatever was lost meanwhile (a restore, a lost write)
        self._changed()

    def _changed(self) -> None:
        for listener in self.listeners:
            listener()

    async def _prune_entries(self) -> None:
        """Remove this node's entries about resources deleted while it was not watching."""
        try:
            own = await self.custom.get_cluster_custom_object(
                GROUP, VERSION, NODE_PLURAL, self.node_name, _request_timeout=self.request_timeout)
            stale = [n for n in ((own.get("status") or {}).get("prewarms") or {})
                     if n not in self.objects]
            if stale:
                await self.custom.patch_cluster_custom_object_status(
                    GROUP, VERSION, NODE_PLURAL, self.node_name,
                    {"status": {"prewarms": dict.fromkeys(stale)}}, _content_type=MERGE_PATCH,
                    _request_timeout=self.request_timeout)
        except ApiException as e:
            if e.status != 404:  # 404: nothing written on this node yet
                log.warning("cannot prune this node's prewarm entries: %s %s", e.status,
                            e.reason)
        except (aiohttp.ClientError, TimeoutError) as e:
            log.warning("cannot prune this node's prewarm entries: %s", e)

    def _reconcile_pins(self) -> None:
        """Release pins of prewarms deleted while this agent was not watching (down, or in a
        watch gap); adopt those of existing ones, so edited-away refs are released too."""
        for holder in self.pin_holders():
            name = prewarm_of_holder(holder)
            if name is None:
                continue
            if name in self.objects:
                self.pinned.setdefault(name, set()).add(holder)
            else:
                log.info("releasing the pin of deleted prewarm %s", name)
                self.prewarmer.unpin(holder)

    async def event(self, type_: str, obj: Obj) -> None:
        name = obj["metadata"]["name"]
        if type_ == "DELETED":
            if _uid(obj) == _uid(self.objects.get(name)):
                await self._forget(name)
        else:
            await self._consider(obj)
        self._changed()

    async def set_node_labels(self, labels: dict[str, str]) -> None:
        if labels != self.node_labels or not self.labels_known:
            self.node_labels, self.labels_known = dict(labels), True
            for obj in list(self.objects.values()):
                await self._consider(obj)
            self._maybe_all_known()

    def _maybe_all_known(self) -> None:
        """Which prewarms select this node is known once both its labels and the prewarms
        have been listed (the watchers start independently): the warm taint may then go."""
        if self.labels_known and self._listed:
            self.warmth.known()

    async def close(self) -> None:
        for name in list(self.workers):
            await self._stop(name)
        for reporter in self.reporters.values():
            reporter.close()

    async def _consider(self, obj: Obj) -> None:
        name, uid = obj["metadata"]["name"], _uid(obj)
        generation = int(obj["metadata"].get("generation") or 1)
        known = self.objects.get(name)
        if known is not None and _uid(known) != uid:
            await self._forget(name, clear=False)  # recreated: the old one's pins go
        self.objects[name] = obj
        reporter = self.reporters.get(name)
        if reporter is None:
            reporter = self.reporters[name] = Reporter(self.custom, self.core, obj,
                                                       self.node_name, self.request_timeout)
        reporter.obj = obj
        selector = (obj.get("spec") or {}).get("nodeSelector")
        if not selector_matches(selector, self.node_labels):
            moved = name in self.workers  # an edit moved it off this node
            if moved:
                await self._stop(name)
                reporter.clear()
            if moved or self.labels_known:  # unknown labels may still match: keep the pins
                self.unpin(name)
                self.warmth.gone(name)
            return
        worker = self.workers.get(name)
        if worker and (worker.uid, worker.generation) == (uid, generation):
            return  # a status write (ours or another node's), not a spec change
        await self._stop(name)
        self.warmth.waiting(name)
        task = asyncio.get_running_loop().create_task(self._worker(obj, reporter))
        self.workers[name] = Worker(uid, generation, task)

    async def _forget(self, name: str, *, clear: bool = True) -> None:
        self.objects.pop(name, None)
        self.warmth.gone(name)
        await self._stop(name)
        if reporter := self.reporters.pop(name, None):
            reporter.close()
            if clear:  # its entry goes too (a successor under the name overwrites it)
                reporter.clear()
                self._retiring = {r for r in self._retiring if not r.done()} | {reporter}
        self.unpin(name)

    def unpin(self, name: str, keep: frozenset[str] = frozenset()) -> None:
        """Release the pins taken for `name`, but those in `keep`."""
        held = self.pinned.pop(name, set())
        for holder in held - keep:
            self.prewarmer.unpin(holder)
        if held & keep:
            self.pinned[name] = held & keep

    async def expire(self, name: str, uid: str, ttl: float) -> None:
        """After this node finished and `ttl` passed: release its pins; delete the resource
        once every node that reported has finished (the last one to see it does)."""
        self.unpin(name)
        while (obj := self.objects.get(name)) is not None and _uid(obj) == uid:
            if finished_for(obj, ttl, time.time()):
                await self._delete(name, uid)
                return
            await asyncio.sleep(min(60.0, max(1.0, ttl)))

    async def _delete(self, name: str, uid: str) -> None:
        try:
            await self.custom.delete_cluster_custom_object(
                GROUP, VERSION, PLURAL, name, body=V1DeleteOptions(
                    preconditions=V1Preconditions(uid=uid)), _request_timeout=self.request_timeout)
            log.info("deleted finished prewarm %s (ttlSecondsAfterFinished)", name)
        except ApiException as e:
            if e.status not in (404, 409):  # gone already, or replaced by a new one
                log.warning("cannot delete finished prewarm %s: %s %s", name, e.status,
                            e.reason)
        except (aiohttp.ClientError, TimeoutError) as e:
            log.warning("cannot delete finished prewarm %s: %s", name, e)

    async def _stop(self, name: str) -> None:
        worker = self.workers.pop(name, None)
        if worker:
            worker.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker.task

    async def _worker(self, obj: Obj, reporter: Reporter) -> None:
        try:
            await PrewarmWork(self, obj, reporter).run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("prewarm worker failed", extra={"fields": {
                "prewarm": obj["metadata"]["name"]}})


class Reporter:
    """Writes this node's entry for one resource (in the node's own NodePrewarm), and Events.

    The latest wanted entry is written in the background, retried with backoff until it lands
    or a newer one supersedes it (a lost Ready write would hold the rollout gate until its
    deadline); each attempt has a timeout. The entry carries the resource's uid, so the
    aggregator never credits it to a same-named successor.
    """

    def __init__(self, custom: CustomObjectsApi, core: CoreV1Api, obj: Obj,
                 node_name: str, request_timeout: float = 30.0) -> None:
        self.custom, self.core, self.obj, self.node = custom, core, obj, node_name
        self.name, self.uid = obj["metadata"]["name"], _uid(obj)
        self.timeout = request_timeout
        self.wanted: Obj | None = None  # the patch body to land
        self.landed: Obj | None = None
        self._task: asyncio.Task[None] | None = None

    def status(self, phase: str, jobs: list[Job], message: str = "",
               node_store: Obj | None = None) -> None:
        entry: Obj = {"uid": self.uid, "phase": phase, **_totals(jobs), "message": message,
                      "lastUpdate": now_rfc3339(),
                      "observedGeneration": int(self.obj["metadata"].get("generation") or 1)}
        if node_store is not None:
            entry["nodeStore"] = node_store
        self._want(entry)

    def clear(self) -> None:
        self._want(None)

    def resend(self) -> None:
        self.landed = None
        if self.wanted is not None:
            self._kick()

    def close(self) -> None:
        if self._task:
            self._task.cancel()

    def done(self) -> bool:
        return self._task is None or self._task.done()

    def _want(self, entry: Obj | None) -> None:
        self.wanted = {"status": {"prewarms": {self.name: entry}}}
        self._kick()

    def _kick(self) -> None:
        if self.done():
            self._task = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        backoff = Backoff(0.5, 30.0)
        while self.wanted is not None and self.wanted is not self.landed:
            body = self.wanted
            try:
                await self.custom.patch_cluster_custom_object_status(
                    GROUP, VERSION, NODE_PLURAL, self.node, body, _content_type=MERGE_PATCH,
                    _request_timeout=self.timeout)
            except ApiException as e:
                if e.status == 404 and await self._create_node_object():
                    continue
                log.warning("status patch of %s failed: %s %s; retrying", self.name,
                            e.status, e.reason)
                wait = retry_after((e.headers or {}).get("Retry-After"))
                await asyncio.sleep(max(wait, backoff.next_delay()))
                continue
            except (aiohttp.ClientError, TimeoutError) as e:
                log.warning("status patch of %s failed: %s; retrying", self.name,
                            str(e) or type(e).__name__)
                await asyncio.sleep(backoff.next_delay())
                continue
            self.landed = body
            backoff.reset()

    async def _create_node_object(self) -> bool:
        """Create this node's NodePrewarm (first write on this node), owned by the Node so it
        goes when the node does; True when it exists."""
        meta: Obj = {"name": self.node}
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "NodePrewarm", "metadata": meta}
        try:
            nodes = await self.core.list_node(field_selector=f"metadata.name={self.node}",
                                              _request_timeout=self.timeout)
            meta["ownerReferences"] = [
                {"apiVersion": "v1", "kind": "Node", "name": n.metadata.name,
                 "uid": n.metadata.uid} for n in nodes.items]
        except (ApiException, aiohttp.ClientError, TimeoutError) as e:
            log.warning("NodePrewarm %s created without its owner: %s", self.node, e)
        try:
            await self.custom.create_cluster_custom_object(GROUP, VERSION, NODE_PLURAL, body,
                                                           _request_timeout=self.timeout)
        except ApiException as e:
            return e.status == 409
        except (aiohttp.ClientError, TimeoutError):
            return False
        return True

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
        try:  # best effort: the status entry carries the same message
            await self.core.create_namespaced_event(EVENT_NAMESPACE, event,
                                                    _request_timeout=self.timeout)
        except (ApiException, aiohttp.ClientError, TimeoutError) as e:
            log.warning("cannot create event for %s: %s", self.name, e)


def _uid(obj: Obj | None) -> str:
    return str(((obj or {}).get("metadata") or {}).get("uid") or "")


class PrewarmWork:
    """One generation of one resource on this node: Pending -> Pulling -> Ready | Failed."""

    def __init__(self, handler: PrewarmHandler, obj: Obj, reporter: Reporter) -> None:
        self.h, self.obj = handler, obj
        self.spec: Obj = obj.get("spec") or {}
        self.name: str = obj["metadata"]["name"]
        self.report = reporter

    async def run(self) -> None:
        refs = self.spec.get("environments") or []
        holders = {r: prewarm_holder(self.name, r) for r in refs if self.spec.get("pin", True)}
        self.report.status("Pending", [])
        self.h.unpin(self.name, keep=frozenset(holders.values()))  # edited-away refs' pins go
        self.h.pinned.setdefault(self.name, set()).update(holders.values())
        try:
            jobs = await self._start_jobs(holders)
        except Exception as e:
            await self._fail([], f"cannot start prefetch: {e}")
            return
        late = await self._follow(jobs, parse_rfc3339(self.spec.get("deadline")))
        failed = [j for j in jobs if j.state == "failed"]
        if failed:
            await self._fail(jobs, "; ".join(f"{j.ref}: {j.error or 'failed'}" for j in failed))
        else:
            message = "ready after the deadline" if late else ""
            self.report.status("Ready", jobs, message)
            # Realised into the node's own Nix store (agent/node): reported once settled.
            node_status = getattr(self.h.prewarmer, "node_status", None)
            if node_status is not None and holders:
                statuses = [await node_status(h) for h in holders.values()]
                self.report.status("Ready", jobs, message, _combined(statuses))
            self.h.warmth.ready(self.name)  # after realisation: warm means realised too
        ttl = self.spec.get("ttlSecondsAfterFinished")
        if ttl is not None:
            await asyncio.sleep(ttl)
            await self.h.expire(self.name, _uid(self.obj), float(ttl))

    async def _start_jobs(self, holders: dict[str, str]) -> list[Job]:
        system = self.spec.get("system") or self.h.system
        return [await self.h.prewarmer.prewarm(ref, pin=holders.get(ref), system=system)
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
                    self.report.status("Pulling", jobs)  # wakes every agent's watch
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
        self.report.status("Failed", jobs, message)
        await self.report.warn(message)


def _combined(statuses: list[Obj]) -> Obj:
    """One nodeStore entry for a prewarm's environments: realised when all are."""
    states = [s["state"] for s in statuses if s["state"] != "rooted"]
    return {"realised": all(s["realised"] for s in statuses),
            "rootedBytes": sum(int(s["rootedBytes"]) for s in statuses),
            "state": states[0] if states else "rooted"}


def _totals(jobs: list[Job]) -> dict[str, int]:
    return {"pathsDone": sum(j.progress.paths_done for j in jobs),
            "pathsTotal": sum(j.progress.paths_total for j in jobs),
            "bytesDone": sum(j.progress.bytes_done for j in jobs),
            "bytesTotal": sum(j.progress.bytes_total for j in jobs)}
