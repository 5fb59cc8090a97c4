"""The real agent process in "cluster mode": kubernetes-asyncio against the in-process API
server, the real prefetcher, FloxHub over git, an upstream cache and the real Nix client."""

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.kube import node, pod, prewarm_resource
from tests.support.agent import AgentProcess
from tests.support.floxmeta import Floxmeta
from tests.support.gitserver import GitHTTPServer
from tests.support.kubeapi import FakeKubeAPI
from tests.support.lockfiles import lockfile_for
from tests.support.nixenv import Closure, nix_copy
from tests.support.upstream import UpstreamServer

AGENT_SA = ("flox-node-cache", "flox-node-cache")


@pytest.fixture
def cluster(tmp_path: Path, upstream_server: UpstreamServer, signing_key: tuple[Path, str],
            small_closure: Closure, big_path_closure: Closure) \
        -> Iterator[tuple[FakeKubeAPI, AgentProcess, Path]]:
    meta = Floxmeta(tmp_path / "floxhub")
    meta.create_owner("acme")
    meta.add_generation("acme", "web", lockfile_for(*small_closure.roots))
    meta.add_generation("acme", "api", lockfile_for(*big_path_closure.roots))
    with FakeKubeAPI() as api, GitHTTPServer(meta.root) as git:
        # the agent runs as its service account, under daemonset/base/rbac.yaml
        agent_config = api.write_kubeconfig(tmp_path / "agent-kubeconfig",
                                            service_account=AGENT_SA)
        api.bind("flox-node-cache-prewarmer", "ci", "deployer")
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig", service_account=("ci",
                                                                                    "deployer"))
        api.create(node("n1"))
        with AgentProcess(tmp_path / "agent", [upstream_server.url], [signing_key[1]],
                          "--kubernetes", "on", "--kubeconfig", str(agent_config),
                          "--node-name", "n1", "--floxhub-git-url", git.url) as agent:
            yield api, agent, kubeconfig


def environments(agent: AgentProcess) -> dict[str, dict]:
    out = subprocess.run([sys.executable, "-m", "agent", "status", "--json", "--socket",
                          str(agent.socket)], capture_output=True, text=True, check=True)
    return {e["ref"]: e for e in json.loads(out.stdout)["environments"]}


def eventually(pred: Callable[[], object], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def test_pod_on_the_node_prefetches_and_pins_its_environment(
        cluster: tuple[FakeKubeAPI, AgentProcess, Path], upstream_server: UpstreamServer,
        small_closure: Closure, signing_key: tuple[Path, str], tmp_path: Path) -> None:
    api, agent, _ = cluster
    api.create(pod("other-node", "n2", "acme/api"))   # not this node: ignored
    web = api.create(pod("web-1", "n1", "acme/web"))

    def pinned() -> bool:
        env = environments(agent).get("acme/web")
        return bool(env and env["complete"] and env["pinned_by"] == ["pod:acme/web"])

    eventually(pinned, "acme/web prefetched and pinned")
    assert "acme/api" not in environments(agent)

    upstream_server.reset_counts()
    r = nix_copy(agent.url, tmp_path / "pod-root", small_closure.roots, [signing_key[1]])
    assert r.returncode == 0, r.stderr
    assert upstream_server.requests == []  # the pod's cold start never left the node

    api.delete(web)
    eventually(lambda: environments(agent)["acme/web"]["pinned_by"] == [], "unpinned")


def test_watcher_health_in_readyz_status_and_metrics(
        cluster: tuple[FakeKubeAPI, AgentProcess, Path]) -> None:
    _, agent, _ = cluster

    def watchers() -> dict:
        with urllib.request.urlopen(agent.metrics_url + "/readyz", timeout=5) as r:
            return json.loads(r.read())["checks"]["kubernetes"]["watchers"].get("n1", {})

    eventually(lambda: watchers().get("pods", {}).get("last_list"), "pods listed")
    state = watchers()
    assert set(state) >= {"nodes", "pods", "environmentprewarms", "deployments", "cronjobs"}
    assert all(w["consecutive_failures"] == 0 for w in state.values())
    out = subprocess.run([sys.executable, "-m", "agent", "status", "--json", "--socket",
                          str(agent.socket)], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["store"]["kubernetes"]["healthy"] is True
    assert agent.metric("flox_node_cache_kube_watch_consecutive_failures",
                        resource="nodes") == 0


def test_cluster_prewarm_gate_waits_for_the_real_agent(
        cluster: tuple[FakeKubeAPI, AgentProcess, Path]) -> None:
    api, agent, kubeconfig = cluster
    r = subprocess.run([sys.executable, "-m", "agent", "prewarm", "--cluster", "acme/api",
                        "--wait", "--timeout", "60s", "--kubeconfig", str(kubeconfig)],
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    obj = next(o for o in api.list("EnvironmentPrewarm"))
    status = obj["status"]["nodes"]["n1"]
    assert status["phase"] == "Ready"
    assert status["pathsDone"] == status["pathsTotal"] > 0
    assert environments(agent)["acme/api"]["complete"]


def test_a_prewarm_pins_every_environment_until_deleted_even_while_the_node_was_down(
        cluster: tuple[FakeKubeAPI, AgentProcess, Path]) -> None:
    api, agent, _ = cluster
    obj = api.create(prewarm_resource("both", ["acme/web", "acme/api:1"]))

    def pinned() -> dict[str, list[str]]:
        envs = environments(agent)
        return {ref: envs[ref]["pinned_by"] for ref in ("acme/web", "acme/api:1")
                if ref in envs and envs[ref]["complete"]}

    eventually(lambda: len(pinned()) == 2 and all(pinned().values()), "both pinned")
    assert pinned() == {"acme/web": ["prewarm:both:acme/web"],
                        "acme/api:1": ["prewarm:both:acme/api:1"]}
    agent.stop()  # the node is down when the prewarm is deleted ...
    api.delete(obj)
    agent.start()  # ... and releases its pins when it returns
    eventually(lambda: pinned() == {"acme/web": [], "acme/api:1": []}, "both unpinned")
