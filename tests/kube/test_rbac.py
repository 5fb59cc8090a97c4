"""RBAC is exactly what the code uses: the verbs and resources the agent's watchers and
`prewarm --cluster` call, read from the API server's request log, equal the grants of
daemonset/base/rbac.yaml, both ways (nothing denied, nothing granted and unused).

To grant a new call: exercise it in one of the flows below, then add it to rbac.yaml."""

from __future__ import annotations

import asyncio
import io
from dataclasses import replace
from pathlib import Path

import yaml
from rich.console import Console

from agent.kube.rollout import EXIT_FAILED, EXIT_OK, delete_prewarm, prewarm_cluster
from agent.peers.membership import Membership, watch_endpoint_slices
from tests.kube import FAST, Agents, FakePrewarmer, eventually, node, pod
from tests.support.kubeapi import RBAC_YAML, FakeKubeAPI
from tests.support.kuberbac import service_account_user

Grant = tuple[str, str, str]  # API group, resource[/subresource], verb
AGENT = ("flox-node-cache", "flox-node-cache")
LEASE = "flox-node-cache-aggregator"
CI = ("ci", "deployer")
WARMING = {"key": "flox.dev/node-cache-warming", "value": "true", "effect": "NoSchedule"}


def granted(role: str) -> set[Grant]:
    """The grants of the ClusterRole `role` and of the Role of that name, if any."""
    docs = [d for d in yaml.safe_load_all(RBAC_YAML.read_text()) if d]
    roles = [d for d in docs if d["kind"] in ("ClusterRole", "Role")
             and d["metadata"]["name"] == role]
    return {(g, r, v) for doc in roles for rule in doc["rules"] for g in rule["apiGroups"]
            for r in rule["resources"] for v in rule["verbs"]}


def used(api: FakeKubeAPI, account: tuple[str, str]) -> set[Grant]:
    user = service_account_user(*account)
    calls = [r for r in api.requests if r.user == user and r.resource]
    denied = [(r.verb, r.path) for r in calls if r.status == 403]
    assert not denied, denied
    return {(r.group, f"{r.resource}/{r.subresource}" if r.subresource else r.resource, r.verb)
            for r in calls}


async def agent_flows(api: FakeKubeAPI, tmp_path: Path) -> None:
    """Everything the agent does: watch all it watches, report Ready and Failed (an Event),
    delete a finished prewarm after its TTL, hold the aggregator's lease and aggregate, remove
    the warm taint from its node, (restarted) prune its entries of a prewarm deleted while
    it was down, and follow its peers' EndpointSlices (components/peers)."""
    config = str(api.write_kubeconfig(tmp_path / "agent", service_account=AGENT))
    api.create({**node("n1"), "spec": {"taints": [WARMING]}})
    api.create(pod("web", "n1", "flox/web"))
    agents = Agents(config)
    pw = FakePrewarmer()
    pw.fail_with["flox/broken"] = "upstream says no"
    # The failing prewarm keeps the node from warming: the taint goes at its timeout.
    agents.start("n1", pw, options=replace(FAST, warm_taint=WARMING["key"], warm_taint_timeout=1))
    peers = asyncio.create_task(watch_endpoint_slices(
        Membership(None), kubeconfig=config, namespace="flox-node-cache",
        service="flox-node-cache-peers", own_hosts=set(), node_name="n1"))
    try:
        for name, refs, ttl in (("ok", ["flox/redis"], None), ("bad", ["flox/broken"], None),
                                ("brief", ["flox/redis"], 0)):
            spec: dict[str, object] = {"environments": refs}
            if ttl is not None:
                spec["ttlSecondsAfterFinished"] = ttl
            api.create({"apiVersion": "nodecache.flox.dev/v1alpha1",
                        "kind": "EnvironmentPrewarm", "metadata": {"name": name},
                        "spec": spec})
        await eventually(lambda: len(api.list("EnvironmentPrewarm")) == 2, what="TTL delete")
        await eventually(lambda: api.list("Event") and all(
            (o.get("status") or {}).get("nodes", {}).get("n1", {}).get("phase")
            in ("Ready", "Failed") for o in api.list("EnvironmentPrewarm")))
        await eventually(lambda: all(api.open_watches(p) for p in (
            "nodes", "pods", "environmentprewarms", "deployments", "statefulsets",
            "daemonsets", "jobs", "cronjobs", "nodeprewarms", "endpointslices")))
        def renewed() -> str:
            return api.get("Lease", LEASE, "flox-node-cache")["spec"]["renewTime"]

        first = renewed()
        await eventually(lambda: renewed() != first, what="the lease renewed (an update)")
        await eventually(lambda: not (api.get("Node", "n1").get("spec") or {}).get("taints"),
                         what="the warm taint removed")
    finally:
        peers.cancel()
        await asyncio.gather(peers, return_exceptions=True)
        await agents.stop()


async def cli_flows(api: FakeKubeAPI, tmp_path: Path) -> None:
    """`prewarm --cluster`: create, then update an existing one, waiting both times; delete."""
    api.bind("flox-node-cache-prewarmer", *CI)
    config = str(api.write_kubeconfig(tmp_path / "ci", service_account=CI))
    agents = Agents(str(api.write_kubeconfig(tmp_path / "admin")))
    agents.start("n1")
    try:
        for refs in (["flox/a"], ["flox/a"]):
            code = await prewarm_cluster(refs=refs, selector={}, pin=True, wait=True,
                                         timeout=10, kubeconfig=config, name="gate",
                                         console=Console(file=io.StringIO()), poll=0.1)
            assert code in (EXIT_OK, EXIT_FAILED)
        assert await delete_prewarm("gate", timeout=10, kubeconfig=config,
                                    console=Console(file=io.StringIO())) == EXIT_OK
    finally:
        await agents.stop()


async def test_agent_role_is_exactly_what_the_agent_calls(kubeapi: FakeKubeAPI,
                                                          tmp_path: Path) -> None:
    await agent_flows(kubeapi, tmp_path)
    assert used(kubeapi, AGENT) == granted("flox-node-cache")


async def test_prewarmer_role_is_exactly_what_prewarm_cluster_calls(
        kubeapi: FakeKubeAPI, tmp_path: Path) -> None:
    kubeapi.create(node("n1"))
    await cli_flows(kubeapi, tmp_path)
    assert used(kubeapi, CI) == granted("flox-node-cache-prewarmer")
