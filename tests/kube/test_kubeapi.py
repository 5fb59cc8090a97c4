"""The fake API server answers the real client the way kube-apiserver does."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException

from agent.kube.client import GROUP, PLURAL, VERSION, make_api_client
from tests.kube import eventually, node, pod, prewarm_resource
from tests.support.kubeapi import FakeKubeAPI, parse_label_selector

MERGE = "application/merge-patch+json"


@pytest.fixture
async def api(kubeconfig: str) -> AsyncIterator[ApiClient]:
    client = await make_api_client(kubeconfig)
    yield client
    await client.close()


async def test_selectors(kubeapi: FakeKubeAPI, api: ApiClient) -> None:
    kubeapi.create(node("a", {"pool": "gpu", "zone": "1"}))
    kubeapi.create(node("b", {"pool": "cpu"}))
    kubeapi.create(node("c", flox=False))
    core = k8s.CoreV1Api(api)

    async def names(**kw: str) -> list[str]:
        return [n.metadata.name for n in (await core.list_node(**kw)).items]

    assert await names(label_selector="pool in (gpu,cpu),flox.dev/enabled=true") == ["a", "b"]
    assert await names(label_selector="pool notin (gpu)") == ["b", "c"]
    assert await names(label_selector="!pool") == ["c"]
    assert await names(label_selector="zone,pool!=cpu") == ["a"]
    assert await names(field_selector="metadata.name=b") == ["b"]
    with pytest.raises(ApiException) as e:
        await core.list_node(field_selector="spec.nodeName=a")
    assert e.value.status == 400  # not a supported field for nodes
    kubeapi.create(pod("p", "a", "flox/x", ns="team"))
    pods = await core.list_pod_for_all_namespaces(field_selector="spec.nodeName=a")
    assert [p.metadata.namespace for p in pods.items] == ["team"]
    assert (await core.list_namespaced_pod("other")).items == []
    assert parse_label_selector("a in (x, y),b")[0] == ("a", "in", {"x", "y"})


async def test_status_subresource_generation_and_patch_types(kubeapi: FakeKubeAPI,
                                                             api: ApiClient) -> None:
    custom = k8s.CustomObjectsApi(api)
    created = await custom.create_cluster_custom_object(
        GROUP, VERSION, PLURAL, prewarm_resource("r", ["flox/a"]))
    assert created["metadata"]["generation"] == 1
    rv = created["metadata"]["resourceVersion"]

    # status patch touches only status, keeps generation
    out = await custom.patch_cluster_custom_object_status(
        GROUP, VERSION, PLURAL, "r", {"spec": {"pin": False},
                                      "status": {"nodes": {"n1": {"phase": "Ready"}}}},
        _content_type=MERGE)
    assert out["spec"]["pin"] is True and out["status"]["nodes"]["n1"]["phase"] == "Ready"
    assert out["metadata"]["generation"] == 1 and int(out["metadata"]["resourceVersion"]) > int(rv)
    # a second node's key merges beside the first
    out = await custom.patch_cluster_custom_object_status(
        GROUP, VERSION, PLURAL, "r", {"status": {"nodes": {"n2": {"phase": "Pulling"}}}},
        _content_type=MERGE)
    assert sorted(out["status"]["nodes"]) == ["n1", "n2"]
    # the main resource ignores status, bumps generation on spec change
    out = await custom.patch_cluster_custom_object(
        GROUP, VERSION, PLURAL, "r", {"spec": {"pin": False}, "status": None},
        _content_type=MERGE)
    assert out["metadata"]["generation"] == 2 and sorted(out["status"]["nodes"]) == ["n1", "n2"]
    # a no-op patch does not produce a new resourceVersion
    same = await custom.patch_cluster_custom_object(
        GROUP, VERSION, PLURAL, "r", {"spec": {"pin": False}}, _content_type=MERGE)
    assert same["metadata"]["resourceVersion"] == out["metadata"]["resourceVersion"]
    # the client's default for a dict body is json-patch, which a dict cannot be (400, as
    # kube-apiserver answers a patch it cannot decode)
    with pytest.raises(ApiException) as e:
        await custom.patch_cluster_custom_object(GROUP, VERSION, PLURAL, "r", {"spec": {}})
    assert e.value.status == 400
    # a JSON patch (RFC 6902) works on custom resources; strategic merge does not
    out = await custom.patch_cluster_custom_object(
        GROUP, VERSION, PLURAL, "r", [{"op": "test", "path": "/spec/pin", "value": False},
                                      {"op": "add", "path": "/spec/environments/-",
                                       "value": "flox/b"}],
        _content_type="application/json-patch+json")
    assert out["spec"]["environments"] == ["flox/a", "flox/b"]
    with pytest.raises(ApiException) as e:
        await custom.patch_cluster_custom_object(
            GROUP, VERSION, PLURAL, "r", {"spec": {"pin": True}},
            _content_type="application/strategic-merge-patch+json")
    assert e.value.status == 415
    # a uid precondition naming another object (deleted and recreated) is a conflict
    with pytest.raises(ApiException) as e:
        await custom.patch_cluster_custom_object_status(
            GROUP, VERSION, PLURAL, "r", {"metadata": {"uid": "not-this-one"}, "status": {}},
            _content_type=MERGE)
    assert e.value.status == 409
    with pytest.raises(ApiException) as e:
        await custom.delete_cluster_custom_object(
            GROUP, VERSION, PLURAL, "r", body=k8s.V1DeleteOptions(
                preconditions=k8s.V1Preconditions(uid="not-this-one")))
    assert e.value.status == 409
    # stale resourceVersion on replace
    stale = dict(created, spec={"environments": []})
    with pytest.raises(ApiException) as e:
        await custom.replace_cluster_custom_object(GROUP, VERSION, PLURAL, "r", stale)
    assert e.value.status == 409


async def test_watch_from_compacted_rv_is_410_and_auth_is_required(
        kubeapi: FakeKubeAPI, api: ApiClient) -> None:
    kubeapi.create(node("a"))
    kubeapi.compact()
    resp = await k8s.CoreV1Api(api).list_node(watch=True, resource_version="1",
                                              _preload_content=False)
    event = json.loads(await resp.content.readline())
    resp.release()
    assert event["type"] == "ERROR" and event["object"]["code"] == 410
    with FakeKubeAPI() as other:  # a token for another server is refused
        api.configuration.host = other.url
        other.requests.clear()
        api.configuration.api_key = {"authorization": "Bearer wrong"}
        with pytest.raises(ApiException) as e:
            await k8s.CoreV1Api(api).list_node()
        assert e.value.status == 401


async def _watch_lines(api: ApiClient, **kw: Any) -> list[dict[str, Any]]:
    """Every event of one node watch, until the server ends it."""
    resp = await k8s.CoreV1Api(api).list_node(watch=True, _preload_content=False, **kw)
    events = []
    async with asyncio.timeout(10):
        while line := await resp.content.readline():
            events.append(json.loads(line))
    resp.release()
    return events


async def test_server_ends_watches_and_sends_bookmarks(tmp_path: Path) -> None:
    with FakeKubeAPI(watch_lifetime=(0.5, 0.5), bookmark_interval=0.1) as server:
        server.create(node("a"))
        api = await make_api_client(str(server.write_kubeconfig(tmp_path / "kc")))
        # the server's own end of a watch (no timeoutSeconds given), with bookmarks
        events = await _watch_lines(api, allow_watch_bookmarks=True)
        assert events[0]["type"] == "ADDED"
        assert any(e["type"] == "BOOKMARK" for e in events[1:])
        # timeoutSeconds ends it sooner; no bookmarks unless asked for
        server.watch_lifetime = (60, 60)
        events = await _watch_lines(api, timeout_seconds=1)
        assert [e["type"] for e in events] == ["ADDED"]
        await api.close()


async def test_bounded_history_410_in_stream_or_as_http_and_504_when_too_new(
        tmp_path: Path) -> None:
    with FakeKubeAPI(history_limit=2) as server:
        first = server.create(node("a"))["metadata"]["resourceVersion"]
        for name in ("b", "c", "d"):
            server.create(node(name))
        api = await make_api_client(str(server.write_kubeconfig(tmp_path / "kc")))
        events = await _watch_lines(api, resource_version=first)
        assert [(e["type"], e["object"]["code"]) for e in events] == [("ERROR", 410)]
        recent = int(server.get("Node", "d")["metadata"]["resourceVersion"]) - 1
        server.watch_lifetime = (0.3, 0.3)
        events = await _watch_lines(api, resource_version=str(recent))
        assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
            ("ADDED", "d")]  # what is still in the history is replayed
        events = await _watch_lines(api, resource_version=str(recent + 100))
        assert [(e["type"], e["object"]["code"]) for e in events] == [("ERROR", 504)]
        server.expired_watch_as_http = True
        resp = await k8s.CoreV1Api(api).list_node(watch=True, resource_version=first,
                                                  _preload_content=False)
        assert resp.status == 410 and json.loads(await resp.read())["reason"] == "Expired"
        await api.close()


async def test_pages_come_from_a_snapshot_short_pages_and_expiry(
        kubeapi: FakeKubeAPI, api: ApiClient) -> None:
    for i in range(5):
        kubeapi.create(pod(f"p{i}", "n1" if i % 2 == 0 else "n2", "flox/a"))
    core = k8s.CoreV1Api(api)
    page = await core.list_pod_for_all_namespaces(field_selector="spec.nodeName=n1", limit=2)
    assert [p.metadata.name for p in page.items] == ["p0"]  # short: p1 is on n2
    rv = page.metadata.resource_version
    kubeapi.create(pod("p5", "n1", "flox/a"))  # after the snapshot: not in this list
    kubeapi.delete(kubeapi.get("Pod", "p4"))
    names = [p.metadata.name for p in page.items]
    while page.metadata._continue:
        page = await core.list_pod_for_all_namespaces(
            field_selector="spec.nodeName=n1", limit=2, _continue=page.metadata._continue)
        assert page.metadata.resource_version == rv
        names += [p.metadata.name for p in page.items]
    assert names == ["p0", "p2", "p4"]
    # resourceVersion=0 is the watch cache: everything at once, current state (p4 is gone
    # once its grace period ends; the snapshot above kept it)
    await eventually(lambda: "p4" not in {p["metadata"]["name"] for p in kubeapi.list("Pod")},
                     what="p4's graceful deletion")
    cached = await core.list_pod_for_all_namespaces(resource_version="0", limit=2)
    assert cached.metadata._continue is None
    assert [p.metadata.name for p in cached.items] == ["p0", "p1", "p2", "p3", "p5"]
    # an expired continue token is 410
    page = await core.list_pod_for_all_namespaces(limit=2)
    kubeapi.create(pod("p6", "n1", "flox/a"))
    kubeapi.compact()
    with pytest.raises(ApiException) as e:
        await core.list_pod_for_all_namespaces(limit=2, _continue=page.metadata._continue)
    assert e.value.status == 410


async def test_rbac_from_rbac_yaml_per_service_account(
        kubeapi: FakeKubeAPI, tmp_path: Path) -> None:
    kubeapi.create(prewarm_resource("r", ["flox/a"]))
    agent = await make_api_client(str(kubeapi.write_kubeconfig(
        tmp_path / "agent", service_account=("flox-node-cache", "flox-node-cache"))))
    ci = await make_api_client(str(kubeapi.write_kubeconfig(
        tmp_path / "ci", service_account=("ci", "deployer"))))
    try:
        await k8s.CoreV1Api(agent).list_node()
        status_patch = {"status": {"nodes": {"n1": {"phase": "Ready"}}}}
        await k8s.CustomObjectsApi(agent).patch_cluster_custom_object_status(
            GROUP, VERSION, PLURAL, "r", status_patch, _content_type=MERGE)
        with pytest.raises(ApiException) as e:  # the main resource is not the agent's
            await k8s.CustomObjectsApi(agent).patch_cluster_custom_object(
                GROUP, VERSION, PLURAL, "r", {"spec": {"pin": False}}, _content_type=MERGE)
        assert e.value.status == 403
        assert ('User "system:serviceaccount:flox-node-cache:flox-node-cache" cannot patch '
                'resource "environmentprewarms" in API group "nodecache.flox.dev"'
                in json.loads(e.value.body)["message"])
        with pytest.raises(ApiException) as e:
            await k8s.CoreV1Api(agent).list_secret_for_all_namespaces()
        assert e.value.status == 403
        with pytest.raises(ApiException) as e:  # not bound to anything yet
            await k8s.CustomObjectsApi(ci).get_cluster_custom_object(GROUP, VERSION, PLURAL, "r")
        assert e.value.status == 403
        kubeapi.bind("flox-node-cache-prewarmer", "ci", "deployer")
        await k8s.CustomObjectsApi(ci).get_cluster_custom_object(GROUP, VERSION, PLURAL, "r")
        with pytest.raises(ApiException) as e:  # the prewarmer cannot write status
            await k8s.CustomObjectsApi(ci).patch_cluster_custom_object_status(
                GROUP, VERSION, PLURAL, "r", status_patch, _content_type=MERGE)
        assert e.value.status == 403
    finally:
        await agent.close()
        await ci.close()
    log = [(r.user.rsplit(":", 1)[-1], r.verb, r.resource, r.subresource)
           for r in kubeapi.requests]
    assert ("flox-node-cache", "patch", "environmentprewarms", "status") in log
    assert ("deployer", "get", "environmentprewarms", "") in log


async def test_crd_schema_prunes_defaults_and_rejects(kubeapi: FakeKubeAPI,
                                                      api: ApiClient) -> None:
    custom = k8s.CustomObjectsApi(api)
    body = prewarm_resource("ok", ["flox/a"])
    del body["spec"]["pin"]
    body["spec"]["colour"] = "blue"  # unknown: pruned
    body["status"] = {"nodes": {"n1": {"phase": "Ready"}}}  # status in a create: dropped
    out = await custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, body)
    assert out["spec"] == {"environments": ["flox/a"], "nodeSelector": {}, "pin": True}
    assert "status" not in out

    async def invalid(body: dict[str, Any]) -> str:
        with pytest.raises(ApiException) as e:
            await custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, body)
        assert e.value.status == 422
        return str(json.loads(e.value.body)["message"])

    assert "spec.environments[0] in body should match" in await invalid(
        prewarm_resource("bad", ["not a ref"]))
    assert "spec.environments: Required value" in await invalid(
        {**prewarm_resource("bad", []), "spec": {"pin": True}})
    assert "spec.pin in body must be of type boolean" in await invalid(
        {**prewarm_resource("bad", ["flox/a"]), "spec": {"environments": ["flox/a"],
                                                         "pin": "yes"}})
    assert "metadata.name" in await invalid(prewarm_resource("Not_DNS", ["flox/a"]))
    with pytest.raises(ApiException) as e:
        await custom.patch_cluster_custom_object_status(
            GROUP, VERSION, PLURAL, "ok", {"status": {"nodes": {"n1": {"phase": "Done"}}}},
            _content_type=MERGE)
    assert e.value.status == 422 and "Unsupported value" in json.loads(e.value.body)["message"]


async def test_pods_are_created_pending_and_deleted_gracefully(
        kubeapi: FakeKubeAPI, api: ApiClient) -> None:
    core = k8s.CoreV1Api(api)
    created = await core.create_namespaced_pod("default", pod("p", "n1", "flox/a"))
    assert created.status.phase == "Pending"
    rv = created.metadata.resource_version
    deleted = await core.delete_namespaced_pod("p", "default")
    assert deleted.metadata.deletion_timestamp is not None
    resp = await core.list_namespaced_pod("default", watch=True, resource_version=rv,
                                          _preload_content=False)
    async with asyncio.timeout(5):
        events = [json.loads(await resp.content.readline()) for _ in range(2)]
    resp.release()
    assert [e["type"] for e in events] == ["MODIFIED", "DELETED"]
    assert events[0]["object"]["metadata"]["deletionTimestamp"]


async def test_injected_429_5xx_resets_stalls_and_silent_watches(
        kubeapi: FakeKubeAPI, api: ApiClient) -> None:
    core = k8s.CoreV1Api(api)
    kubeapi.inject(429, retry_after=3, verb="list", resource="nodes")
    with pytest.raises(ApiException) as e:
        await core.list_node()
    assert e.value.status == 429 and e.value.headers["Retry-After"] == "3"
    kubeapi.inject(503, times=2, resource="nodes")
    for _ in range(2):
        with pytest.raises(ApiException) as e:
            await core.list_node()
        assert e.value.status == 503
    await core.list_node()  # the fault is used up
    kubeapi.inject(reset=True, times=3, resource="nodes")  # aiohttp retries once
    with pytest.raises(aiohttp.ClientError):
        await core.list_node()
    kubeapi.inject(stall=30, resource="nodes")
    with pytest.raises(asyncio.TimeoutError):
        await core.list_node(_request_timeout=0.3)
    kubeapi.clear_faults()

    kubeapi.silence_watches()
    resp = await core.list_node(watch=True, allow_watch_bookmarks=True, _preload_content=False)
    kubeapi.create(node("a"))
    kubeapi.send_bookmarks()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await resp.content.readline()  # open, but nothing arrives
    resp.release()


async def test_restart_loses_history_but_not_objects(
        kubeapi: FakeKubeAPI, api: ApiClient) -> None:
    core = k8s.CoreV1Api(api)
    rv = kubeapi.create(node("a"))["metadata"]["resourceVersion"]
    kubeapi.create(node("b"))
    page = await core.list_node(limit=1)
    resp = await core.list_node(watch=True, resource_version=rv, _preload_content=False)
    assert json.loads(await resp.content.readline())["object"]["metadata"]["name"] == "b"
    kubeapi.restart()
    with pytest.raises(aiohttp.ClientError):
        async with asyncio.timeout(5):
            while await resp.content.readline():
                pass
            raise aiohttp.ClientPayloadError("ended")  # a clean end is not a restart either
    resp.release()
    events = await _watch_lines(api, resource_version=rv)
    assert [(e["type"], e["object"]["code"]) for e in events] == [("ERROR", 410)]
    with pytest.raises(ApiException) as e:
        await core.list_node(limit=1, _continue=page.metadata._continue)
    assert e.value.status == 410
    assert [n.metadata.name for n in (await core.list_node()).items] == ["a", "b"]
