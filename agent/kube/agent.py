"""`run_kubernetes`: start every watcher of the agent and run until cancelled."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from kubernetes_asyncio import client as k8s

from agent.kube.background import Background
from agent.kube.client import FLOX_RUNTIME_CLASS, GROUP, PLURAL, VERSION, make_api_client
from agent.kube.pods import PodHandler
from agent.kube.prewarm import PrewarmHandler
from agent.kube.taint import WarmTaint, Warmth
from agent.kube.types import Prewarmer
from agent.kube.watch import ListWatch, WatchOptions
from agent.kube.workloads import KINDS, Workloads

log = logging.getLogger(__name__)
Obj = dict[str, Any]


@dataclass
class KubeOptions:
    watch: WatchOptions = field(default_factory=WatchOptions)
    report_interval: float = 2.0  # at most one progress status write per resource per interval
    runtime_classes: frozenset[str] = frozenset({FLOX_RUNTIME_CLASS})
    warm_taint: str = ""  # startup taint key to remove once warm (agent.kube.taint); "" = off
    warm_taint_timeout: float = 600.0


class NodeHandler:
    """This node's labels, which decide the workloads and prewarm resources that apply."""

    def __init__(self, node_name: str, listeners: list[Any]) -> None:
        self.node_name, self.listeners = node_name, listeners

    async def resync(self, objects: list[Obj]) -> None:
        mine = [o for o in objects if o["metadata"]["name"] == self.node_name]
        await self._set(mine[0] if mine else None)

    async def event(self, type_: str, obj: Obj) -> None:
        await self._set(None if type_ == "DELETED" else obj)

    async def _set(self, node: Obj | None) -> None:
        labels = dict(((node or {}).get("metadata") or {}).get("labels") or {})
        for listener in self.listeners:
            await listener.set_node_labels(labels)


async def run_kubernetes(prewarmer: Prewarmer, *, node_name: str, kubeconfig: str | None,
                         system: str | None, options: KubeOptions | None = None) -> None:
    """Follow pods on this node, workloads and EnvironmentPrewarms until cancelled."""
    opts = options or KubeOptions()
    api = await make_api_client(kubeconfig)
    background = Background()
    workloads = Workloads(prewarmer, background, system=system,
                          runtime_classes=opts.runtime_classes)
    warmth = Warmth()
    prewarms = PrewarmHandler(api, prewarmer, node_name=node_name, system=system,
                              report_interval=opts.report_interval, warmth=warmth)
    pods = PodHandler(prewarmer, background, node_name=node_name, system=system,
                      runtime_classes=opts.runtime_classes)
    core = k8s.CoreV1Api(api)
    node_watch = ListWatch("nodes", core.list_node, NodeHandler(node_name, [workloads, prewarms]),
                           {"field_selector": f"metadata.name={node_name}"}, opts.watch)
    watches = [
        ListWatch("pods", core.list_pod_for_all_namespaces, pods,
                  {"field_selector": f"spec.nodeName={node_name}"}, opts.watch),
        ListWatch(PLURAL, _custom_list(k8s.CustomObjectsApi(api)), prewarms, {}, opts.watch),
    ]
    for kind, (api_class, method) in KINDS.items():
        list_fn = getattr(getattr(k8s, api_class)(api), method)
        watches.append(ListWatch(kind.lower(), list_fn, workloads.handler(kind), {}, opts.watch))
    log.info("kubernetes watchers starting", extra={"fields": {"node": node_name}})
    try:
        async with asyncio.TaskGroup() as tg:
            if opts.warm_taint:
                tg.create_task(WarmTaint(core, node_name, opts.warm_taint,
                                         opts.warm_taint_timeout, warmth).run())
            tg.create_task(node_watch.run())
            await node_watch.ready.wait()  # labels first: they decide what applies here
            for w in watches:
                tg.create_task(w.run())
    finally:
        await prewarms.close()
        await background.close()
        await api.close()


def _custom_list(custom: k8s.CustomObjectsApi) -> Any:
    async def list_prewarms(**kw: Any) -> Any:
        return await custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, **kw)
    return list_prewarms
