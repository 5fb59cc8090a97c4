"""The list+watch loop: resume after a drop, relist after 410, bookmarks, backoff, paging."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from kubernetes_asyncio import client as k8s
from prometheus_client import REGISTRY

from agent.kube.client import make_api_client
from agent.kube.watch import ListWatch, WatchOptions
from tests.kube import Agents, eventually, node, pod, stays
from tests.support.kubeapi import FakeKubeAPI

OPTS = WatchOptions(timeout_seconds=30, page_size=2, backoff_base=0.2, backoff_cap=0.5,
                    min_stream_seconds=0.05)


class Recorder:
    def __init__(self) -> None:
        self.resyncs: list[list[str]] = []
        self.events: list[tuple[str, str]] = []

    async def resync(self, objects: list[dict[str, Any]]) -> None:
        self.resyncs.append(sorted(o["metadata"]["name"] for o in objects))

    async def event(self, type_: str, obj: dict[str, Any]) -> None:
        self.events.append((type_, obj["metadata"]["name"]))


def restarts(resource: str, reason: str) -> float:
    return REGISTRY.get_sample_value("flox_node_cache_kube_watch_restarts_total",
                                     {"resource": resource, "reason": reason}) or 0.0


@pytest.fixture
async def pod_watch(kubeconfig: str) -> AsyncIterator[tuple[ListWatch, Recorder]]:
    api = await make_api_client(kubeconfig)
    rec = Recorder()
    lw = ListWatch("pods", k8s.CoreV1Api(api).list_pod_for_all_namespaces, rec,
                   {"field_selector": "spec.nodeName=n1"}, OPTS)
    task = asyncio.get_running_loop().create_task(lw.run())
    yield lw, rec
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await api.close()


@pytest.mark.parametrize("abrupt", [True, False])
async def test_dropped_watch_resumes_from_last_rv_without_losing_events(
        kubeapi: FakeKubeAPI, pod_watch: tuple[ListWatch, Recorder], abrupt: bool) -> None:
    lw, rec = pod_watch
    await eventually(lambda: kubeapi.open_watches("pods") == 1)
    a = kubeapi.create(pod("a", "n1", "flox/a"))
    await eventually(lambda: ("ADDED", "a") in rec.events)
    assert lw.rv == a["metadata"]["resourceVersion"]
    before = restarts("pods", "error" if abrupt else "closed")

    kubeapi.pause_watches()  # the reconnect waits until the change below is made
    kubeapi.drop_watches(abrupt=abrupt)
    await eventually(lambda: kubeapi.open_watches("pods") == 0)
    kubeapi.create(pod("b", "n1", "flox/b"))  # happens while no stream is open
    kubeapi.resume_watches()
    await eventually(lambda: ("ADDED", "b") in rec.events, what="event sent while down")

    assert rec.resyncs == [[]]  # resumed, not relisted
    assert len(kubeapi.requests_for("pods", watch=False)) == 1
    watches = kubeapi.requests_for("pods", watch=True)
    assert watches[-1].query["resourceVersion"] == a["metadata"]["resourceVersion"]
    assert watches[-1].query["allowWatchBookmarks"] in ("true", "True")
    assert restarts("pods", "error" if abrupt else "closed") >= before + 1


async def test_compaction_gives_410_and_a_relist_that_keeps_state_right(
        kubeapi: FakeKubeAPI, agents: Agents) -> None:
    kubeapi.create(node("n1"))
    for name, ref in [("a", "flox/a"), ("b", "flox/b"), ("c", "flox/c")]:
        kubeapi.create(pod(name, "n1", ref))
    pw = agents.start("n1")
    await eventually(lambda: sorted(pw.refs()) == ["flox/a", "flox/b", "flox/c"])
    # the initial list came from the watch cache (no paging)
    assert kubeapi.requests_for("pods", watch=False)[0].query["resourceVersion"] == "0"
    await eventually(lambda: kubeapi.open_watches("pods") == 1)
    lists_before = len(kubeapi.requests_for("pods", watch=False))
    expired_before = restarts("pods", "expired")

    kubeapi.pause_watches()
    kubeapi.drop_watches(abrupt=True)
    await eventually(lambda: kubeapi.open_watches("pods") == 0)
    kubeapi.delete(pod("a", "n1", None))  # both changes fall into the forgotten history
    kubeapi.create(pod("d", "n1", "flox/d"))
    kubeapi.compact()
    kubeapi.resume_watches()

    await eventually(lambda: "pod:flox/a" in pw.unpins, what="unpin of the pod deleted in the gap")
    await eventually(lambda: "flox/d" in pw.refs(), what="prewarm of the pod added in the gap")
    assert restarts("pods", "expired") == expired_before + 1
    assert len(kubeapi.requests_for("pods", watch=False)) > lists_before  # relisted
    await stays(lambda: sorted(pw.refs()) == ["flox/a", "flox/b", "flox/c", "flox/d"])
    assert pw.unpins == ["pod:flox/a"]  # b and c survived the relist untouched


async def test_bookmarks_advance_the_resume_point(
        kubeapi: FakeKubeAPI, pod_watch: tuple[ListWatch, Recorder]) -> None:
    lw, rec = pod_watch
    await eventually(lambda: kubeapi.open_watches("pods") == 1)
    unrelated = kubeapi.create(pod("other-node", "n2", "flox/x"))  # moves the global RV only
    kubeapi.send_bookmarks()
    await eventually(lambda: lw.rv == unrelated["metadata"]["resourceVersion"])
    assert rec.events == []
    kubeapi.drop_watches()
    await eventually(lambda: len(kubeapi.requests_for("pods", watch=True)) == 2)
    assert kubeapi.requests_for("pods", watch=True)[-1].query["resourceVersion"] == lw.rv


async def test_unreachable_server_backs_off_instead_of_spinning(tmp_path: Any) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there: every attempt is refused at once
    with FakeKubeAPI() as api:
        cfg = api.write_kubeconfig(tmp_path / "kc")
    cfg.write_text(cfg.read_text().replace(f"127.0.0.1:{api.port}", f"127.0.0.1:{port}"))
    client = await make_api_client(str(cfg))
    rec = Recorder()
    lw = ListWatch("backoff-test", k8s.CoreV1Api(client).list_node, rec, {}, OPTS)
    task = asyncio.get_running_loop().create_task(lw.run())
    await asyncio.sleep(1.5)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await client.close()
    attempts = restarts("backoff-test", "error")
    # 0.1-0.2, 0.2-0.4, then <=0.5 s apart: a handful of attempts, not thousands
    assert 2 <= attempts <= 10


async def test_a_cached_list_older_than_the_history_is_followed_by_a_paged_quorum_list(
        kubeapi: FakeKubeAPI, agents: Agents) -> None:
    kubeapi.create(node("n1"))
    for name in ("a", "b", "c"):
        kubeapi.create(pod(name, "n1", f"flox/{name}"))
    kubeapi.inject(410, times=1, verb="watch", resource="pods")  # the cache was behind
    kubeapi.expired_watch_as_http = True
    pw = agents.start("n1")
    await eventually(lambda: kubeapi.open_watches("pods") == 1)
    lists = kubeapi.requests_for("pods", watch=False)
    assert lists[0].query["resourceVersion"] == "0"
    assert "resourceVersion" not in lists[1].query and lists[1].query["limit"] == "2"
    assert "continue" in lists[2].query  # three pods with page_size=2: two pages
    assert sorted(pw.refs()) == ["flox/a", "flox/b", "flox/c"]
