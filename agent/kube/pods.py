"""Pods on this node that run a Flox environment: prefetch it and pin it while they exist."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from agent.kube.background import Background, start_prewarm
from agent.kube.client import ENV_ANNOTATION
from agent.kube.types import Prewarmer

log = logging.getLogger(__name__)
Obj = dict[str, Any]
FINISHED = ("Succeeded", "Failed")


def env_ref(meta: Obj, spec: Obj, runtime_classes: frozenset[str]) -> str | None:
    """The environment a pod (or pod template) asks for, if it runs under a Flox runtime."""
    ref = ((meta.get("annotations") or {}).get(ENV_ANNOTATION) or "").strip()
    rc = spec.get("runtimeClassName")
    if not ref or (rc is not None and rc not in runtime_classes):
        return None
    return ref


def pod_holder(ref: str) -> str:
    return f"pod:{ref}"


class PodHandler:
    """Keeps a refcount of live Flox pods per environment on this node."""

    def __init__(self, prewarmer: Prewarmer, background: Background, *, node_name: str,
                 system: str | None, runtime_classes: frozenset[str]) -> None:
        self.prewarmer, self.background = prewarmer, background
        self.node_name, self.system, self.runtime_classes = node_name, system, runtime_classes
        self.pods: dict[str, str] = {}  # "namespace/name" -> ref, live Flox pods only

    def refcounts(self) -> dict[str, int]:
        return dict(Counter(self.pods.values()))

    async def resync(self, objects: list[Obj]) -> None:
        live = {_key(o): ref for o in objects if (ref := self._live_ref(o))}
        await self._apply(live)

    async def event(self, type_: str, obj: Obj) -> None:
        pods = dict(self.pods)
        ref = None if type_ == "DELETED" else self._live_ref(obj)
        if ref:
            pods[_key(obj)] = ref
        else:
            pods.pop(_key(obj), None)
        await self._apply(pods)

    def _live_ref(self, pod: Obj) -> str | None:
        spec, status = pod.get("spec") or {}, pod.get("status") or {}
        if spec.get("nodeName") != self.node_name or status.get("phase") in FINISHED:
            return None
        return env_ref(pod.get("metadata") or {}, spec, self.runtime_classes)

    async def _apply(self, pods: dict[str, str]) -> None:
        before, after = Counter(self.pods.values()), Counter(pods.values())
        self.pods = pods
        for ref in before.keys() - after.keys():
            log.info("last pod of %s gone: unpinning", ref)
            self.prewarmer.unpin(pod_holder(ref))
        for ref in after.keys() - before.keys():
            await start_prewarm(self.prewarmer, self.background, ref, why="pod",
                                pin=pod_holder(ref), system=self.system)


def _key(obj: Obj) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"
