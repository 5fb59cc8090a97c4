"""`run_kubernetes`: start every watcher of the agent and run until cancelled.

The watchers start together and fail alone: a denied or failing Node watch leaves pods,
prewarms and workloads working (until the node's labels are known, only prewarms and
workloads that select no labels apply). Each watcher's health is in `agent.kube.health`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from kubernetes_asyncio import client as k8s

from agent.kube import health
from agent.kube.aggregate import NODE_PLURAL, Aggregator
from agent.kube.background import Background
from agent.kube.client import FLOX_RUNTIME_CLASS, GROUP, PLURAL, VERSION, make_api_client
from agent.kube.lease import Lease, own_namespace
from agent.kube.pods import PodHandler
from agent.kube.prewarm import PrewarmHandler
from agent.kube.taint import WarmTaint, Warmth
from agent.kube.types import Prewarmer
from agent.kube.watch import ListWatch, WatchOptions
from agent.kube.workloads import KINDS, Workloads

log = logging.getLogger(__name__)
Obj = dict[str, Any]
LEASE_NAME = "flox-node-cache-aggregator"


@dataclass
class KubeOptions:
    watch: WatchOptions = field(default_factory=WatchOptions)
    report_interval: float = 2.0  # at most one progress status write per resource per interval
    request_timeout: float = 30.0  # every API call that is not a watch (status writes, Events)
    aggregate_interval: float = 2.0  # at most one aggregated status write per prewarm
    lease_duration: float = 15.0  # the aggregator's lease: taken over when not renewed for this
    lease_renew: float = 5.0
    lease_namespace: str | None = None  # default: the pod's own namespace
    runtime_classes: frozenset[str] = frozenset({FLOX_RUNTIME_CLASS})
    warm_taint: str = ""  # a startup taint to remove from this node once warm; "" = off
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
                         system: str | None, options: KubeOptions | None = None,
                         pin_holders: Callable[[], Iterable[str]] = tuple) -> None:
    """Follow pods on this node, workloads and EnvironmentPrewarms until cancelled.

    `pin_holders` lists the holders pinned in the node's store, so pins of prewarms deleted
    while the agent was down are released when it returns."""
    opts = options or KubeOptions()
    api = await make_api_client(kubeconfig)
    background = Background()
    workloads = Workloads(prewarmer, background, system=system,
                          runtime_classes=opts.runtime_classes)
    warmth = Warmth()
    prewarms = PrewarmHandler(api, prewarmer, node_name=node_name, system=system,
                              report_interval=opts.report_interval,
                              request_timeout=opts.request_timeout, pin_holders=pin_holders,
                              warmth=warmth)
    pods = PodHandler(prewarmer, background, node_name=node_name, system=system,
                      runtime_classes=opts.runtime_classes)
    core = k8s.CoreV1Api(api)

    def watch(resource: str, list_fn: Any, handler: Any, params: Obj) -> ListWatch:
        return ListWatch(resource, list_fn, handler, params, opts.watch,
                         health.register(node_name, resource))

    watches = [
        watch("nodes", core.list_node, NodeHandler(node_name, [workloads, prewarms]),
              {"field_selector": f"metadata.name={node_name}"}),
        watch("pods", core.list_pod_for_all_namespaces, pods,
              {"field_selector": f"spec.nodeName={node_name}"}),
        watch(PLURAL, _custom_list(k8s.CustomObjectsApi(api), PLURAL), prewarms, {}),
    ]
    for kind, (api_class, method) in KINDS.items():
        list_fn = getattr(getattr(k8s, api_class)(api), method)
        watches.append(watch(kind.lower() + "s", list_fn, workloads.handler(kind), {}))
    custom = k8s.CustomObjectsApi(api)

    async def aggregate() -> None:
        """While holding the lease: fold every node's NodePrewarm into the prewarms' status."""
        aggregator = Aggregator(custom, lambda: list(prewarms.objects.values()),
                                interval=opts.aggregate_interval, timeout=opts.request_timeout)
        prewarms.listeners.append(aggregator.dirty.set)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(watch(NODE_PLURAL, _custom_list(custom, NODE_PLURAL),
                                     aggregator, {}).run())
                tg.create_task(aggregator.run())
        finally:
            prewarms.listeners.remove(aggregator.dirty.set)
            health.forget(node_name, NODE_PLURAL)

    lease = Lease(api, name=LEASE_NAME, identity=node_name,
                  namespace=opts.lease_namespace or own_namespace(),
                  duration=opts.lease_duration, renew=opts.lease_renew,
                  timeout=opts.request_timeout)
    log.info("kubernetes watchers starting", extra={"fields": {"node": node_name}})
    try:
        async with asyncio.TaskGroup() as tg:
            if opts.warm_taint:
                tg.create_task(WarmTaint(core, node_name, opts.warm_taint,
                                         opts.warm_taint_timeout, warmth).run())
            for w in watches:
                tg.create_task(w.run())
            tg.create_task(lease.run(aggregate))
    finally:
        health.unregister(node_name)
        await prewarms.close()
        await background.close()
        await api.close()


def _custom_list(custom: k8s.CustomObjectsApi, plural: str) -> Any:
    async def list_custom(**kw: Any) -> Any:
        return await custom.list_cluster_custom_object(GROUP, VERSION, plural, **kw)
    return list_custom
