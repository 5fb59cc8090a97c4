"""The rollout gate never sticks and never lies: the agent side against a stricter API server
(lost status writes, stalls, silent watches, 410 storms, Retry-After, denied watchers,
delete+recreate during a watch gap)."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import REGISTRY

from agent.kube import health
from tests.kube import FAST, Agents, FakePrewarmer, eventually, node, pod, prewarm_resource
from tests.support.kubeapi import FakeKubeAPI


def entry(api: FakeKubeAPI, name: str, node_name: str = "n1") -> dict[str, Any]:
    obj = api.get("EnvironmentPrewarm", name)
    return ((obj.get("status") or {}).get("nodes") or {}).get(node_name) or {}


async def test_failed_final_status_write_is_retried_until_it_lands(
        kubeapi: FakeKubeAPI, agents: Agents) -> None:
    kubeapi.create(node("n1"))
    pw = FakePrewarmer()
    pw.hold = {"flox/a"}
    agents.start("n1", pw)
    kubeapi.create(prewarm_resource("r", ["flox/a"]))
    await eventually(lambda: entry(kubeapi, "r").get("phase") == "Pulling")
    kubeapi.inject(503, times=3, verb="patch", subresource="status")
    pw.jobs["flox/a"].finish()
    await eventually(lambda: entry(kubeapi, "r").get("phase") == "Ready",
                     what="the Ready write after three 503s")


async def test_a_stalled_status_write_times_out_and_is_retried(
        kubeapi: FakeKubeAPI, agents: Agents) -> None:
    kubeapi.create(node("n1"))
    kubeapi.inject(stall=60, times=1, verb="patch", subresource="status")
    agents.start("n1")
    kubeapi.create(prewarm_resource("r", ["flox/a"]))
    await eventually(lambda: entry(kubeapi, "r").get("phase") == "Ready",
                     what="Ready despite a status write that hangs")


async def test_after_a_relist_each_node_reports_its_state_again(
        kubeapi: FakeKubeAPI, agents: Agents) -> None:
    kubeapi.create(node("n1"))
    agents.start("n1")
    kubeapi.create(prewarm_resource("r", ["flox/a"]))
    await eventually(lambda: entry(kubeapi, "r").get("phase") == "Ready")
    # the status is lost (a restore from backup) while the agent's watch is down
    kubeapi.pause_watches()
    kubeapi.drop_watches(abrupt=True)
    await eventually(lambda: kubeapi.open_watches("environmentprewarms") == 0)
    obj = kubeapi.get("EnvironmentPrewarm", "r")
    obj["status"] = {"nodes": {}}
    kubeapi.update(obj, status=True)
    kubeapi.restart()
    kubeapi.resume_watches()
    await eventually(lambda: entry(kubeapi, "r").get("phase") == "Ready",
                     what="the node's state reported again after the relist")


async def test_recreated_under_the_same_name_during_a_watch_gap_is_acted_on(
        kubeapi: FakeKubeAPI, agents: Agents) -> None:
    kubeapi.create(node("n1"))
    pw = agents.start("n1")
    kubeapi.create(prewarm_resource("r", ["flox/a"]))
    await eventually(lambda: entry(kubeapi, "r").get("phase") == "Ready")
    kubeapi.pause_watches()
    kubeapi.drop_watches(abrupt=True)
    await eventually(lambda: kubeapi.open_watches("environmentprewarms") == 0)
    kubeapi.delete(kubeapi.get("EnvironmentPrewarm", "r"))
    kubeapi.create(prewarm_resource("r", ["flox/b"]))  # generation 1 again, a new uid
    kubeapi.compact()
    kubeapi.resume_watches()
    await eventually(lambda: "flox/b" in pw.refs(), what="the recreated prewarm acted on")
    await eventually(lambda: entry(kubeapi, "r").get("phase") == "Ready")


async def test_watchers_start_independently_and_report_health(
        kubeapi: FakeKubeAPI, agents: Agents) -> None:
    kubeapi.create(node("n1"))
    kubeapi.inject(403, times=None, verb="list", resource="nodes")
    kubeapi.create(pod("web", "n1", "flox/web"))
    kubeapi.create(prewarm_resource("r", ["flox/a"]))  # no selector: needs no labels
    pw = agents.start("n1")
    await eventually(lambda: "flox/web" in pw.refs(), what="pods watched without the node")
    await eventually(lambda: entry(kubeapi, "r").get("phase") == "Ready")
    await eventually(lambda: health.snapshot()["n1"]["nodes"]["consecutive_failures"]
                     >= health.FAILING_AFTER)
    state = health.snapshot()["n1"]
    assert "403" in state["nodes"]["last_error"] and state["nodes"]["last_list"] is None
    assert state["pods"]["consecutive_failures"] == 0 and state["pods"]["last_list"]
    assert REGISTRY.get_sample_value("flox_node_cache_kube_watch_consecutive_failures",
                                     {"resource": "nodes"}) >= 2
    assert not health.healthy()


async def test_a_silent_watch_is_noticed_and_resumed(kubeapi: FakeKubeAPI,
                                                     agents: Agents) -> None:
    kubeapi.create(node("n1"))
    pw = agents.start("n1")
    await eventually(lambda: kubeapi.open_watches("pods") == 1)
    kubeapi.silence_watches()
    kubeapi.create(pod("web", "n1", "flox/web"))
    await asyncio.sleep(0.2)
    kubeapi.silence_watches(False)  # new streams talk again; the old one stays mute
    await eventually(lambda: "flox/web" in pw.refs(), what="the event sent into silence")
    lists = kubeapi.requests_for("pods", watch=False)
    assert len(lists) == 1  # resumed from its resourceVersion, not relisted


async def test_410_storm_backs_off_and_retry_after_is_honoured(
        kubeapi: FakeKubeAPI, agents: Agents) -> None:
    kubeapi.create(node("n1"))
    kubeapi.expired_watch_as_http = True
    kubeapi.inject(410, times=None, verb="watch", resource="pods")
    kubeapi.inject(429, times=None, verb="list", resource="deployments", retry_after=5)
    agents.start("n1")
    await asyncio.sleep(1.5)
    # FAST backs off 0.1-0.5 s: a handful of relists, not hundreds
    assert 2 <= len(kubeapi.requests_for("pods", watch=False)) <= 10
    assert len(kubeapi.requests_for("deployments", watch=False)) == 1  # Retry-After: 5


async def test_lists_are_served_from_the_watch_cache(kubeapi: FakeKubeAPI,
                                                     agents: Agents) -> None:
    kubeapi.create(node("n1"))
    agents.start("n1")
    await eventually(lambda: kubeapi.open_watches("pods") == 1)
    for plural in ("pods", "nodes", "environmentprewarms", "deployments"):
        assert kubeapi.requests_for(plural, watch=False)[0].query.get("resourceVersion") == "0"


def test_fast_options_are_the_production_code_path() -> None:
    assert FAST.watch.read_timeout < 5  # so the silent-watch test is quick
