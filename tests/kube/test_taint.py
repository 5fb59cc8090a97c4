"""The startup taint: removed once every prewarm selecting the node is Ready here, or on timeout.

The real kubernetes-asyncio client against the in-process API server; the end-to-end tests run
the agent's real watchers (`run_kubernetes`) with only the prefetcher replaced.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client import ApiClient

from agent.config import ConfigError, load
from agent.kube.client import make_api_client
from agent.kube.taint import REASON, WarmTaint, Warmth, removal_patch
from tests.kube import FAST, Agents, FakePrewarmer, eventually, node, prewarm_resource, stays
from tests.support.agent import AgentProcess
from tests.support.floxmeta import Floxmeta
from tests.support.gitserver import GitHTTPServer
from tests.support.kubeapi import FakeKubeAPI
from tests.support.lockfiles import lockfile_for
from tests.support.nixenv import Closure
from tests.support.upstream import UpstreamServer

Obj = dict[str, Any]
KEY = "flox.dev/node-cache-warming"
WARMING = {"key": KEY, "value": "true", "effect": "NoSchedule"}
OTHER = {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}
LATE = {"key": "node.kubernetes.io/not-ready", "effect": "NoExecute",
        "timeAdded": "2025-01-02T03:04:05Z"}


def tainted(name: str, taints: list[Obj], labels: dict[str, str] | None = None) -> Obj:
    obj = node(name, labels)
    obj["spec"] = {"taints": taints}
    return obj


def taints(api: FakeKubeAPI, name: str = "n1") -> list[Obj]:
    return list((api.get("Node", name).get("spec") or {}).get("taints") or [])


def events(api: FakeKubeAPI) -> list[Obj]:
    return [e for e in api.list("Event") if e["reason"] == REASON]


def node_patches(api: FakeKubeAPI) -> list[str]:
    return [r.content_type for r in api.requests
            if r.method == "PATCH" and r.path.startswith("/api/v1/nodes/")]


@pytest.fixture
async def core(kubeconfig: str) -> AsyncIterator[k8s.CoreV1Api]:
    client: ApiClient = await make_api_client(kubeconfig)
    yield k8s.CoreV1Api(client)
    await client.close()


def warm() -> Warmth:
    w = Warmth()
    w.known()
    return w


# --- the module on its own ---------------------------------------------------------------

async def test_ready_removes_only_the_warm_taint_and_says_why(
        kubeapi: FakeKubeAPI, core: k8s.CoreV1Api) -> None:
    kubeapi.create(tainted("n1", [OTHER, WARMING, LATE]))
    await WarmTaint(core, "n1", KEY, 30, warm()).run()
    assert taints(kubeapi) == [OTHER, LATE]
    assert node_patches(kubeapi) == ["application/json-patch+json"]
    (event,) = events(kubeapi)
    uid = kubeapi.get("Node", "n1")["metadata"]["uid"]
    assert event["involvedObject"] == {"apiVersion": "v1", "kind": "Node", "name": "n1",
                                       "uid": uid}
    assert event["type"] == "Normal" and event["source"]["host"] == "n1"
    assert event["message"] == (f"removed taint {KEY}: every EnvironmentPrewarm selecting this "
                                f"node is Ready here")


async def test_timeout_removes_the_taint_and_names_what_was_not_ready(
        kubeapi: FakeKubeAPI, core: k8s.CoreV1Api) -> None:
    kubeapi.create(tainted("n1", [WARMING, {**WARMING, "effect": "NoExecute"}]))
    warmth = warm()
    warmth.waiting("rollout")
    warmth.waiting("broken")
    await WarmTaint(core, "n1", KEY, 0.3, warmth).run()
    assert taints(kubeapi) == []  # every taint with the key, whatever its effect
    (event,) = events(kubeapi)
    assert event["message"] == (f"removed taint {KEY} after the 0.3s timeout; not Ready here: "
                                f"broken, rollout")


async def test_prewarms_never_listed_time_out_too(kubeapi: FakeKubeAPI,
                                                  core: k8s.CoreV1Api) -> None:
    kubeapi.create(tainted("n1", [WARMING]))
    await WarmTaint(core, "n1", KEY, 0.2, Warmth()).run()  # known() never called
    assert taints(kubeapi) == []
    assert events(kubeapi)[0]["message"].endswith("the prewarms could not be listed")


async def test_a_node_without_the_taint_is_left_alone(kubeapi: FakeKubeAPI,
                                                      core: k8s.CoreV1Api) -> None:
    kubeapi.create(tainted("n1", [OTHER]))
    never = Warmth()  # would wait forever: the agent must not wait when there is no taint
    await asyncio.wait_for(WarmTaint(core, "n1", KEY, 3600, never).run(), 5)
    assert taints(kubeapi) == [OTHER]
    assert node_patches(kubeapi) == [] and events(kubeapi) == []


async def test_the_patch_fails_whole_when_the_taints_moved(kubeapi: FakeKubeAPI,
                                                           core: k8s.CoreV1Api) -> None:
    # What makes the removal safe: a patch built from a stale read removes nothing.
    kubeapi.create(tainted("n1", [OTHER, WARMING]))
    stale = kubeapi.get("Node", "n1")
    current = kubeapi.get("Node", "n1")
    current["spec"]["taints"] = [WARMING, OTHER]  # another controller reordered them
    kubeapi.update(current)
    with pytest.raises(k8s.ApiException) as e:
        await core.patch_node("n1", removal_patch(stale, [1]))
    assert e.value.status == 422
    assert taints(kubeapi) == [WARMING, OTHER]  # OTHER, now at index 1, is still there


async def test_a_concurrent_change_is_retried_and_kept(kubeapi: FakeKubeAPI,
                                                       core: k8s.CoreV1Api) -> None:
    kubeapi.create(tainted("n1", [OTHER, WARMING]))
    read_node = core.read_node
    reads = 0

    async def read_then_interfere(*args: Any, **kw: Any) -> Any:
        # Between our first read and our patch, another controller adds a taint in front.
        nonlocal reads
        reads += 1
        resp = await read_node(*args, **kw)
        if reads == 1:
            obj = kubeapi.get("Node", "n1")
            obj["spec"]["taints"].insert(0, LATE)
            kubeapi.update(obj)
        return resp

    core.read_node = read_then_interfere  # type: ignore[method-assign]
    assert await WarmTaint(core, "n1", KEY, 30, warm()).remove() is not None
    assert taints(kubeapi) == [LATE, OTHER]  # ours gone, theirs kept
    assert len(node_patches(kubeapi)) == 2  # the first one failed its test and was redone
    assert reads == 2


async def test_a_missing_node_is_not_an_error(kubeapi: FakeKubeAPI, core: k8s.CoreV1Api) -> None:
    assert await WarmTaint(core, "gone", KEY, 30, warm()).remove() is None


def test_warmth_opens_only_when_known_and_nothing_waits() -> None:
    w = Warmth()
    w.waiting("a")
    w.known()
    assert not w._warm.is_set()
    w.ready("a")
    assert w._warm.is_set()
    w.waiting("b")  # a new prewarm selecting the node closes it again
    assert not w._warm.is_set() and w.not_ready() == ["b"]
    w.gone("b")
    assert w._warm.is_set()


@pytest.mark.parametrize("key", ["", "flox.dev/node-cache-warming", "warming", "a.b/c_d.e"])
def test_config_accepts_taint_keys(key: str) -> None:
    assert load(None, {"warm_taint": key}, {}).warm_taint == key


@pytest.mark.parametrize("key", ["flox.dev/", "-x", "Flox.Dev/x", "a b", "x=true:NoSchedule"])
def test_config_rejects_what_is_not_a_taint_key(key: str) -> None:
    with pytest.raises(ConfigError, match="not a taint key"):
        load(None, {"warm_taint": key}, {})


def test_config_rejects_a_timeout_that_is_not_positive() -> None:
    with pytest.raises(ConfigError, match="warm-taint-timeout"):
        load(None, {"warm_taint_timeout": 0}, {})


# --- through the agent's watchers --------------------------------------------------------

TAINTING = dataclasses.replace(FAST, warm_taint=KEY, warm_taint_timeout=60)


async def test_agent_removes_the_taint_when_its_prewarms_are_ready(
        kubeapi: FakeKubeAPI, agents: Agents) -> None:
    kubeapi.create(tainted("n1", [WARMING], {"pool": "web"}))
    kubeapi.create(prewarm_resource("web", ["flox/web"], selector={"pool": "web"}))
    kubeapi.create(prewarm_resource("db", ["flox/db"], selector={"pool": "web"}))
    kubeapi.create(prewarm_resource("gpu", ["flox/cuda"], selector={"pool": "gpu"}))  # not here
    pw = FakePrewarmer()
    pw.hold = {"flox/web", "flox/db", "flox/cuda"}
    agents.start("n1", pw, options=TAINTING)
    await eventually(lambda: {"flox/web", "flox/db"} <= set(pw.jobs))
    pw.jobs["flox/web"].finish()
    await stays(lambda: taints(kubeapi) == [WARMING])  # db is not Ready yet
    pw.jobs["flox/db"].finish()
    await eventually(lambda: taints(kubeapi) == [], what="taint removed")
    await eventually(lambda: events(kubeapi), what="event")
    assert "is Ready here" in events(kubeapi)[0]["message"]
    assert "flox/cuda" not in pw.jobs  # the gpu prewarm never applied here


async def test_agent_with_a_failing_prewarm_removes_the_taint_at_the_timeout(
        kubeapi: FakeKubeAPI, agents: Agents) -> None:
    kubeapi.create(tainted("n1", [WARMING]))
    kubeapi.create(prewarm_resource("bad", ["flox/broken"]))
    pw = FakePrewarmer()
    pw.fail_with["flox/broken"] = "upstream unavailable"
    agents.start("n1", pw, options=dataclasses.replace(TAINTING, warm_taint_timeout=1))
    await eventually(lambda: taints(kubeapi) == [], what="taint removed at the timeout")
    await eventually(lambda: events(kubeapi), what="event")
    assert events(kubeapi)[0]["message"].endswith("not Ready here: bad")


async def test_agent_without_warm_taint_leaves_the_node_alone(
        kubeapi: FakeKubeAPI, agents: Agents) -> None:
    kubeapi.create(tainted("n1", [WARMING]))
    kubeapi.create(prewarm_resource("web", ["flox/web"]))
    pw = agents.start("n1")  # FAST: warm_taint off
    await eventually(lambda: "flox/web" in pw.jobs)
    await stays(lambda: taints(kubeapi) == [WARMING])
    assert node_patches(kubeapi) == []


# --- the real agent process --------------------------------------------------------------

def test_real_agent_lifts_the_taint_once_the_closure_is_in_its_store(
        tmp_path: Path, upstream_server: UpstreamServer, signing_key: tuple[Path, str],
        small_closure: Closure) -> None:
    # `run --warm-taint` through config, runtime and watchers: a real prefetch from FloxHub
    # (git) and an upstream cache must finish before the taint goes.
    meta = Floxmeta(tmp_path / "floxhub")
    meta.create_owner("acme")
    meta.add_generation("acme", "web", lockfile_for(*small_closure.roots))
    with FakeKubeAPI() as api, GitHTTPServer(meta.root) as git:
        api.create(tainted("n1", [OTHER, WARMING]))
        api.create(prewarm_resource("web", ["acme/web"]))
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        with AgentProcess(tmp_path / "agent", [upstream_server.url], [signing_key[1]],
                          "--kubernetes", "on", "--kubeconfig", str(kubeconfig),
                          "--node-name", "n1", "--floxhub-git-url", git.url,
                          "--warm-taint", KEY, "--warm-taint-timeout", "120") as agent:
            deadline = time.monotonic() + 60
            while taints(api) != [OTHER] and time.monotonic() < deadline:
                time.sleep(0.2)
            assert taints(api) == [OTHER], agent.logs()[-2000:]

            def node_entry() -> dict:  # folded in by the lease holder, up to 2 s later
                status = api.get("EnvironmentPrewarm", "web").get("status") or {}
                return (status.get("nodes") or {}).get("n1") or {}
            while not node_entry() and time.monotonic() < deadline + 10:
                time.sleep(0.2)
            status = node_entry()
            assert status["phase"] == "Ready" and status["pathsDone"] == status["pathsTotal"] > 0
            (event,) = events(api)
            assert event["message"].endswith("is Ready here")
