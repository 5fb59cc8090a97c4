"""RBAC as kube-apiserver evaluates it: (Cluster)Roles and their bindings from manifests, a
bearer token per service account, and the 403 message of a denied request."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]
ADMIN = "kubernetes-admin"  # the kubeconfig user of `write_kubeconfig()`: system:masters


def service_account_user(namespace: str, name: str) -> str:
    return f"system:serviceaccount:{namespace}:{name}"


@dataclass(frozen=True)
class Attributes:
    """What RBAC decides on (k8s.io/apiserver authorizer.Attributes)."""

    user: str
    verb: str
    group: str
    resource: str
    subresource: str
    namespace: str
    name: str

    def describe(self) -> str:
        res = f"{self.resource}/{self.subresource}" if self.subresource else self.resource
        scope = (f'in the namespace "{self.namespace}"' if self.namespace
                 else "at the cluster scope")
        return (f'User "{self.user}" cannot {self.verb} resource "{res}" in API group '
                f'"{self.group}" {scope}')


@dataclass
class RBAC:
    roles: dict[tuple[str, str], list[Obj]] = field(default_factory=dict)  # (ns, name) -> rules
    bindings: list[Obj] = field(default_factory=list)

    def load(self, path: Path) -> None:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                self.add(doc)

    def add(self, doc: Obj) -> None:
        kind, meta = doc["kind"], doc["metadata"]
        if kind in ("ClusterRole", "Role"):
            ns = meta.get("namespace", "") if kind == "Role" else ""
            self.roles[(ns, meta["name"])] = doc.get("rules") or []
        elif kind in ("ClusterRoleBinding", "RoleBinding"):
            self.bindings.append(doc)

    def bind_cluster_role(self, role: str, namespace: str, service_account: str) -> None:
        self.add({"kind": "ClusterRoleBinding", "metadata": {"name": f"test-{role}"},
                  "roleRef": {"kind": "ClusterRole", "name": role},
                  "subjects": [{"kind": "ServiceAccount", "name": service_account,
                                "namespace": namespace}]})

    def rules_of(self, user: str, namespace: str) -> list[Obj]:
        """The rules that apply to `user` for a request in `namespace` ("" = cluster)."""
        out: list[Obj] = []
        for b in self.bindings:
            if not any(_subject_is(s, user) for s in b.get("subjects") or []):
                continue
            bns = b["metadata"].get("namespace", "") if b["kind"] == "RoleBinding" else ""
            if bns and bns != namespace:
                continue  # a RoleBinding grants only inside its namespace
            ref = b["roleRef"]
            key = ("", ref["name"]) if ref["kind"] == "ClusterRole" else (bns, ref["name"])
            out += self.roles.get(key, [])
        return out

    def allows(self, a: Attributes) -> bool:
        if a.user == ADMIN:
            return True
        res = f"{a.resource}/{a.subresource}" if a.subresource else a.resource
        return any(_rule_allows(r, a, res) for r in self.rules_of(a.user, a.namespace))


def _subject_is(subject: Obj, user: str) -> bool:
    if subject.get("kind") == "ServiceAccount":
        return user == service_account_user(subject.get("namespace", ""), subject["name"])
    return subject.get("kind") == "User" and subject.get("name") == user


def _rule_allows(rule: Obj, a: Attributes, res: str) -> bool:
    def has(key: str, value: str) -> bool:
        values = rule.get(key) or []
        return "*" in values or value in values

    names = rule.get("resourceNames")
    if names and (not a.name or a.name not in names):
        return False
    return has("apiGroups", a.group) and has("resources", res) and has("verbs", a.verb)
