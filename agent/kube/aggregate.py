"""The aggregate status of every EnvironmentPrewarm, kept by the agent holding the Lease.

Each agent writes its progress only to its own NodePrewarm (`status.prewarms.<prewarm>`); this
watches all NodePrewarms and folds the entries whose uid matches into the EnvironmentPrewarm's
`status.nodes` (and `status.summary`: nodes per phase), at most every `interval` seconds and
only when something changed. So an agent receives one status event per aggregation, not one
per write of every other node: API load grows linearly with the node count.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
from kubernetes_asyncio.client import CustomObjectsApi
from kubernetes_asyncio.client.exceptions import ApiException

from agent.kube.client import GROUP, PLURAL, VERSION
from agent.kube.watch import Backoff, retry_after

log = logging.getLogger(__name__)
Obj = dict[str, Any]
MERGE_PATCH = "application/merge-patch+json"
NODE_PLURAL = "nodeprewarms"


def folded(prewarm: Obj, nodes: dict[str, Obj]) -> Obj:
    """`status.nodes` of `prewarm` from every node's entries (those about its uid)."""
    name, uid = prewarm["metadata"]["name"], prewarm["metadata"].get("uid")
    out = {}
    for node, entries in nodes.items():
        entry = entries.get(name)
        if entry and entry.get("uid") == uid:
            out[node] = {k: v for k, v in entry.items() if k != "uid"}
    return out


class Aggregator:
    """Watch handler for NodePrewarms, and the loop writing the folded statuses."""

    def __init__(self, custom: CustomObjectsApi, prewarms: Callable[[], list[Obj]], *,
                 interval: float, timeout: float) -> None:
        self.custom, self.prewarms = custom, prewarms
        self.interval, self.timeout = interval, timeout
        self.nodes: dict[str, Obj] = {}  # node -> its NodePrewarm's status.prewarms
        self.dirty = asyncio.Event()

    async def resync(self, objects: list[Obj]) -> None:
        self.nodes = {o["metadata"]["name"]: _entries(o) for o in objects}
        self.dirty.set()

    async def event(self, type_: str, obj: Obj) -> None:
        if type_ == "DELETED":
            self.nodes.pop(obj["metadata"]["name"], None)
        else:
            self.nodes[obj["metadata"]["name"]] = _entries(obj)
        self.dirty.set()

    async def run(self) -> None:
        backoff = Backoff(0.5, 30.0)
        while True:
            await self.dirty.wait()
            self.dirty.clear()
            if not await self._write_all():
                self.dirty.set()  # try again after the backoff
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            await asyncio.sleep(self.interval)  # at most one write per prewarm per interval

    async def _write_all(self) -> bool:
        ok = True
        for prewarm in self.prewarms():
            nodes = folded(prewarm, self.nodes)
            status = prewarm.get("status") or {}
            current = status.get("nodes") or {}
            summary = dict(Counter(e.get("phase", "Pending") for e in nodes.values()))
            if nodes == current and summary == (status.get("summary") or {}):
                continue
            patch = {"metadata": {"uid": prewarm["metadata"].get("uid")}, "status": {
                "nodes": {**{n: None for n in current if n not in nodes}, **nodes},
                "summary": {**{p: None for p in status.get("summary") or {}}, **summary}}}
            ok = await self._patch(prewarm["metadata"]["name"], patch) and ok
        return ok

    async def _patch(self, name: str, patch: Obj) -> bool:
        try:
            await self.custom.patch_cluster_custom_object_status(
                GROUP, VERSION, PLURAL, name, patch, _content_type=MERGE_PATCH,
                _request_timeout=self.timeout)
            return True
        except ApiException as e:
            if e.status in (404, 409):  # deleted (and maybe recreated): the watch says
                return True
            log.warning("status of %s not aggregated: %s %s", name, e.status, e.reason)
            if wait := retry_after((e.headers or {}).get("Retry-After")):
                await asyncio.sleep(wait)
        except (aiohttp.ClientError, TimeoutError) as e:
            log.warning("status of %s not aggregated: %s", name, str(e) or type(e).__name__)
        return False


def _entries(obj: Obj) -> Obj:
    return dict(((obj.get("status") or {}).get("prewarms")) or {})
