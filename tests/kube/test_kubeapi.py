"""The fake API server answers the real client the way kube-apiserver does."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException

from agent.kube.client import GROUP, PLURAL, VERSION, make_api_client
from tests.kube import kubeapi, kubeconfig, node, pod, prewarm_resource
from tests.support.kubeapi import FakeKubeAPI, parse_label_selector

__all__ = ["kubeapi", "kubeconfig"]  # fixtures
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
