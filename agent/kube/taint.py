"""The startup taint: keep a node unschedulable until it is warm.

A node pool registers its nodes with a taint (`--warm-taint`, e.g.
`flox.dev/node-cache-warming=true:NoSchedule`). The agent on the node removes it once every
EnvironmentPrewarm selecting the node is Ready here (`Warmth`, fed by agent.kube.prewarm), or
after `--warm-taint-timeout` so a broken upstream never strands a node, and says which and why
in an Event on the Node.

The removal is a JSON patch that `test`s each taint at its index before removing it: if
anything changed the node's taints since we read them (a controller adding or removing one),
the patch fails as a whole (422) instead of removing the wrong entry, and we read again.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
from kubernetes_asyncio.client import CoreV1Api
from kubernetes_asyncio.client.exceptions import ApiException

from agent.kube.client import COMPONENT

log = logging.getLogger(__name__)
Obj = dict[str, Any]
REASON = "WarmTaintRemoved"
EVENT_NAMESPACE = "default"  # where Events about cluster-scoped objects (a Node) live
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=15)
RETRY_MIN, RETRY_MAX = 0.5, 30.0


class Warmth:
    """Which EnvironmentPrewarms selecting this node are not Ready here yet.

    The prewarm code reports `waiting(key)` when a prewarm starts applying to this node,
    `ready(key)` when it is Ready here, `gone(key)` when it no longer applies, and `known()`
    once it has seen every prewarm (its first complete list, with the node's labels known).
    """

    def __init__(self) -> None:
        self._known = False
        self._waiting: set[str] = set()
        self._warm = asyncio.Event()

    def known(self) -> None:
        self._known = True
        self._update()

    def waiting(self, key: str) -> None:
        self._waiting.add(key)
        self._update()

    def ready(self, key: str) -> None:
        self._waiting.discard(key)
        self._update()

    gone = ready  # either way it no longer holds the node back

    def not_ready(self) -> list[str]:
        return sorted(self._waiting)

    async def wait(self) -> None:
        await self._warm.wait()

    def _update(self) -> None:
        if self._known and not self._waiting:
            self._warm.set()
        else:
            self._warm.clear()


@dataclass
class WarmTaint:
    core: CoreV1Api
    node_name: str
    key: str  # the taint key; every taint with it is removed, whatever its value and effect
    timeout: float
    warmth: Warmth

    async def run(self) -> None:
        """Wait until warm (or the timeout), then remove the taint and post an Event."""
        node = await self._read_until_ok()
        if node is None or not taint_indices(node, self.key):
            log.info("node has no warm taint %s: nothing to remove", self.key)
            return
        message = await self._wait_warm()
        node = await self.remove()
        if node is not None:
            log.info("removed warm taint: %s", message, extra={"fields": {"taint": self.key}})
            await self._event(node, message)

    async def _wait_warm(self) -> str:
        """Why the taint goes now: warm, or the timeout and what was still missing."""
        try:
            async with asyncio.timeout(self.timeout):
                await self.warmth.wait()
            return f"removed taint {self.key}: every EnvironmentPrewarm selecting this node " \
                   f"is Ready here"
        except TimeoutError:
            late = ", ".join(self.warmth.not_ready()) or "the prewarms could not be listed"
            return f"removed taint {self.key} after the {self.timeout:g}s timeout; not Ready " \
                   f"here: {late}"

    async def remove(self) -> Obj | None:
        """Remove every taint with our key; the node as read before the removal (None when the
        node is gone or has no such taint)."""
        delay = RETRY_MIN
        while True:
            node = await self._read_until_ok()
            indices = taint_indices(node, self.key) if node else []
            if not indices:
                return None
            try:
                await self.core.patch_node(self.node_name, removal_patch(node, indices),
                                           _request_timeout=REQUEST_TIMEOUT)
                return node
            except ApiException as e:
                delay = await _back_off(delay, f"cannot remove the warm taint: {_why(e)}")
            except (aiohttp.ClientError, TimeoutError) as e:
                delay = await _back_off(delay, f"cannot remove the warm taint: {e!r}")

    async def _read_until_ok(self) -> Obj | None:
        """This node as the server stores it (None when it does not exist)."""
        delay = RETRY_MIN
        while True:
            try:
                resp = await self.core.read_node(self.node_name, _preload_content=False,
                                                 _request_timeout=REQUEST_TIMEOUT)
                try:
                    body = await resp.read()
                finally:
                    resp.release()
                if resp.status == 404:
                    log.warning("node %s not found: cannot remove its warm taint", self.node_name)
                    return None
                if resp.status == 200:
                    node: Obj = json.loads(body)
                    return node
                reason = f"HTTP {resp.status}: {body[:200].decode(errors='replace')}"
            except (aiohttp.ClientError, TimeoutError) as e:
                reason = repr(e)
            delay = await _back_off(delay, f"cannot read node {self.node_name}: {reason}")

    async def _event(self, node: Obj, message: str) -> None:
        ts = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "metadata": {"generateName": f"{self.node_name}.", "namespace": EVENT_NAMESPACE},
            "involvedObject": {"apiVersion": "v1", "kind": "Node", "name": self.node_name,
                               "uid": node["metadata"].get("uid")},
            "reason": REASON, "message": message, "type": "Normal", "count": 1,
            "firstTimestamp": ts, "lastTimestamp": ts,
            "source": {"component": COMPONENT, "host": self.node_name},
            "reportingComponent": COMPONENT, "reportingInstance": self.node_name,
        }
        try:
            await self.core.create_namespaced_event(EVENT_NAMESPACE, event,
                                                    _request_timeout=REQUEST_TIMEOUT)
        except (ApiException, aiohttp.ClientError, TimeoutError) as e:
            reason = _why(e) if isinstance(e, ApiException) else repr(e)
            log.warning("cannot post the %s event on node %s: %s", REASON, self.node_name, reason)


def taint_indices(node: Obj, key: str) -> list[int]:
    taints = (node.get("spec") or {}).get("taints") or []
    return [i for i, t in enumerate(taints) if t.get("key") == key]


def removal_patch(node: Obj, indices: list[int]) -> list[Obj]:
    """Test-and-remove each taint, highest index first so the lower ones stay where they are."""
    taints = node["spec"]["taints"]
    ops: list[Obj] = []
    for i in sorted(indices, reverse=True):
        ops += [{"op": "test", "path": f"/spec/taints/{i}", "value": taints[i]},
                {"op": "remove", "path": f"/spec/taints/{i}"}]
    return ops


def _why(e: ApiException) -> str:
    hints = {403: " (the agent's ClusterRole needs patch on nodes)",
             422: " (the node's taints changed since we read them)"}
    return f"{e.status} {e.reason}{hints.get(e.status or 0, '')}"


async def _back_off(delay: float, message: str) -> float:
    log.warning("%s; retrying in %gs", message, delay)
    await asyncio.sleep(delay)
    return min(delay * 2, RETRY_MAX)
