"""EnvironmentPrewarm: every matching node prefetches and reports its own status entry."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from tests.kube import Agents, FakePrewarmer, eventually, node, prewarm_resource, stays
from tests.support.kubeapi import FakeKubeAPI

NODES = ["n1", "n2", "n3"]


def node_status(api: FakeKubeAPI, name: str, node_name: str) -> dict[str, Any]:
    obj = api.get("EnvironmentPrewarm", name)
    return ((obj.get("status") or {}).get("nodes") or {}).get(node_name) or {}


def phase(api: FakeKubeAPI, name: str, node_name: str) -> str | None:
    return node_status(api, name, node_name).get("phase")


async def test_three_agents_report_their_own_node_without_overwriting(
        kubeapi: FakeKubeAPI, agents: Agents) -> None:
    for n in NODES:
        kubeapi.create(node(n))
    pws: dict[str, FakePrewarmer] = {}
    for n in NODES:
        pws[n] = FakePrewarmer()
        pws[n].hold = {"flox/quotes-app:3", "flox/redis"}
        agents.start(n, pws[n])
    kubeapi.create(prewarm_resource("rollout", ["flox/quotes-app:3", "flox/redis"]))

    for n in NODES:
        await eventually(lambda n=n: phase(kubeapi, "rollout", n) == "Pulling", what=n)
        assert ("flox/quotes-app:3", "prewarm:rollout:flox/quotes-app:3",
                "x86_64-linux") in pws[n].calls
    pws["n2"].jobs["flox/redis"].advance(4, 400)
    await eventually(lambda: node_status(kubeapi, "rollout", "n2").get("bytesDone") == 400)
    assert node_status(kubeapi, "rollout", "n2")["pathsTotal"] == 20  # both envs summed

    for n in NODES:
        for job in pws[n].jobs.values():
            job.finish()
    for n in NODES:
        await eventually(lambda n=n: phase(kubeapi, "rollout", n) == "Ready", what=n)
    status = kubeapi.get("EnvironmentPrewarm", "rollout")["status"]["nodes"]
    assert sorted(status) == NODES  # all three entries landed
    for entry in status.values():
        assert entry["pathsDone"] == entry["pathsTotal"] == 20
        assert entry["bytesDone"] == entry["bytesTotal"] == 2000
        assert entry["observedGeneration"] == 1 and entry["lastUpdate"].endswith("Z")
    # each node wrote only its own NodePrewarm; one agent (the lease holder) folded them in;
    # all through the status subresource as merge patches
    patches = [r for r in kubeapi.requests if r.method == "PATCH"]
    assert {r.name for r in patches if r.resource == "nodeprewarms"} == set(NODES)
    assert {r.name for r in patches if r.resource == "environmentprewarms"} == {"rollout"}
    assert {(r.subresource, r.content_type) for r in patches} == {
        ("status", "application/merge-patch+json")}
    lease = kubeapi.get("Lease", "flox-node-cache-aggregator", "flox-node-cache")
    assert lease["spec"]["holderIdentity"] in NODES
    assert kubeapi.open_watches("nodeprewarms") == 1  # only the holder sees others' progress


async def test_failure_reports_reason_and_event_and_deletion_unpins(
        kubeapi: FakeKubeAPI, agents: Agents) -> None:
    kubeapi.create(node("n1"))
    pw = FakePrewarmer()
    pw.fail_with["flox/broken"] = "narinfo signature invalid"
    agents.start("n1", pw)
    kubeapi.create(prewarm_resource("bad", ["flox/redis", "flox/broken"]))
    await eventually(lambda: phase(kubeapi, "bad", "n1") == "Failed")
    assert "flox/broken: narinfo signature invalid" in node_status(kubeapi, "bad", "n1")["message"]
    events = await eventually(lambda: kubeapi.list("Event"))  # written after the status
    assert len(events) == 1
    ev = events[0]
    assert ev["metadata"]["namespace"] == "default" and ev["type"] == "Warning"
    assert ev["involvedObject"]["kind"] == "EnvironmentPrewarm"
    assert ev["involvedObject"]["name"] == "bad"
    assert "narinfo signature invalid" in ev["message"]

    kubeapi.delete(kubeapi.get("EnvironmentPrewarm", "bad"))
    await eventually(lambda: {"prewarm:bad:flox/redis", "prewarm:bad:flox/broken"}
                     <= set(pw.unpins))


async def test_edit_takes_effect_and_selector_and_pin_are_honoured(
        kubeapi: FakeKubeAPI, agents: Agents) -> None:
    kubeapi.create(node("n1", {"pool": "gpu"}))
    kubeapi.create(node("n2", {"pool": "cpu"}))
    p1, p2 = agents.start("n1"), agents.start("n2")
    kubeapi.create(prewarm_resource("gpu", ["flox/cuda:1"], selector={"pool": "gpu"},
                                    pin=False))
    await eventually(lambda: phase(kubeapi, "gpu", "n1") == "Ready")
    assert p1.calls == [("flox/cuda:1", None, "x86_64-linux")]  # pin: false
    await stays(lambda: p2.calls == [] and phase(kubeapi, "gpu", "n2") is None)

    obj = kubeapi.get("EnvironmentPrewarm", "gpu")
    obj["spec"]["environments"] = ["flox/cuda:2"]
    obj["spec"]["pin"] = True
    assert kubeapi.update(obj)["metadata"]["generation"] == 2
    await eventually(lambda: node_status(kubeapi, "gpu", "n1").get("observedGeneration") == 2
                     and phase(kubeapi, "gpu", "n1") == "Ready")
    assert p1.calls[-1] == ("flox/cuda:2", "prewarm:gpu:flox/cuda:2", "x86_64-linux")
    # status writes from the agent (no generation change) did not restart the work
    await stays(lambda: len(p1.calls) == 2)


async def test_deadline_marks_late_node_failed_then_ready_when_done(
        kubeapi: FakeKubeAPI, agents: Agents) -> None:
    kubeapi.create(node("n1"))
    pw = FakePrewarmer()
    pw.hold = {"flox/huge"}
    agents.start("n1", pw)
    deadline = (datetime.now(UTC) + timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    kubeapi.create(prewarm_resource("late", ["flox/huge"], deadline=deadline))
    await eventually(lambda: phase(kubeapi, "late", "n1") == "Failed", timeout=4)
    assert node_status(kubeapi, "late", "n1")["message"].startswith("deadline exceeded")
    await eventually(lambda: any("deadline exceeded" in e["message"]
                                 for e in kubeapi.list("Event")))  # written after the status
    pw.jobs["flox/huge"].finish()  # the prefetch was not cancelled: it still lands
    await eventually(lambda: phase(kubeapi, "late", "n1") == "Ready")


async def test_node_joining_later_acts_on_existing_resources(
        kubeapi: FakeKubeAPI, agents: Agents) -> None:
    kubeapi.create(node("n1"))
    agents.start("n1")
    kubeapi.create(prewarm_resource("early", ["flox/redis"]))
    await eventually(lambda: phase(kubeapi, "early", "n1") == "Ready")
    kubeapi.create(node("n9"))
    late = agents.start("n9")
    await eventually(lambda: phase(kubeapi, "early", "n9") == "Ready")
    assert late.calls == [("flox/redis", "prewarm:early:flox/redis", "x86_64-linux")]


async def test_ttl_after_finished_releases_pins_and_deletes_the_prewarm(
        kubeapi: FakeKubeAPI, agents: Agents) -> None:
    pws = {}
    for n in ("n1", "n2"):
        kubeapi.create(node(n))
        pws[n] = agents.start(n)
    body = prewarm_resource("short", ["flox/redis"])
    body["spec"]["ttlSecondsAfterFinished"] = 1
    kubeapi.create(body)
    for n in ("n1", "n2"):
        await eventually(lambda n=n: phase(kubeapi, "short", n) == "Ready")
    await eventually(lambda: not kubeapi.list("EnvironmentPrewarm"), timeout=8,
                     what="the finished prewarm deleted after its TTL")
    for n in ("n1", "n2"):
        await eventually(lambda n=n: "prewarm:short:flox/redis" in pws[n].unpins)
        assert pws[n].pins == {}


async def test_a_prewarm_deleted_while_a_node_was_down_is_unpinned_when_it_returns(
        kubeapi: FakeKubeAPI, kubeconfig: str) -> None:
    kubeapi.create(node("n1"))
    pw = FakePrewarmer()  # the node's store: its pins outlive the agent process
    first = Agents(kubeconfig)
    first.start("n1", pw)
    kubeapi.create(prewarm_resource("gone", ["flox/redis"]))
    kubeapi.create(prewarm_resource("kept", ["flox/quotes-app:3"]))
    await eventually(lambda: phase(kubeapi, "gone", "n1") == phase(kubeapi, "kept", "n1")
                     == "Ready")
    await first.stop()  # the node is down ...
    kubeapi.delete(kubeapi.get("EnvironmentPrewarm", "gone"))  # ... when this goes
    pw.pins["prewarm:kept"] = {"flox/quotes-app:3"}  # the holder an older version used
    second = Agents(kubeconfig)
    second.start("n1", pw)
    try:
        await eventually(lambda: "prewarm:gone:flox/redis" in pw.unpins,
                         what="the pin of the prewarm deleted meanwhile released")
        await eventually(lambda: "prewarm:kept" in pw.unpins, what="the old holder replaced")
        await stays(lambda: "prewarm:kept:flox/quotes-app:3" in pw.pins)
    finally:
        await second.stop()


async def test_another_agent_takes_over_aggregation_when_the_lease_holder_stops(
        kubeapi: FakeKubeAPI, agents: Agents) -> None:
    for n in ("n1", "n2"):
        kubeapi.create(node(n))
    agents.start("n1")
    await eventually(lambda: kubeapi.open_watches("nodeprewarms") == 1)  # n1 holds the lease
    agents.start("n2")
    await eventually(lambda: kubeapi.open_watches("pods") == 2)
    agents.tasks[0].cancel()  # n1 goes away without releasing the lease
    kubeapi.create(prewarm_resource("after", ["flox/redis"]))
    await eventually(lambda: phase(kubeapi, "after", "n2") == "Ready", what="n2 aggregating")
    lease = kubeapi.get("Lease", "flox-node-cache-aggregator", "flox-node-cache")
    assert lease["spec"]["holderIdentity"] == "n2" and lease["spec"]["leaseTransitions"] == 1
    assert kubeapi.get("EnvironmentPrewarm", "after")["status"]["summary"] == {"Ready": 1}


async def test_a_deleted_node_leaves_the_aggregate(kubeapi: FakeKubeAPI, agents: Agents) -> None:
    for n in ("n1", "n2"):
        kubeapi.create(node(n))
        agents.start(n)
    kubeapi.create(prewarm_resource("r", ["flox/redis"]))
    for n in ("n1", "n2"):
        await eventually(lambda n=n: phase(kubeapi, "r", n) == "Ready")
    owner = kubeapi.get("NodePrewarm", "n2")["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"]) == ("Node", "n2")
    agents.tasks[1].cancel()
    kubeapi.delete(kubeapi.get("Node", "n2"))  # its NodePrewarm is garbage-collected
    await eventually(lambda: phase(kubeapi, "r", "n2") is None, what="n2 gone from the status")
    assert kubeapi.get("EnvironmentPrewarm", "r")["status"]["summary"] == {"Ready": 1}
