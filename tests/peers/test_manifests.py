"""The peers component (daemonset/components/peers) on top of the base: rendered by the real
`kubectl kustomize`, strictly validated, and accepted by the agent's own configuration."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from agent import cli
from agent import config as agent_config
from tests.daemonset.test_manifests import K8S_VERSIONS, find

REPO = Path(__file__).resolve().parents[2]
Obj = dict[str, Any]


@pytest.fixture(scope="module")
def objs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Obj, ...]:
    """The base with the peers component, as a user's kustomization would include it."""
    here = tmp_path_factory.mktemp("peers-kustomization")
    rel = Path(os.path.relpath(REPO / "daemonset", here))
    (here / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [str(rel / "base")], "components": [str(rel / "components" / "peers")]}))
    out = subprocess.run(["kubectl", "kustomize", str(here)], capture_output=True, text=True,
                         check=True, timeout=60)
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def _agent(objs: tuple[Obj, ...]) -> Obj:
    spec = find(objs, "DaemonSet", "flox-node-cache")["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] if c["name"] == "agent")


def test_component_objects_validate_strictly(objs: tuple[Obj, ...]) -> None:
    for obj in objs:
        if obj["kind"] == "CustomResourceDefinition" or obj["kind"] == "EnvironmentPrewarm":
            continue
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_headless_service_lists_the_agents_peer_port(objs: tuple[Obj, ...]) -> None:
    svc = find(objs, "Service", "flox-node-cache-peers")
    assert svc["spec"]["clusterIP"] == "None"
    assert not svc["spec"].get("publishNotReadyAddresses")
    pod_labels = find(objs, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    (port,) = svc["spec"]["ports"]
    assert (port["name"], port["targetPort"]) == ("peer", "peer")
    container_ports = {p["name"]: p["containerPort"] for p in _agent(objs)["ports"]}
    assert container_ports["peer"] == port["port"] == 37517

    policy = find(objs, "NetworkPolicy", "flox-node-cache-peers")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    peer_rule = next(r for r in policy["spec"]["ingress"]
                     if any(p["port"] == "peer" for p in r["ports"]))
    assert peer_rule["from"] == [{"podSelector": policy["spec"]["podSelector"]}]


def test_agent_accepts_the_peer_configuration(objs: tuple[Obj, ...], tmp_path: Path) -> None:
    agent = _agent(objs)
    env = {e["name"]: e for e in agent["env"]}
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    token = Path(env["FLOX_NODE_CACHE_PEER_TOKEN_FILE"]["value"])
    mounts = {m["mountPath"]: m["name"] for m in agent["volumeMounts"]}
    assert mounts[str(token.parent)] == "peer-token"
    volumes = {v["name"]: v for v in find(objs, "DaemonSet")["spec"]["template"]["spec"]
               ["volumes"]}
    assert volumes["peer-token"]["secret"]["secretName"] == "flox-node-cache-peer-token"

    # What the kubelet would expand, through the agent's own parser and loader.
    real_token = tmp_path / "token"
    real_token.write_text("s3cret\n")
    values = {"NODE_NAME": "node-a", "POD_IP": "10.0.0.5", "POD_NAMESPACE": "flox-node-cache"}
    environ = {name: e.get("value", values.get(name, "")).replace("$(POD_IP)", "10.0.0.5")
               for name, e in env.items()}
    environ["FLOX_NODE_CACHE_PEER_TOKEN_FILE"] = str(real_token)
    args = cli.parser().parse_args(agent["args"])
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config", "func")}
    cfg = agent_config.load(args.config, flags, environ)
    assert cfg.peer_addr == ("10.0.0.5", 37517)
    assert cfg.peer_service == "flox-node-cache-peers"
    assert cfg.peers_enabled


def test_agent_may_watch_endpointslices(objs: tuple[Obj, ...]) -> None:
    role = find(objs, "ClusterRole", "flox-node-cache")
    rules = [r for r in role["rules"] if "endpointslices" in r["resources"]]
    assert rules == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                      "verbs": ["list", "watch"]}]
