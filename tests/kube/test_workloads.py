"""Workloads whose template names a Flox environment are prefetched on nodes that can run them."""

from __future__ import annotations

from typing import Any

import yaml

from agent.kube.workloads import node_may_run, pod_template, template_ref
from tests.kube import Agents, deployment, eventually, node, stays
from tests.support.fixtures import FIXTURES
from tests.support.kubeapi import FakeKubeAPI

FLOX = frozenset({"flox"})


def fixture_deployments() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((FIXTURES / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return [d for d in docs if d["kind"] == "Deployment"]


def test_fixture_deployments_are_recognised() -> None:
    refs = {d["metadata"]["name"]: template_ref("Deployment", d, FLOX)
            for d in fixture_deployments()}
    assert refs == {"quotes": "flox/quotes-app", "redis": "flox/redis"}
    for d in fixture_deployments():
        tmpl = pod_template("Deployment", d)
        assert node_may_run(tmpl, {"flox.dev/enabled": "true"})
        assert not node_may_run(tmpl, {})  # runtimeClassName flox needs a Flox node


async def test_fixture_deployments_are_prefetched_by_flox_nodes_only(
        kubeapi: FakeKubeAPI, agents: Agents) -> None:
    kubeapi.create(node("flox-node"))
    kubeapi.create(node("plain-node", flox=False))
    flox_pw, plain_pw = agents.start("flox-node"), agents.start("plain-node")
    for d in fixture_deployments():
        kubeapi.create(d)
    await eventually(lambda: sorted(flox_pw.refs()) == ["flox/quotes-app", "flox/redis"])
    assert all(pin is None for _, pin, _ in flox_pw.calls)  # workloads prefetch, never pin
    await stays(lambda: plain_pw.calls == [])


async def test_template_change_to_new_generation_is_prefetched_once(
        kubeapi: FakeKubeAPI, agents: Agents) -> None:
    kubeapi.create(node("n1"))
    pw = agents.start("n1")
    dep = kubeapi.create(deployment("web", "acme/web:7"))
    await eventually(lambda: pw.refs() == ["acme/web:7"])

    dep["status"] = {"replicas": 1, "readyReplicas": 1}
    dep = kubeapi.update(dep, status=True)  # status churn: not a change of environment
    dep["spec"]["replicas"] = 3
    dep = kubeapi.update(dep)  # spec change, same environment
    await stays(lambda: pw.refs() == ["acme/web:7"])

    dep["spec"]["template"]["metadata"]["annotations"]["flox.dev/environment"] = "acme/web:8"
    kubeapi.update(dep)
    await eventually(lambda: pw.refs() == ["acme/web:7", "acme/web:8"])
    await stays(lambda: len(pw.calls) == 2)


async def test_node_selector_and_node_labels_decide(kubeapi: FakeKubeAPI,
                                                   agents: Agents) -> None:
    n1 = kubeapi.create(node("n1", {"pool": "cpu"}))
    pw = agents.start("n1")
    kubeapi.create(deployment("trainer", "acme/train:2", node_selector={"pool": "gpu"}))
    cron = {"apiVersion": "batch/v1", "kind": "CronJob",
            "metadata": {"name": "nightly", "namespace": "jobs"},
            "spec": {"schedule": "0 3 * * *", "jobTemplate": {"spec": {"template": {
                "metadata": {"annotations": {"flox.dev/environment": "acme/report"}},
                "spec": {"runtimeClassName": "flox", "restartPolicy": "Never",
                         "containers": [{"name": "r", "image": "flox/empty:1.0.0"}]}}}}}}
    kubeapi.create(cron)
    await eventually(lambda: pw.refs() == ["acme/report"])  # CronJob template recognised
    await stays(lambda: "acme/train:2" not in pw.refs())

    n1["metadata"]["labels"]["pool"] = "gpu"  # relabelled: the trainer may now land here
    kubeapi.update(n1)
    await eventually(lambda: "acme/train:2" in pw.refs())


def test_required_node_affinity_is_evaluated() -> None:
    tmpl = {"spec": {"affinity": {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]},
                                  {"key": "spot", "operator": "DoesNotExist"}]},
            {"matchExpressions": [{"key": "cores", "operator": "Gt", "values": ["32"]}]},
        ]}}}}}
    assert node_may_run(tmpl, {"zone": "a"})
    assert not node_may_run(tmpl, {"zone": "a", "spot": "true"})
    assert node_may_run(tmpl, {"zone": "c", "cores": "64"})
    assert not node_may_run(tmpl, {"zone": "c", "cores": "16"})
