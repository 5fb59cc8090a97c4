"""The live peers: static `--peer` URLs plus the ready endpoints of the agent's own headless
Service, followed through the API server (EndpointSlices), so changes apply without restart.

A peer's id is its URL (`http://HOST:PORT`, the peer listener), the same on every node, which
is what rendezvous hashing ranks. This agent's own id is excluded from the peers but kept for
ranking: a key it owns itself is fetched from the upstreams directly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from agent import metrics

log = logging.getLogger(__name__)
Obj = dict[str, Any]
SERVICE_LABEL = "kubernetes.io/service-name"
PEER_PORT_NAME = "peer"


def peer_url(host: str, port: int | str) -> str:
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{host}:{port}"


class Membership:
    def __init__(self, self_id: str | None, static: Iterable[str] = ()) -> None:
        self.self_id = self_id
        self.static = {_normal(u) for u in static}
        self.discovered: dict[str, set[str]] = {}  # EndpointSlice name -> peer URLs
        self.on_change: list[Callable[[list[str]], None]] = []
        self._live: list[str] = []
        self._update()

    def live(self) -> list[str]:
        """The peers to ask, this agent excluded, sorted."""
        return self._live

    def set_slice(self, name: str, urls: set[str] | None) -> None:
        if urls:
            self.discovered[name] = {_normal(u) for u in urls}
        else:
            self.discovered.pop(name, None)
        self._update()

    def replace_slices(self, slices: dict[str, set[str]]) -> None:
        self.discovered = {n: {_normal(u) for u in urls} for n, urls in slices.items() if urls}
        self._update()

    def _update(self) -> None:
        every = self.static.union(*self.discovered.values())
        live = sorted(every - {self.self_id})
        metrics.PEERS_LIVE.set(len(live))
        if live == self._live:
            return
        joined, left = set(live) - set(self._live), set(self._live) - set(live)
        self._live = live
        log.info("peers changed", extra={"fields": {
            "peers": len(live), "joined": sorted(joined), "left": sorted(left)}})
        for callback in self.on_change:
            callback(live)


def _normal(url: str) -> str:
    return url.rstrip("/")


class EndpointSliceHandler:
    """A ListWatch handler for the EndpointSlices of one Service: ready endpoints only, this
    node's own endpoint excluded (by address or node name)."""

    def __init__(self, membership: Membership, *, own_hosts: set[str],
                 node_name: str | None) -> None:
        self.membership = membership
        self.own_hosts, self.node_name = own_hosts, node_name

    async def resync(self, objects: list[Obj]) -> None:
        self.membership.replace_slices({_name(o): self.peers_of(o) for o in objects})

    async def event(self, type_: str, obj: Obj) -> None:
        self.membership.set_slice(_name(obj), None if type_ == "DELETED" else self.peers_of(obj))

    def peers_of(self, slice_: Obj) -> set[str]:
        port = _peer_port(slice_.get("ports") or [])
        if port is None:
            return set()
        urls = set()
        for ep in slice_.get("endpoints") or []:
            conditions = ep.get("conditions") or {}
            if conditions.get("ready") is False:  # unset means ready (Kubernetes API docs)
                continue
            if self.node_name and ep.get("nodeName") == self.node_name:
                continue
            urls |= {peer_url(a, port) for a in ep.get("addresses") or []
                     if a not in self.own_hosts}
        return urls


def _name(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("name", ""))


def _peer_port(ports: list[Obj]) -> int | None:
    """The port named `peer`, or the only port of the slice."""
    named = [p for p in ports if p.get("name") == PEER_PORT_NAME]
    chosen = named or (ports if len(ports) == 1 else [])
    return int(chosen[0]["port"]) if chosen and chosen[0].get("port") else None


async def watch_endpoint_slices(membership: Membership, *, kubeconfig: str | None,
                                namespace: str, service: str, own_hosts: set[str],
                                node_name: str | None) -> None:
    """Follow the Service's EndpointSlices until cancelled."""
    from kubernetes_asyncio import client as k8s

    from agent.kube.client import make_api_client
    from agent.kube.watch import ListWatch

    api = await make_api_client(kubeconfig)
    handler = EndpointSliceHandler(membership, own_hosts=own_hosts, node_name=node_name)
    discovery = k8s.DiscoveryV1Api(api)

    async def list_slices(**kw: Any) -> Any:
        return await discovery.list_namespaced_endpoint_slice(namespace, **kw)

    log.info("peer discovery starting", extra={"fields": {
        "namespace": namespace, "service": service}})
    try:
        await ListWatch("endpointslices", list_slices, handler,
                        {"label_selector": f"{SERVICE_LABEL}={service}"}).run()
    finally:
        await api.close()
