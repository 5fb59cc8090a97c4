"""The Kubernetes install: render every kustomization, validate it offline, check its invariants.

Real tools throughout: `kubectl kustomize` renders, kubernetes-validate checks each object against
the upstream OpenAPI schemas, jsonschema checks custom resources against our CRD, promtool checks
the alert rules, the node-config script runs for real (read back by the real `nix`), and the
capability reasoning is tested by running as root with every capability dropped (`setpriv`).
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from agent import cli
from agent import config as agent_config

REPO = Path(__file__).resolve().parents[2]
DAEMONSET = REPO / "daemonset"
DASHBOARDS = REPO / "dashboards"
COMPONENTS = tuple(sorted(p.parent.name for p in DAEMONSET.glob("components/*/kustomization.yaml")))
# Every combination of the components on top of the base, rendered from a kustomization
# written for the test ("base", "base+monitoring", ..., "base+monitoring+node-config+...").
COMBOS = tuple("+".join(("base", *c)) for n in range(len(COMPONENTS) + 1)
               for c in itertools.combinations(COMPONENTS, n))
# The entry points users apply as they are, and the combination each must equal.
ENTRY_POINTS = {
    "daemonset": "base",
    "daemonset/base": "base",
    "daemonset/overlays/monitoring": "base+monitoring",
    "daemonset/overlays/node-config": "base+node-config",
    "daemonset/examples/all": "+".join(("base", *COMPONENTS)),
}
INSTALLS = COMBOS  # the ones that deploy the agent
# Oldest and newest Kubernetes the manifests must be valid for.
K8S_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "EnvironmentPrewarm"}
NAMESPACE = "flox-node-cache"
UPSTREAM_KEYS = {
    "https://cache.nixos.org": "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=",
    "https://cache.flox.dev": "flox-cache-public-1:7F4OyH7ZCnFhcze3fJdfyXYLQw/aV7GEed86nQ7IsOs=",
}
NODE_CONFIG_SCRIPT = DAEMONSET / "components" / "node-config" / "configure-nix.sh"
WALKTHROUGH = DAEMONSET / "kind" / "walkthrough.sh"
WARM_TAINT = "flox.dev/node-cache-warming"

Obj = dict[str, Any]


# --- rendering and lookup ---------------------------------------------------------------------

@cache
def render(kustomization: str) -> tuple[Obj, ...]:
    """`kubectl kustomize` of a directory of the repository, or of a combination in COMBOS."""
    if kustomization not in COMBOS:
        return _kustomize(REPO / kustomization)
    with tempfile.TemporaryDirectory(prefix="kpack-combo-") as tmp:
        rel = os.path.relpath(DAEMONSET, tmp)
        base, *components = kustomization.split("+")
        (Path(tmp) / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [f"{rel}/{base}"],
            "components": [f"{rel}/components/{c}" for c in components]}))
        return _kustomize(Path(tmp))


def _kustomize(directory: Path) -> tuple[Obj, ...]:
    out = subprocess.run(["kubectl", "kustomize", str(directory)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def load_yaml(path: Path) -> list[Obj]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


PREWARM_CRD = "environmentprewarms.nodecache.flox.dev"


def find(objs: tuple[Obj, ...] | list[Obj], kind: str, name: str | None = None) -> Obj:
    hits = [o for o in objs if o["kind"] == kind
            and (name is None or o["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def daemonset(kustomization: str) -> Obj:
    return find(render(kustomization), "DaemonSet", "flox-node-cache")


def pod_spec(kustomization: str) -> Obj:
    return daemonset(kustomization)["spec"]["template"]["spec"]


def all_containers(spec: Obj) -> Iterator[Obj]:
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def agent_container(kustomization: str) -> Obj:
    return next(c for c in pod_spec(kustomization)["containers"] if c["name"] == "agent")


def crd_schema() -> Obj:
    crd = find(render("daemonset/base"), "CustomResourceDefinition", PREWARM_CRD)
    (version,) = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def with_component(component: str) -> str:
    return f"base+{component}"


# --- every object is valid ---------------------------------------------------------------------

# The entry points are checked to render exactly their combination (below).
@pytest.mark.parametrize("kustomization", (*COMBOS, "dashboards"))
def test_every_object_validates_against_kubernetes_schemas(kustomization: str) -> None:
    objs = render(kustomization)
    assert objs
    for obj in objs:
        if obj["kind"] in CRD_KINDS:
            continue  # no upstream schema; checked by the dedicated tests below
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_strict_validation_catches_a_misspelt_field() -> None:
    # Guards the test above: a typo in a pod spec must not pass silently.
    broken = copy.deepcopy(daemonset("daemonset/base"))
    broken["spec"]["template"]["spec"]["tolerationz"] = [{"operator": "Exists"}]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("kustomization", INSTALLS)
def test_namespaced_objects_live_in_the_agent_namespace(kustomization: str) -> None:
    cluster_scoped = {"Namespace", "CustomResourceDefinition", "ClusterRole",
                      "ClusterRoleBinding"}
    for obj in render(kustomization):
        if obj["kind"] not in cluster_scoped:
            assert obj["metadata"].get("namespace") == NAMESPACE, obj["metadata"]["name"]
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/name") == "flox-node-cache", obj["kind"]


# --- components combine -----------------------------------------------------------------------

def test_components_are_kustomize_components() -> None:
    assert {"monitoring", "node-config", "warm-taint"} <= set(COMPONENTS)
    for name in COMPONENTS:
        doc = yaml.safe_load((DAEMONSET / "components" / name / "kustomization.yaml").read_text())
        assert (doc["apiVersion"], doc["kind"]) == ("kustomize.config.k8s.io/v1alpha1",
                                                    "Component"), name


@pytest.mark.parametrize(("entry", "combo"), ENTRY_POINTS.items())
def test_entry_points_render_their_combination(entry: str, combo: str) -> None:
    assert render(entry) == render(combo)


def contains(big: Any, small: Any) -> bool:
    """Everything in `small` is in `big`: dict keys recursively, each list item in some item."""
    if isinstance(small, dict):
        return isinstance(big, dict) and all(k in big and contains(big[k], v)
                                             for k, v in small.items())
    if isinstance(small, list):
        return isinstance(big, list) and all(any(contains(b, s) for b in big) for s in small)
    return bool(big == small)


def by_identity(objs: tuple[Obj, ...]) -> dict[tuple[str, str, str], Obj]:
    return {(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]): o
            for o in objs}


@pytest.mark.parametrize("combo", [c for c in COMBOS if c.count("+") >= 2])
def test_combining_components_keeps_what_each_adds(combo: str) -> None:
    combined = by_identity(render(combo))
    for component in combo.split("+")[1:]:
        for ident, obj in by_identity(render(with_component(component))).items():
            assert ident in combined, f"{combo} drops {ident}, which {component} adds"
            assert contains(combined[ident], obj), f"{combo} loses part of {ident} ({component})"


def test_the_containment_check_sees_what_applying_one_overlay_after_another_dropped() -> None:
    # The old bug: `kubectl apply -k` of one overlay after the other replaced the DaemonSet
    # with one lacking the first overlay's init container. The check above must see that.
    node_config = daemonset(with_component("node-config"))
    assert not contains(daemonset(with_component("monitoring")), node_config)
    assert contains(daemonset("base+monitoring+node-config"), node_config)


def quantity(text: str) -> float:
    m = re.fullmatch(r"(\d+)([kMG]?)", str(text))
    assert m, text
    return int(m[1]) * {"": 1, "k": 1e3, "M": 1e6, "G": 1e9}[m[2]]


@pytest.mark.parametrize("kustomization", INSTALLS)
def test_resource_quota_admits_the_agents_priority_class(kustomization: str) -> None:
    # GKE admits system-node-critical pods outside kube-system only in a namespace holding a
    # ResourceQuota scoped to that class.
    quota = find(render(kustomization), "ResourceQuota")
    assert quota["metadata"]["namespace"] == daemonset(kustomization)["metadata"]["namespace"]
    (scope,) = quota["spec"]["scopeSelector"]["matchExpressions"]
    assert scope == {"scopeName": "PriorityClass", "operator": "In",
                     "values": [pod_spec(kustomization)["priorityClassName"]]}
    assert quota["spec"]["hard"].keys() == {"pods"}
    assert quantity(quota["spec"]["hard"]["pods"]) >= 5000  # Kubernetes' largest tested cluster


def tolerates(tolerations: list[Obj], taint: Obj) -> bool:
    """The scheduler's rule: does any toleration match the taint?"""
    for t in tolerations:
        if t.get("effect") not in (None, "", taint["effect"]):
            continue
        if t.get("operator", "Equal") == "Exists":
            if t.get("key") in (None, "", taint["key"]):
                return True
        elif t.get("key") == taint["key"] and t.get("value", "") == taint.get("value", ""):
            return True
    return False


@pytest.mark.parametrize("kustomization", INSTALLS)
def test_the_agent_tolerates_the_warm_taint(kustomization: str) -> None:
    taint = {"key": WARM_TAINT, "value": "true", "effect": "NoSchedule"}
    assert tolerates(pod_spec(kustomization)["tolerations"], taint)
    assert not tolerates([{"key": "other", "operator": "Exists"}], taint)  # the rule bites


@pytest.mark.parametrize("kustomization", INSTALLS)
def test_warm_taint_is_on_exactly_with_its_component(kustomization: str,
                                                     peer_token: Path) -> None:
    cfg = agent_configuration(kustomization, peer_token)
    if "warm-taint" in kustomization.split("+"):
        assert (cfg.warm_taint, cfg.warm_taint_timeout) == (WARM_TAINT, 600)
    else:
        assert cfg.warm_taint == ""


# --- the DaemonSet -------------------------------------------------------------------------

@pytest.mark.parametrize("kustomization", INSTALLS)
def test_daemonset_scheduling(kustomization: str) -> None:
    ds = daemonset(kustomization)
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["nodeSelector"] == {"flox.dev/enabled": "true"}
    assert spec["enableServiceLinks"] is False  # the config rejects unknown FLOX_NODE_CACHE_*
    assert spec["terminationGracePeriodSeconds"] >= 30
    assert spec["serviceAccountName"] == "flox-node-cache"
    strategy = ds["spec"]["updateStrategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"]
    # Two pods cannot share the node's loopback port: no surge.
    assert strategy["rollingUpdate"].get("maxSurge", 0) == 0
    selector = ds["spec"]["selector"]["matchLabels"]
    assert selector.items() <= ds["spec"]["template"]["metadata"]["labels"].items()


@pytest.mark.parametrize("kustomization", INSTALLS)
def test_daemonset_probes_hit_health_endpoints_on_the_metrics_port(kustomization: str) -> None:
    agent = agent_container(kustomization)
    ports = {p["name"]: p["containerPort"] for p in agent["ports"]}
    assert ports["metrics"] == 37516
    expected = {"startupProbe": "/healthz", "livenessProbe": "/healthz",
                "readinessProbe": "/readyz"}
    for probe, path in expected.items():
        get = agent[probe]["httpGet"]
        assert get["path"] == path, probe
        assert get["port"] == "metrics", probe


@pytest.mark.parametrize("kustomization", INSTALLS)
def test_every_container_is_hardened(kustomization: str) -> None:
    for c in all_containers(pod_spec(kustomization)):
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
        assert not sc["capabilities"].get("add"), c["name"]  # root needs none: see test below
        assert not sc.get("privileged"), c["name"]


@pytest.mark.parametrize("kustomization", INSTALLS)
def test_every_container_has_memory_request_equal_to_limit(kustomization: str) -> None:
    for c in all_containers(pod_spec(kustomization)):
        res = c["resources"]
        assert res["requests"]["memory"] == res["limits"]["memory"], c["name"]
        assert "cpu" not in res.get("limits", {}), c["name"]  # no CFS throttling


@pytest.mark.parametrize("kustomization", INSTALLS)
def test_hostpaths_and_mounts(kustomization: str) -> None:
    spec = pod_spec(kustomization)
    volumes = {v["name"]: v for v in spec["volumes"]}
    host = {v["hostPath"]["path"]: v["hostPath"]["type"]
            for v in volumes.values() if "hostPath" in v}
    assert host["/var/lib/flox-node-cache"] == "DirectoryOrCreate"
    assert host["/run/flox-node-cache"] == "DirectoryOrCreate"
    assert all(t in ("Directory", "DirectoryOrCreate") for t in host.values())
    assert "emptyDir" in volumes["tmp"]
    secret = volumes["floxhub-token"]["secret"]
    assert secret["optional"] is True
    for c in all_containers(spec):
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes, f"{c['name']} mounts unknown volume {m['name']}"
    mounts = {m["mountPath"]: m["name"] for m in agent_container(kustomization)["volumeMounts"]}
    assert mounts["/tmp"] == "tmp"
    assert mounts["/var/lib/flox-node-cache"] == "store"
    assert mounts["/run/flox-node-cache"] == "socket-dir"


def agent_flags(kustomization: str) -> dict[str, list[str]]:
    args = agent_container(kustomization)["args"]
    assert args[0] == "run"
    flags: dict[str, list[str]] = {}
    for arg in args[1:]:
        m = re.fullmatch(r"--([a-z-]+)=(.*)", arg)
        assert m, f"write flags as --name=value: {arg}"
        flags.setdefault(m.group(1), []).append(m.group(2))
    return flags


@pytest.mark.parametrize("kustomization", INSTALLS)
def test_agent_arguments(kustomization: str) -> None:
    flags = agent_flags(kustomization)
    assert flags["listen"] == ["127.0.0.1:37515"]  # the node's loopback only
    assert flags["metrics-listen"] == ["0.0.0.0:37516"]  # probes and Prometheus use the node IP
    assert flags["store"] == ["/var/lib/flox-node-cache"]
    assert Path(flags["socket"][0]).parent == Path("/run/flox-node-cache")
    assert flags["log-format"] == ["json"]
    assert flags["upstream"] == list(UPSTREAM_KEYS)
    assert flags["trusted-public-key"] == list(UPSTREAM_KEYS.values())
    token = Path(flags["floxhub-token-file"][0])
    mounts = {m["mountPath"]: m["name"] for m in agent_container(kustomization)["volumeMounts"]}
    assert mounts[str(token.parent)] == "floxhub-token"
    env = {e["name"]: e for e in agent_container(kustomization)["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}


@pytest.fixture(scope="module")
def peer_token(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stands for the mounted peer token Secret (tests/peers checks the mount)."""
    token = tmp_path_factory.mktemp("peer-token") / "token"
    token.write_text("s3cret\n")
    return token


def agent_configuration(kustomization: str, peer_token: Path) -> agent_config.Config:
    """The manifest's args through the agent's own parser, its env through the config loader
    (NODE_NAME, from the downward API, as node-a; the peer token file as `peer_token`)."""
    args = cli.parser().parse_args(agent_container(kustomization)["args"])
    assert args.command == "run"
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config", "func")}
    env = {e["name"]: e.get("value", "node-a") for e in agent_container(kustomization)["env"]}
    if "FLOX_NODE_CACHE_PEER_TOKEN_FILE" in env:
        env["FLOX_NODE_CACHE_PEER_TOKEN_FILE"] = str(peer_token)
    return agent_config.load(args.config, flags, env)


@pytest.mark.parametrize("kustomization", INSTALLS)
def test_agent_configuration_is_accepted_by_the_agent(kustomization: str,
                                                      peer_token: Path) -> None:
    cfg = agent_configuration(kustomization, peer_token)
    assert cfg.node_name == "node-a"
    assert (cfg.log_format, cfg.store_budget) == ("json", "25%")
    assert cfg.kubernetes == "on"
    assert cfg.listen_addr == ("127.0.0.1", 37515)
    assert len(cfg.public_keys) == 2
    assert cfg.socket_group == "flox-node-cache"
    assert "groupadd --system --gid 65532 flox-node-cache" in (DAEMONSET / "Dockerfile").read_text()
    assert 65532 in pod_spec(kustomization)["securityContext"]["supplementalGroups"]


def test_metrics_service_is_headless_and_selects_the_agent() -> None:
    objs = render("daemonset/base")
    svc = find(objs, "Service", "flox-node-cache-metrics")
    assert svc["spec"]["clusterIP"] == "None"
    pod_labels = daemonset("daemonset/base")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert [(p["name"], p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [
        ("metrics", 37516, "metrics")]


# --- capabilities: root with none is enough ---------------------------------------------------

def run_without_capabilities(script: str, env: dict[str, str] | None = None,
                             groups: str = "65532") -> subprocess.CompletedProcess[str]:
    """Run as uid 0 with every capability dropped, like the containers (drop: [ALL])."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv")
    cmd = ["setpriv", f"--groups={groups}", "--bounding-set=-all", "--inh-caps=-all",
           "--ambient-caps=-all", "--", "sh", "-c", script]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                          env={**os.environ, **(env or {})})


def test_root_without_capabilities_can_run_the_agent_store(tmp_path: Path) -> None:
    # What the kubelet makes for DirectoryOrCreate: root:root 0755.
    store = tmp_path / "var-lib-flox-node-cache"
    store.mkdir(mode=0o755)
    script = (
        'grep -q "^CapEff:[[:space:]]*0*$" /proc/self/status || exit 90\n'
        'mkdir -p "$D/nar" && echo data > "$D/nar/x.tmp" && mv "$D/nar/x.tmp" "$D/nar/x"\n'
        'python3 -c "import socket,sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])" '
        '"$D/agent.sock"\n'
        'chgrp 65532 "$D/agent.sock" || exit 91\n'  # --socket-group: a supplemental group
        'chgrp 65533 "$D/agent.sock" 2>/dev/null && exit 92\n'  # proves CAP_CHOWN is gone
        "exit 0\n"
    )
    result = run_without_capabilities(script, {"D": str(store)})
    assert result.returncode == 0, result.stderr
    assert (store / "nar" / "x").read_text() == "data\n"
    assert (store / "agent.sock").stat().st_gid == 65532


# --- RBAC --------------------------------------------------------------------------------------

def rule_table(role: Obj) -> dict[tuple[str, str], set[str]]:
    table: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"wildcard in {role['metadata']['name']}: {rule}"
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs")
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                table.setdefault((group, resource), set()).update(rule["verbs"])
    return table


# What the code calls, as derived from the API server's request log in tests/kube/test_rbac.py.
LIST_WATCH = {"list", "watch"}
AGENT_RULES = {
    ("", "pods"): LIST_WATCH,
    ("", "nodes"): LIST_WATCH | {"get", "patch"},  # its own: by fieldSelector; warm taint
    ("apps", "deployments"): LIST_WATCH,
    ("apps", "statefulsets"): LIST_WATCH,
    ("apps", "daemonsets"): LIST_WATCH,
    ("batch", "jobs"): LIST_WATCH,
    ("batch", "cronjobs"): LIST_WATCH,
    ("nodecache.flox.dev", "environmentprewarms"): LIST_WATCH | {"delete"},  # after its TTL
    ("nodecache.flox.dev", "environmentprewarms/status"): {"patch"},  # the lease holder
    ("nodecache.flox.dev", "nodeprewarms"): {"get", "create", "list", "watch"},
    ("nodecache.flox.dev", "nodeprewarms/status"): {"patch"},
    ("", "events"): {"create"},
    # Peer discovery (components/peers): the agent's own Service's EndpointSlices.
    ("discovery.k8s.io", "endpointslices"): LIST_WATCH,
}
PREWARMER_RULES = {
    ("nodecache.flox.dev", "environmentprewarms"): {"get", "create", "patch", "delete"},
    ("", "nodes"): {"list"},  # agent/kube/rollout.py: the nodes the selector matches
}


def test_agent_cluster_role_is_exactly_least_privilege() -> None:
    role = find(render("daemonset/base"), "ClusterRole", "flox-node-cache")
    assert rule_table(role) == AGENT_RULES


def test_prewarmer_cluster_role_is_exact_and_not_bound_to_the_agent() -> None:
    objs = render("daemonset/base")
    role = find(objs, "ClusterRole", "flox-node-cache-prewarmer")
    assert rule_table(role) == PREWARMER_RULES
    bindings = [o for o in objs if o["kind"] in ("ClusterRoleBinding", "RoleBinding")]
    assert [b["roleRef"]["name"] for b in bindings] == ["flox-node-cache", "flox-node-cache"]
    assert {b["kind"] for b in bindings} == {"ClusterRoleBinding", "RoleBinding"}  # the lease


def test_agent_binding_names_the_daemonsets_service_account() -> None:
    binding = find(render("daemonset/base"), "ClusterRoleBinding", "flox-node-cache")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                  "kind": "ClusterRole", "name": "flox-node-cache"}
    sa = find(render("daemonset/base"), "ServiceAccount", "flox-node-cache")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": sa["metadata"]["namespace"]}]


# --- the CRD and EnvironmentPrewarm objects -----------------------------------------------------

def test_crd_shape() -> None:
    crd = find(render("daemonset/base"), "CustomResourceDefinition", PREWARM_CRD)
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "environmentprewarms.nodecache.flox.dev"
    assert spec["scope"] == "Cluster"
    assert spec["names"]["kind"] == "EnvironmentPrewarm"
    assert spec["names"]["shortNames"] == ["envprewarm"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {"Environments": ".spec.environments", "Pin": ".spec.pin",
                       "Deadline": ".spec.deadline", "Age": ".metadata.creationTimestamp"}


def test_crd_schema_is_structural() -> None:
    # The API server rejects a schema in which any node lacks a type.
    def walk(node: Obj, path: str) -> None:
        assert "type" in node, f"no type at {path}"
        for name, child in node.get("properties", {}).items():
            walk(child, f"{path}.{name}")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{path}.*")
        if "items" in node:
            walk(node["items"], f"{path}[]")
    walk(crd_schema(), "")


FORMATS = jsonschema.FormatChecker(formats=())


@FORMATS.checks("date-time", raises=ValueError)
def _is_datetime(value: object) -> bool:
    # RFC 3339 as the API server reads it: a full date, 'T', a time and a zone.
    if isinstance(value, str):
        if "T" not in value.upper() or not re.search(r"(Z|[+-]\d\d:\d\d)$", value, re.I):
            raise ValueError(f"{value!r} is not RFC 3339")
        datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    return True


def prewarm_errors(obj: Obj) -> list[str]:
    validator = jsonschema.Draft7Validator(crd_schema(), format_checker=FORMATS)
    return [e.message for e in validator.iter_errors(obj)]


def example_prewarm() -> Obj:
    return find(load_yaml(DAEMONSET / "examples" / "environmentprewarm.yaml"),
                "EnvironmentPrewarm")


def test_example_environmentprewarm_matches_the_crd() -> None:
    obj = example_prewarm()
    assert obj["apiVersion"] == "nodecache.flox.dev/v1alpha1"
    assert "namespace" not in obj["metadata"]  # cluster-scoped
    assert prewarm_errors(obj) == []


def test_status_as_an_agent_would_write_it_matches_the_crd() -> None:
    obj = example_prewarm()
    obj["status"] = {"nodes": {"node-a": {
        "phase": "Pulling", "pathsDone": 3, "pathsTotal": 10, "bytesDone": 1 << 33,
        "bytesTotal": 1 << 34, "message": "fetching", "lastUpdate": "2025-01-02T03:04:05Z",
        "observedGeneration": 2}}}
    assert prewarm_errors(obj) == []


@pytest.mark.parametrize(("path", "value"), [
    (("spec", "environments"), []),
    (("spec", "environments"), ["redis"]),
    (("spec", "environments"), ["flox/redis:latest"]),
    (("spec", "environments"), ["-flox/redis"]),
    (("spec", "environments"), ["flox/redis/extra"]),
    (("spec", "pin"), "yes"),
    (("spec", "deadline"), "tomorrow"),
    (("spec", "nodeSelector"), {"pool": 1}),
    (("status",), {"nodes": {"node-a": {"phase": "Done"}}}),
    (("status",), {"nodes": {"node-a": {"bytesDone": "1G"}}}),
])
def test_crd_rejects_bad_values(path: tuple[str, ...], value: object) -> None:
    obj = example_prewarm()
    target = obj
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert prewarm_errors(obj), f"{'.'.join(path)}={value!r} was accepted"


def test_crd_requires_environments() -> None:
    obj = example_prewarm()
    del obj["spec"]["environments"]
    assert prewarm_errors(obj)


def test_crd_accepts_pinned_generations_and_dotted_names() -> None:
    obj = example_prewarm()
    obj["spec"]["environments"] = ["flox/redis:7", "my.org/web_app-2", "a/b:0"]
    assert prewarm_errors(obj) == []


# --- examples -------------------------------------------------------------------------------

def test_example_flox_pod_is_valid_and_talks_to_the_agent_socket() -> None:
    pod = find(load_yaml(DAEMONSET / "examples" / "flox-pod.yaml"), "Pod")
    kubernetes_validate.validate(pod, K8S_VERSIONS[-1], strict=True)
    spec = pod["spec"]
    assert spec["runtimeClassName"] == "flox"
    assert re.fullmatch(r"[^/]+/[^/:]+(:\d+)?", pod["metadata"]["annotations"][
        "flox.dev/environment"])
    assert any(c["image"] == "flox/empty:1.0.0" for c in spec["containers"])
    (socket_volume,) = [v for v in spec["volumes"] if "hostPath" in v]
    assert socket_volume["hostPath"]["path"] == "/run/flox-node-cache"
    socket = agent_flags("daemonset/base")["socket"][0]
    debug = next(c for c in spec["containers"] if c["image"] != "flox/empty:1.0.0")
    shell = " ".join(debug["command"] + debug["args"])
    assert socket in shell and "curl -sS --unix-socket" in shell
    # The socket is 0660 root:<socket group>: the pod must be in that group.
    assert 65532 in spec["securityContext"]["supplementalGroups"]


# --- monitoring overlay ----------------------------------------------------------------------

def test_servicemonitor_selects_the_metrics_service() -> None:
    objs = render("base+monitoring")
    sm = find(objs, "ServiceMonitor")
    svc = find(objs, "Service", "flox-node-cache-metrics")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert NAMESPACE in sm["spec"]["namespaceSelector"]["matchNames"]
    ports = {p["name"] for p in svc["spec"]["ports"]}
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= ports
    # job="flox-node-cache": the label the dashboard and the alerts query.
    assert svc["metadata"]["labels"][sm["spec"]["jobLabel"]] == "flox-node-cache"


def test_prometheusrule_passes_promtool(tmp_path: Path) -> None:
    if shutil.which("promtool") is None:
        pytest.fail("promtool is not installed (apt-get install prometheus)")
    rule = find(render("base+monitoring"), "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"]["groups"]
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump(rule["spec"]))
    result = subprocess.run(["promtool", "check", "rules", str(rules_file)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def alert_rules() -> list[Obj]:
    rule = find(render("base+monitoring"), "PrometheusRule")
    return [r for g in rule["spec"]["groups"] for r in g["rules"]]


def github_anchors(markdown: str) -> set[str]:
    """The fragment GitHub gives each heading: lower case, punctuation dropped, spaces -> -."""
    headings = re.findall(r"^#+ (.+)$", markdown, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_alert_links_its_runbook_section() -> None:
    anchors = github_anchors((DAEMONSET / "README.md").read_text())
    prefix = "https://github.com/flox/flox-node-cache/blob/main/daemonset/README.md#"
    for rule in alert_rules():
        url = rule["annotations"]["runbook_url"]
        assert url.startswith(prefix), rule["alert"]
        assert url.removeprefix(prefix) in anchors, f"no runbook section for {rule['alert']}"
    assert {"FloxNodeCacheAbsent", "FloxNodeCachePrewarmFailed",
            "FloxNodeCacheKubeWatchFailing"} <= {r["alert"] for r in alert_rules()}


AGENT = 'job="flox-node-cache", namespace="flox-node-cache", node="n1", instance="10.0.0.1:37516"'
AGENT_LABELS = {"job": "flox-node-cache", "namespace": "flox-node-cache", "node": "n1",
                "instance": "10.0.0.1:37516"}
# promtool unit tests: (input series, alert -> the label sets it fires with at 30m).
ALERT_CASES = {
    "healthy": ([
        (f"up{{{AGENT}}}", "1x40"),
        (f'flox_node_cache_prewarm_jobs_total{{{AGENT}, outcome="failed"}}', "0x40"),
        (f'flox_node_cache_prewarm_jobs_total{{{AGENT}, outcome="succeeded"}}', "0+1x40"),
        (f'flox_node_cache_kube_watch_consecutive_failures{{{AGENT}, resource="pods"}}', "0x40"),
    ], {"FloxNodeCacheAbsent": [], "FloxNodeCachePrewarmFailed": [],
        "FloxNodeCacheKubeWatchFailing": [], "FloxNodeCacheDown": []}),
    "failing": ([
        (f"up{{{AGENT}}}", "1x40"),
        (f'flox_node_cache_prewarm_jobs_total{{{AGENT}, outcome="failed"}}', "0x25 1x15"),
        (f'flox_node_cache_kube_watch_consecutive_failures{{{AGENT}, resource="pods"}}', "0x40"),
        (f'flox_node_cache_kube_watch_consecutive_failures{{{AGENT}, resource="nodes"}}',
         "0x10 1+1x30"),
    ], {"FloxNodeCachePrewarmFailed": [AGENT_LABELS],
        "FloxNodeCacheKubeWatchFailing": [{**AGENT_LABELS, "resource": "nodes"}],
        "FloxNodeCacheAbsent": []}),
    "no agent scraped": ([('up{job="node-exporter"}', "1x40")],
                         {"FloxNodeCacheAbsent": [{"job": "flox-node-cache"}]}),
}


@pytest.mark.parametrize("case", ALERT_CASES)
def test_alerts_fire_on_their_condition_and_only_then(case: str, tmp_path: Path) -> None:
    # Annotations are left out: promtool would compare them verbatim; they are text.
    rules = [{k: v for k, v in r.items() if k != "annotations"} for r in alert_rules()]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(
        {"groups": [{"name": "flox-node-cache", "rules": rules}]}))
    series, expected = ALERT_CASES[case]
    severity = {r["alert"]: r["labels"]["severity"] for r in alert_rules()}
    (tmp_path / "test.yaml").write_text(yaml.safe_dump({
        "rule_files": ["rules.yaml"], "evaluation_interval": "1m",
        "tests": [{"interval": "1m",
                   "input_series": [{"series": s, "values": v} for s, v in series],
                   "alert_rule_test": [
                       {"eval_time": "30m", "alertname": name,
                        "exp_alerts": [{"exp_labels": {**labels, "severity": severity[name]}}
                                       for labels in fired]}
                       for name, fired in expected.items()]}]}))
    result = subprocess.run(["promtool", "test", "rules", "test.yaml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("kustomization", ["dashboards", "base+monitoring"])
def test_dashboard_configmap_holds_every_dashboard(kustomization: str) -> None:
    cm = find(render(kustomization), "ConfigMap", "flox-node-cache-dashboards")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == NAMESPACE
    files = sorted(DASHBOARDS.glob("*.json"))
    assert files, "no dashboards/*.json"
    assert sorted(cm["data"]) == [f.name for f in files]
    for f in files:
        assert json.loads(cm["data"][f.name]) == json.loads(f.read_text())
        assert json.loads(f.read_text())["title"]


# --- node-config overlay ---------------------------------------------------------------------

def shipped_node_config_script() -> tuple[str, Obj]:
    """The script as deployed (from the rendered ConfigMap) and the init container running it."""
    objs = render("base+node-config")
    cm = next(o for o in objs if o["kind"] == "ConfigMap"
              and o["metadata"]["name"].startswith("flox-node-cache-node-config"))
    (init,) = pod_spec("base+node-config")["initContainers"]
    assert init["name"] == "configure-nix"
    return cm["data"]["configure-nix.sh"], init


def test_node_config_init_container_wiring() -> None:
    script, init = shipped_node_config_script()
    assert script == NODE_CONFIG_SCRIPT.read_text()
    spec = pod_spec("base+node-config")
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
    env = {e["name"]: e["value"] for e in init["env"]}
    assert volumes[mounts[env["NIX_CONF_DIR"]]]["hostPath"] == {"path": "/etc/nix",
                                                                 "type": "Directory"}
    assert "HOST_NIX_CONF_DIR" not in env  # a relative include: right whatever the host path
    script_path = Path(init["command"][-1])
    assert volumes[mounts[str(script_path.parent)]]["configMap"]["name"].startswith(
        "flox-node-cache-node-config")
    assert init["image"] == agent_container("base+node-config")["image"]
    assert env["SUBSTITUTER"] == "http://127.0.0.1:37515?priority=-1"
    assert env["FILE_STORE"] == "file:///var/lib/flox-node-cache?priority=-2"


def run_node_config(nix_dir: Path, script: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NIX_CONF_DIR": str(nix_dir), "HOST_NIX_CONF_DIR": str(nix_dir)}
    return subprocess.run(["sh", "-c", script, "configure-nix"], capture_output=True,
                          text=True, env=env, timeout=30)


ORIGINAL_NIX_CONF = "build-users-group = nixbld\nsubstituters = https://cache.nixos.org"


def test_node_config_is_idempotent_and_backs_up(tmp_path: Path) -> None:
    script, _ = shipped_node_config_script()
    (tmp_path / "nix.conf").write_text(ORIGINAL_NIX_CONF)  # no trailing newline on purpose
    (tmp_path / "nix.conf").chmod(0o644)
    for _ in range(2):
        result = run_node_config(tmp_path, script)
        assert result.returncode == 0, result.stderr
    include = f"!include {tmp_path}/flox-node-cache.conf"
    lines = (tmp_path / "nix.conf").read_text().splitlines()
    assert lines == [*ORIGINAL_NIX_CONF.splitlines(), include]
    assert (tmp_path / "nix.conf.bak-flox-node-cache").read_text() == ORIGINAL_NIX_CONF
    assert (tmp_path / "nix.conf").stat().st_mode & 0o777 == 0o644
    dropin = (tmp_path / "flox-node-cache.conf").read_text()
    assert ("extra-substituters = file:///var/lib/flox-node-cache?priority=-2 "
            "http://127.0.0.1:37515?priority=-1\n") in dropin
    assert all(k in dropin for k in UPSTREAM_KEYS.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "flox-node-cache.conf", "nix.conf", "nix.conf.bak-flox-node-cache"]  # no temp files


def test_node_config_is_read_by_real_nix(tmp_path: Path) -> None:
    if shutil.which("nix") is None:
        pytest.fail("nix is not installed (apt-get install nix-bin)")
    script, _ = shipped_node_config_script()
    (tmp_path / "nix.conf").write_text("substituters = https://cache.nixos.org\n")
    assert run_node_config(tmp_path, script).returncode == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIX_")}
    env["NIX_CONF_DIR"] = str(tmp_path)
    out = subprocess.run(["nix", "--extra-experimental-features", "nix-command", "show-config"],
                         capture_output=True, text=True, env=env, timeout=30, check=True).stdout
    settings = dict(line.split(" = ", 1) for line in out.splitlines() if " = " in line)
    assert settings["substituters"].split() == [
        "https://cache.nixos.org", "file:///var/lib/flox-node-cache?priority=-2",
        "http://127.0.0.1:37515?priority=-1"]
    assert set(UPSTREAM_KEYS.values()) <= set(settings["trusted-public-keys"].split())


def test_node_config_creates_missing_nix_conf(tmp_path: Path) -> None:
    script, _ = shipped_node_config_script()
    assert run_node_config(tmp_path, script).returncode == 0
    assert (tmp_path / "nix.conf").read_text() == f"!include {tmp_path}/flox-node-cache.conf\n"
    assert not (tmp_path / "nix.conf.bak-flox-node-cache").exists()


def test_node_config_leaves_a_symlinked_nix_conf_alone(tmp_path: Path) -> None:
    # NixOS links /etc/nix/nix.conf into the store: it must be configured declaratively.
    script, _ = shipped_node_config_script()
    target = tmp_path / "store-nix.conf"
    target.write_text(ORIGINAL_NIX_CONF)
    nix_dir = tmp_path / "etc-nix"
    nix_dir.mkdir()
    (nix_dir / "nix.conf").symlink_to(target)
    result = run_node_config(nix_dir, script)
    assert result.returncode == 0
    assert "extra-substituters = file:///var/lib/flox-node-cache?priority=-2 " \
        "http://127.0.0.1:37515?priority=-1" in result.stdout
    assert target.read_text() == ORIGINAL_NIX_CONF
    assert [p.name for p in nix_dir.iterdir()] == ["nix.conf"]


def test_node_config_runs_as_root_without_capabilities(tmp_path: Path) -> None:
    script, _ = shipped_node_config_script()
    (tmp_path / "nix.conf").write_text(ORIGINAL_NIX_CONF + "\n")
    result = run_without_capabilities(script, {"NIX_CONF_DIR": str(tmp_path)}, groups="0")
    assert result.returncode == 0, result.stderr
    assert "!include flox-node-cache.conf" in (tmp_path / "nix.conf").read_text()


# --- scripts and the image ------------------------------------------------------------------

@pytest.mark.parametrize("script", [WALKTHROUGH, NODE_CONFIG_SCRIPT], ids=lambda p: p.name)
def test_scripts_parse(script: Path) -> None:
    shells = ["bash"] + (["dash"] if script == NODE_CONFIG_SCRIPT and shutil.which("dash") else [])
    for shell in shells:
        result = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{shell}: {result.stderr}"
    assert os.access(script, os.X_OK)


def test_walkthrough_uses_the_repositorys_paths() -> None:
    text = WALKTHROUGH.read_text()
    for rel in re.findall(r'"\$REPO_ROOT/([^"]+)"', text):
        assert (REPO / rel).exists(), rel
    assert "kind load docker-image" in text and "apply -k" in text


def test_dockerfile_builds_the_project_from_the_repo_root() -> None:
    text = (DAEMONSET / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", text, re.M)
    assert re.search(r"apt-get install .*\bgit\b", text)
    assert "pip install ." in text
    assert 'ENTRYPOINT ["flox-node-cache"]' in text
    assert re.search(r"^USER 65532", text, re.M)  # non-root unless the DaemonSet says so
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M):
        for source in line.split()[:-1]:
            assert (REPO / source).exists(), f"COPY source {source} missing from the repo root"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^flox-node-cache = "agent\.cli:main"', pyproject, re.M)


def test_images_are_consistent() -> None:
    images = {c["image"] for k in INSTALLS for c in all_containers(pod_spec(k))}
    assert len(images) == 1, images
    (image,) = images
    assert image.startswith("ghcr.io/flox/flox-node-cache:")
    assert f"IMAGE:-{image}" in WALKTHROUGH.read_text()
