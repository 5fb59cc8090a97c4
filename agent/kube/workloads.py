"""Workloads whose pod template names a Flox environment: prefetch it before a pod lands.

Every agent whose node could run the template's pods (its nodeSelector and required node
affinity, plus `flox.dev/enabled=true` for the `flox` RuntimeClass) prefetches the
environment, so a rollout starts warm. Only changes act: the last ref prefetched per workload
is remembered, so a resync or a status update does not prefetch again, while a template edit
to a new ref (e.g. `owner/env:7` -> `owner/env:8`) does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from agent.kube.background import Background, start_prewarm
from agent.kube.client import ENABLED_LABEL, FLOX_RUNTIME_CLASS
from agent.kube.pods import env_ref
from agent.kube.types import Prewarmer

log = logging.getLogger(__name__)
Obj = dict[str, Any]
Key = tuple[str, str, str]  # kind, namespace, name

# kind -> (API class name, list method for all namespaces)
KINDS: dict[str, tuple[str, str]] = {
    "Deployment": ("AppsV1Api", "list_deployment_for_all_namespaces"),
    "StatefulSet": ("AppsV1Api", "list_stateful_set_for_all_namespaces"),
    "DaemonSet": ("AppsV1Api", "list_daemon_set_for_all_namespaces"),
    "Job": ("BatchV1Api", "list_job_for_all_namespaces"),
    "CronJob": ("BatchV1Api", "list_cron_job_for_all_namespaces"),
}


def pod_template(kind: str, obj: Obj) -> Obj:
    spec = obj.get("spec") or {}
    if kind == "CronJob":
        spec = (spec.get("jobTemplate") or {}).get("spec") or {}
    return spec.get("template") or {}


def template_ref(kind: str, obj: Obj, runtime_classes: frozenset[str]) -> str | None:
    tmpl = pod_template(kind, obj)
    return env_ref(tmpl.get("metadata") or {}, tmpl.get("spec") or {}, runtime_classes)


def job_finished(kind: str, obj: Obj) -> bool:
    """A finished Job starts no more pods."""
    if kind != "Job":
        return False
    conds = (obj.get("status") or {}).get("conditions") or []
    return any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
               for c in conds)


def node_may_run(template: Obj, labels: dict[str, str]) -> bool:
    spec = template.get("spec") or {}
    if spec.get("runtimeClassName") == FLOX_RUNTIME_CLASS and labels.get(ENABLED_LABEL) != "true":
        return False
    if any(labels.get(k) != v for k, v in (spec.get("nodeSelector") or {}).items()):
        return False
    required = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution") or {})
    terms = required.get("nodeSelectorTerms") or []
    return not terms or any(_term_matches(t, labels) for t in terms)


def _term_matches(term: Obj, labels: dict[str, str]) -> bool:
    exprs = term.get("matchExpressions") or []
    return bool(exprs) and all(_expr_matches(e, labels) for e in exprs)


def _expr_matches(expr: Obj, labels: dict[str, str]) -> bool:
    key, op, values = expr.get("key", ""), expr.get("operator"), expr.get("values") or []
    value = labels.get(key)
    if op in ("Gt", "Lt"):
        try:
            a, b = int(value or ""), int(values[0])
        except (ValueError, IndexError):
            return False
        return a > b if op == "Gt" else a < b
    return {"In": value in values, "NotIn": value not in values,
            "Exists": key in labels, "DoesNotExist": key not in labels}.get(op or "", False)


@dataclass
class Seen:
    ref: str | None
    template: Obj


class Workloads:
    """Workload templates of every kind, evaluated against this node's labels."""

    def __init__(self, prewarmer: Prewarmer, background: Background, *, system: str | None,
                 runtime_classes: frozenset[str]) -> None:
        self.prewarmer, self.background = prewarmer, background
        self.system, self.runtime_classes = system, runtime_classes
        self.node_labels: dict[str, str] = {}
        self.seen: dict[Key, Seen] = {}
        self.acted: dict[Key, str] = {}  # the ref last prefetched for each workload

    def handler(self, kind: str) -> KindHandler:
        return KindHandler(self, kind)

    async def set_node_labels(self, labels: dict[str, str]) -> None:
        if labels != self.node_labels:
            self.node_labels = dict(labels)
            for key in list(self.seen):
                await self._evaluate(key)

    async def update(self, key: Key, obj: Obj | None) -> None:
        kind = key[0]
        if obj is None or job_finished(kind, obj):
            self.seen.pop(key, None)
            self.acted.pop(key, None)
            return
        self.seen[key] = Seen(template_ref(kind, obj, self.runtime_classes),
                              pod_template(kind, obj))
        await self._evaluate(key)

    async def _evaluate(self, key: Key) -> None:
        seen = self.seen[key]
        if not seen.ref or not node_may_run(seen.template, self.node_labels):
            self.acted.pop(key, None)
            return
        if self.acted.get(key) == seen.ref:
            return
        self.acted[key] = seen.ref
        log.info("workload %s/%s/%s uses %s: prewarming", *key, seen.ref)
        await start_prewarm(self.prewarmer, self.background, seen.ref,
                            why=f"{key[0].lower()}:{key[1]}/{key[2]}", pin=None,
                            system=self.system)


class KindHandler:
    """The watch handler for one workload kind."""

    def __init__(self, workloads: Workloads, kind: str) -> None:
        self.workloads, self.kind = workloads, kind

    async def resync(self, objects: list[Obj]) -> None:
        current = {self._key(o): o for o in objects}
        for key in [k for k in self.workloads.seen if k[0] == self.kind and k not in current]:
            await self.workloads.update(key, None)
        for key, obj in current.items():
            await self.workloads.update(key, obj)

    async def event(self, type_: str, obj: Obj) -> None:
        await self.workloads.update(self._key(obj), None if type_ == "DELETED" else obj)

    def _key(self, obj: Obj) -> Key:
        meta = obj.get("metadata") or {}
        return (self.kind, meta.get("namespace", ""), meta.get("name", ""))
