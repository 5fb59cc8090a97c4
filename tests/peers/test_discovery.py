"""Peers from the EndpointSlices of the agent's headless Service, watched through the
(in-process) API server with the real kubernetes-asyncio client: ready endpoints only, its
own endpoint excluded, changes applied without a restart."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from typing import Any

from agent.peers.membership import Membership, watch_endpoint_slices
from agent.peers.protocol import PeerToken
from agent.peers.source import PeerSource
from agent.upstream.client import Timeouts
from tests.kube import eventually
from tests.support.agent import AgentProcess, free_port
from tests.support.kubeapi import FakeKubeAPI

NS, SERVICE = "flox-node-cache", "flox-node-cache-peers"


def endpoint(ip: str, node: str, ready: bool | None = True) -> dict[str, Any]:
    ep: dict[str, Any] = {"addresses": [ip], "nodeName": node}
    if ready is not None:
        ep["conditions"] = {"ready": ready}
    return ep


def endpoint_slice(name: str, endpoints: list[dict[str, Any]], service: str = SERVICE,
                   port: int = 37517) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": NS,
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "ports": [{"name": "peer", "port": port, "protocol": "TCP"}],
            "endpoints": endpoints}


async def test_peers_follow_ready_endpoints_of_the_service(
        kubeapi: FakeKubeAPI, kubeconfig: str, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret")
    membership = Membership("http://10.0.0.1:37517")
    source = PeerSource(membership, Timeouts(), 30.0, PeerToken(token), [])
    await source.start()
    kubeapi.create(endpoint_slice("peers-a", [
        endpoint("10.0.0.1", "node-a"),                  # this agent
        endpoint("10.0.0.2", "node-b"),
        endpoint("10.0.0.3", "node-c", ready=False),     # not ready yet
        endpoint("10.0.0.4", "node-d", ready=None),      # unknown counts as ready
    ]))
    kubeapi.create(endpoint_slice("other-service", [endpoint("10.0.0.9", "node-x")],
                                  service="something-else"))
    watch = asyncio.create_task(watch_endpoint_slices(
        membership, kubeconfig=kubeconfig, namespace=NS, service=SERVICE,
        own_hosts={"10.0.0.1"}, node_name="node-a"))
    try:
        await eventually(lambda: membership.live() == ["http://10.0.0.2:37517",
                                                       "http://10.0.0.4:37517"])
        assert set(source.peers) == set(membership.live())

        # node-c becomes ready; node-b goes unready; a second slice adds node-e
        kubeapi.update(endpoint_slice("peers-a", [
            endpoint("10.0.0.1", "node-a"), endpoint("10.0.0.2", "node-b", ready=False),
            endpoint("10.0.0.3", "node-c"), endpoint("10.0.0.4", "node-d")]))
        kubeapi.create(endpoint_slice("peers-b", [endpoint("10.0.0.5", "node-e")]))
        await eventually(lambda: membership.live() == [
            "http://10.0.0.3:37517", "http://10.0.0.4:37517", "http://10.0.0.5:37517"])
        assert set(source.peers) == set(membership.live())

        kubeapi.delete(endpoint_slice("peers-b", []))
        await eventually(lambda: "http://10.0.0.5:37517" not in membership.live())
        # A dropped watch resumes without losing a change.
        kubeapi.drop_watches()
        kubeapi.update(endpoint_slice("peers-a", [endpoint("10.0.0.4", "node-d")]))
        await eventually(lambda: membership.live() == ["http://10.0.0.4:37517"])
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        await source.close()


def _readyz(agent: AgentProcess) -> dict[str, Any]:
    with urllib.request.urlopen(agent.metrics_url + "/readyz", timeout=5) as r:
        return json.loads(r.read())


async def test_agent_discovers_its_peers_and_lists_them_in_readyz(
        kubeapi: FakeKubeAPI, kubeconfig: str, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret")
    port = free_port()
    kubeapi.create({"apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": "node-a", "labels": {"flox.dev/enabled": "true"}}})
    kubeapi.create(endpoint_slice("peers-a", [endpoint("127.0.0.1", "node-a"),
                                              endpoint("10.0.0.2", "node-b")], port=port))
    agent = AgentProcess(tmp_path / "agent", ["http://127.0.0.1:9"], ["k-1:" + "A" * 43 + "="],
                         "--kubernetes", "on", "--kubeconfig", kubeconfig,
                         "--node-name", "node-a", "--peer-service", SERVICE,
                         "--peer-namespace", NS, "--peer-listen", f"127.0.0.1:{port}",
                         "--peer-token-file", str(token))
    with agent:
        await eventually(lambda: _readyz(agent)["checks"].get("peers") == {
            f"http://10.0.0.2:{port}": "ok"}, timeout=15)
        assert agent.metric("flox_node_cache_peers") == 1
        kubeapi.update(endpoint_slice("peers-a", [
            endpoint("127.0.0.1", "node-a"), endpoint("10.0.0.2", "node-b", ready=False),
            endpoint("10.0.0.3", "node-c")], port=port))
        await eventually(lambda: _readyz(agent)["checks"].get("peers") == {
            f"http://10.0.0.3:{port}": "ok"}, timeout=15)
