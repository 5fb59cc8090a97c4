"""Pods on this node pin their environment while they exist; pods elsewhere are ignored."""

from __future__ import annotations

from tests.kube import Agents, eventually, node, pod, stays
from tests.support.kubeapi import FakeKubeAPI


async def test_pods_pin_while_present_and_unpin_when_gone(kubeapi: FakeKubeAPI,
                                                         agents: Agents) -> None:
    kubeapi.create(node("n1"))
    kubeapi.create(node("n2"))
    # present before the agent starts: the initial list must see it
    kubeapi.create(pod("early", "n1", "flox/redis"))
    pw = agents.start("n1")
    await eventually(lambda: ("flox/redis", "pod:flox/redis", "x86_64-linux") in pw.calls)

    kubeapi.create(pod("a", "n1", "flox/quotes-app:7"))
    kubeapi.create(pod("b", "n1", "flox/quotes-app:7"))
    kubeapi.create(pod("elsewhere", "n2", "flox/other"))
    kubeapi.create(pod("plain", "n1", None, runtime=None))
    kubeapi.create(pod("runc", "n1", "flox/runc-env", runtime="runc"))
    await eventually(lambda: "pod:flox/quotes-app:7" in pw.pins)
    await stays(lambda: pw.refs().count("flox/quotes-app:7") == 1)  # refcounted: one prewarm
    assert "flox/other" not in pw.refs() and "flox/runc-env" not in pw.refs()

    kubeapi.delete(pod("a", "n1", None))
    await stays(lambda: "pod:flox/quotes-app:7" not in pw.unpins)  # b still runs
    finished = pod("b", "n1", "flox/quotes-app:7", phase="Succeeded")
    kubeapi.update(finished, status=True)  # the kubelet reports the end through /status
    await eventually(lambda: "pod:flox/quotes-app:7" in pw.unpins)
    kubeapi.delete(pod("early", "n1", None))
    await eventually(lambda: "pod:flox/redis" in pw.unpins)
    assert pw.pins == {}


async def test_pod_scheduled_later_is_seen_when_bound(kubeapi: FakeKubeAPI,
                                                     agents: Agents) -> None:
    kubeapi.create(node("n1"))
    pw = agents.start("n1")
    await eventually(lambda: kubeapi.open_watches("pods") == 1)
    pending = kubeapi.create(pod("p", None, "flox/redis"))
    await stays(lambda: pw.calls == [], 0.2)
    pending["spec"]["nodeName"] = "n1"  # the scheduler binds it: enters the field selector
    kubeapi.update(pending)
    await eventually(lambda: pw.refs() == ["flox/redis"])


async def test_agent_shutdown_closes_cleanly(kubeapi: FakeKubeAPI, agents: Agents) -> None:
    kubeapi.create(node("n1"))
    agents.start("n1")
    await eventually(lambda: kubeapi.open_watches() >= 7, what="all watches open")
    await agents.stop()
    await eventually(lambda: kubeapi.open_watches() == 0, what="watches closed")
    agents.tasks.clear()
