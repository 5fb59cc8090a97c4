"""In a cluster: an EnvironmentPrewarm and a pod on the node are realised into the node's store,
and the EnvironmentPrewarm's per-node status says so (real agent, in-process API server)."""

from __future__ import annotations

from pathlib import Path

from tests.kube import node as node_object
from tests.kube import pod, prewarm_resource
from tests.node.conftest import NodeFactory, eventually, holder_state
from tests.support.floxmeta import Floxmeta
from tests.support.gitserver import GitHTTPServer
from tests.support.kubeapi import FakeKubeAPI
from tests.support.lockfiles import lockfile_for
from tests.support.nixenv import Closure


def test_prewarm_resource_reports_the_closure_realised_on_the_node(
        make_node: NodeFactory, tmp_path: Path, small_closure: Closure,
        big_path_closure: Closure) -> None:
    meta = Floxmeta(tmp_path / "floxhub")
    meta.add_generation("acme", "web", lockfile_for(*small_closure.roots))
    meta.add_generation("acme", "api", lockfile_for(*big_path_closure.roots))
    with FakeKubeAPI() as api, GitHTTPServer(meta.root) as git:
        api.create(node_object("n1"))
        n = make_node("--kubernetes", "on", "--kubeconfig",
                      str(api.write_kubeconfig(tmp_path / "kubeconfig")), "--node-name", "n1",
                      "--floxhub-git-url", git.url)
        with n.agent:
            api.create(prewarm_resource("web", ["acme/web"]))

            def node_store() -> dict:
                status = api.get("EnvironmentPrewarm", "web").get("status") or {}
                return (status.get("nodes") or {}).get("n1", {}).get("nodeStore") or {}

            eventually(lambda: node_store().get("realised"), "nodeStore realised")
            assert node_store() == {"realised": True, "state": "rooted",
                                    "rootedBytes": small_closure.total_nar_size}
            assert all(n.daemon.valid(p) for p in small_closure.paths)

            # A pod on the node pins its environment: realised too, while it runs.
            created = api.create(pod("api-1", "n1", "acme/api"))
            holder_state(n.agent, "pod:acme/api", "rooted")
            assert all(n.daemon.valid(p) for p in big_path_closure.paths)
            api.delete(created)
            eventually(lambda: not any(d.name.startswith("pod_acme_api")
                                       for d in n.roots.iterdir()), "pod's roots released")
