"""An in-process Kubernetes API server that behaves like kube-apiserver where the agent can tell.

It runs aiohttp in its own thread and asyncio loop (like `upstream.py`), so async tests whose
loop runs the real kubernetes-asyncio client, sync tests and subprocesses can all use it.

Behaviour copied from kube-apiserver (REFERENCE §7):
- one global, monotonically increasing resourceVersion; a bounded history (`history_limit`
  changes, `compact()` forgets it all): a watch from a compacted resourceVersion gets an ERROR
  event with a 410 Status inside a 200 stream (or an HTTP 410 with `expired_watch_as_http`), a
  too-new one a 504;
- lists: `resourceVersion=0` is served from the watch cache (no paging, no quorum read);
  otherwise a quorum read paged with `limit`/`continue` from a snapshot taken by the first
  page; pages hold at most `limit` objects before filtering, so they may be short or empty; an
  expired `continue` (its snapshot compacted) is 410;
- watches: `?watch=1&resourceVersion=RV` streams JSON lines from RV (exclusive); no RV (or
  "0") first sends ADDED for the current state; the server ends a watch at `timeoutSeconds` or
  after `watch_lifetime` seconds, whichever is first; with `allowWatchBookmarks` a BOOKMARK
  every `bookmark_interval`; with a selector, an object that stops matching is sent as DELETED
  and one that starts matching as ADDED;
- field selectors (per-resource supported fields, 400 otherwise) and label selectors;
- the status subresource: status in a create or a main-resource write is dropped, `/status`
  writes change only the status; `metadata.generation` increments on spec change; a write that
  changes nothing is a no-op (no new resourceVersion, no event);
- PATCH: merge-patch+json and json-patch+json everywhere, strategic-merge-patch+json on
  built-in kinds only (415 on custom resources);
- custom resources conform to their CRD (daemonset/base/crd-*.yaml): unknown fields pruned,
  defaults applied, violations 422 with the field errors; names must be DNS-1123 (422);
- pods are created Pending; pods are deleted gracefully (MODIFIED with deletionTimestamp,
  DELETED after `pod_grace_seconds`), as is anything with finalizers (DELETED once they are
  removed); the garbage collector deletes the dependents (ownerReferences) of what is deleted;
- PUT with a stale `metadata.resourceVersion` is 409 Conflict, as is a PATCH whose
  `metadata.uid` or a DELETE whose `preconditions.uid` names another object;
- authentication by bearer token (401 without), RBAC from daemonset/base/rbac.yaml per service
  account (`token_for`, `write_kubeconfig(service_account=...)`; 403 per verb and resource,
  subresources included); core/v1 Events must live in the namespace of their involved object.

Test controls: `create/update/delete/get/list`, `drop_watches()`, `pause_watches()`/
`resume_watches()`, `compact()`, `send_bookmarks()`, `silence_watches()`, `inject()` (an HTTP
error with optional Retry-After, a reset, or a stall, for matching requests), `restart()` (every
connection cut, history and continue snapshots lost), `bind()`, and `requests`: every request
with its verb, resource, subresource, namespace, user and answer status; `events_sent` counts
the watch events delivered.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import random
import re
import socket
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from tests.support.kuberbac import ADMIN, RBAC, Attributes, service_account_user
from tests.support.kubeschema import PatchError, apply_schema, crd_schema, json_patch

Obj = dict[str, Any]
TOKEN = "fake-kubeapi-token"  # the admin's (system:masters): RBAC does not apply
CR_GROUP = "nodecache.flox.dev"
REPO = Path(__file__).resolve().parents[2]
RBAC_YAML = REPO / "daemonset" / "base" / "rbac.yaml"
CRD_YAMLS = sorted((REPO / "daemonset" / "base").glob("crd-*.yaml"))
DNS1123 = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    status_subresource: bool = True
    generation: bool = True
    fields: tuple[str, ...] = ("metadata.name", "metadata.namespace")
    graceful: bool = False  # deleted in two steps (pods)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


POD_FIELDS = ("metadata.name", "metadata.namespace", "spec.nodeName", "spec.restartPolicy",
              "spec.schedulerName", "spec.serviceAccountName", "status.phase", "status.podIP",
              "status.nominatedNodeName")
RESOURCES = [
    Resource("", "v1", "pods", "Pod", True, fields=POD_FIELDS, graceful=True),
    Resource("", "v1", "nodes", "Node", False, generation=False),
    Resource("", "v1", "events", "Event", True, status_subresource=False, generation=False),
    Resource("apps", "v1", "deployments", "Deployment", True),
    Resource("apps", "v1", "statefulsets", "StatefulSet", True),
    Resource("apps", "v1", "daemonsets", "DaemonSet", True),
    Resource("batch", "v1", "jobs", "Job", True),
    Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True,
             status_subresource=False, generation=False),
    Resource("batch", "v1", "cronjobs", "CronJob", True),
    Resource("coordination.k8s.io", "v1", "leases", "Lease", True, status_subresource=False,
             generation=False),
    Resource(CR_GROUP, "v1alpha1", "environmentprewarms", "EnvironmentPrewarm", False),
    Resource(CR_GROUP, "v1alpha1", "nodeprewarms", "NodePrewarm", False),
]
BY_KIND = {r.kind: r for r in RESOURCES}


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str,
                 details: Obj | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> Obj:
        out = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": self.message, "reason": self.reason, "code": self.code}
        if self.details:
            out["details"] = self.details
        return out


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    content_type: str
    verb: str = ""  # RBAC's: get list watch create update patch delete deletecollection
    group: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""
    user: str = ""  # system:serviceaccount:<ns>:<name>, or the admin
    status: int = 0  # the HTTP status answered


@dataclass
class Fault:
    """What an `inject()`ed fault does to the requests it matches."""

    status: int  # an HTTP status; 0 = stall, -1 = connection reset
    retry_after: int | None
    seconds: float
    match: Callable[[Recorded], bool]
    remaining: int | None  # None = until cleared


# --- selectors -----------------------------------------------------------------------------

def _lookup(obj: Obj, dotted: str) -> str:
    cur: Any = obj
    for part in dotted.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    return "" if cur is None else str(cur)


def parse_field_selector(text: str, allowed: Iterable[str]) -> list[tuple[str, str, str]]:
    reqs = []
    for term in filter(None, text.split(",")):
        m = re.fullmatch(r"([\w.]+)\s*(==|!=|=)\s*(.*)", term.strip())
        if not m:
            raise ApiError(400, "BadRequest", f"invalid field selector: {term!r}")
        if m[1] not in allowed:
            raise ApiError(400, "BadRequest", f'field label not supported: {m[1]}')
        reqs.append((m[1], "!=" if m[2] == "!=" else "=", m[3]))
    return reqs


def field_match(obj: Obj, reqs: list[tuple[str, str, str]]) -> bool:
    return all((_lookup(obj, k) == v) == (op == "=") for k, op, v in reqs)


def parse_label_selector(text: str) -> list[tuple[str, str, set[str]]]:
    reqs = []
    for term in re.split(r",(?![^(]*\))", text):
        term = term.strip()
        if not term:
            continue
        if m := re.fullmatch(r"([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)", term):
            reqs.append((m[1], m[2], {v.strip() for v in m[3].split(",") if v.strip()}))
        elif m := re.fullmatch(r"([\w./-]+)\s*(==|!=|=)\s*([\w.-]*)", term):
            reqs.append((m[1], "!=" if m[2] == "!=" else "=", {m[3]}))
        elif m := re.fullmatch(r"(!?)([\w./-]+)", term):
            reqs.append((m[2], "!exists" if m[1] else "exists", set()))
        else:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {term!r}")
    return reqs


def label_match(obj: Obj, reqs: list[tuple[str, str, set[str]]]) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    for key, op, values in reqs:
        present, value = key in labels, labels.get(key)
        ok = {"=": present and value in values, "in": present and value in values,
              "!=": not present or value not in values,
              "notin": not present or value not in values,
              "exists": present, "!exists": not present}[op]
        if not ok:
            return False
    return True


@dataclass
class Selector:
    fields: list[tuple[str, str, str]] = field(default_factory=list)
    labels: list[tuple[str, str, set[str]]] = field(default_factory=list)
    namespace: str | None = None

    def match(self, obj: Obj | None) -> bool:
        if obj is None:
            return False
        if self.namespace and obj["metadata"].get("namespace") != self.namespace:
            return False
        return field_match(obj, self.fields) and label_match(obj, self.labels)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# --- the store -----------------------------------------------------------------------------

@dataclass
class Change:
    rv: int
    type: str
    res: Resource
    obj: Obj
    old: Obj | None


@dataclass
class Watcher:
    res: Resource
    selector: Selector
    bookmarks: bool
    queue: asyncio.Queue[Change | str]
    mute: bool = False  # black-holed: stays open, delivers nothing ever again


class Store:
    """Objects, history and watchers; thread-safe (tests mutate it from their own loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, history_limit: int,
                 pod_grace_seconds: float) -> None:
        self.loop = loop
        self.lock = threading.RLock()
        self.rv = 100
        self.objects: dict[tuple[str, str, str], Obj] = {}
        self.history: list[Change] = []
        self.history_limit = history_limit
        self.compacted = self.rv
        self.watchers: list[Watcher] = []
        self.schemas = {kind: schema for kind, schema in map(crd_schema, CRD_YAMLS)}
        self.pod_grace_seconds = pod_grace_seconds

    def _key(self, res: Resource, ns: str | None, name: str) -> tuple[str, str, str]:
        return (res.plural, ns or "", name)

    def get(self, res: Resource, ns: str | None, name: str) -> Obj:
        with self.lock:
            obj = self.objects.get(self._key(res, ns, name))
            if obj is None:
                raise ApiError(404, "NotFound", f'{res.plural} "{name}" not found',
                               {"name": name, "kind": res.plural})
            return copy.deepcopy(obj)

    def list(self, res: Resource, sel: Selector) -> tuple[list[Obj], int]:
        with self.lock:
            return [o for o in self.snapshot(res) if sel.match(o)], self.rv

    def snapshot(self, res: Resource) -> list[Obj]:
        with self.lock:
            return [copy.deepcopy(o) for (plural, _, _), o in sorted(self.objects.items())
                    if plural == res.plural]

    def _commit(self, type_: str, res: Resource, obj: Obj, old: Obj | None) -> Obj:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        key = self._key(res, obj["metadata"].get("namespace"), obj["metadata"]["name"])
        if type_ == "DELETED":
            self.objects.pop(key, None)
        else:
            self.objects[key] = obj
        change = Change(self.rv, type_, res, copy.deepcopy(obj), old)
        self.history.append(change)
        if len(self.history) > self.history_limit:  # etcd compaction
            self.compacted = self.history.pop(0).rv
        for w in self.watchers:
            if w.res == res:
                self.loop.call_soon_threadsafe(w.queue.put_nowait, change)
        return copy.deepcopy(obj)

    def _conform(self, res: Resource, obj: Obj) -> Obj:
        """Prune and default a custom resource by its CRD schema; 422 when it is invalid."""
        name = obj["metadata"].get("name", "")
        errors = [] if DNS1123.fullmatch(name) and len(name) <= 253 else [
            f'metadata.name: Invalid value: "{name}": a lowercase RFC 1123 subdomain must '
            "consist of lower case alphanumeric characters, '-' or '.'"]
        schema = self.schemas.get(res.kind)
        if schema:
            obj, more = apply_schema(obj, schema)
            errors += more
        if errors:
            raise ApiError(422, "Invalid", f'{res.kind}.{res.group or "core"} "{name}" is '
                           f"invalid: [{', '.join(errors)}]",
                           {"name": name, "kind": res.kind,
                            "causes": [{"message": e} for e in errors]})
        return obj

    def create(self, res: Resource, ns: str | None, body: Obj) -> Obj:
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        obj["apiVersion"], obj["kind"] = res.api_version, res.kind
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if not meta.get("name"):
            raise ApiError(422, "Invalid", "metadata.name: Required value")
        if res.namespaced:
            if meta.get("namespace", ns) != ns:
                raise ApiError(400, "BadRequest", "the namespace of the object does not match")
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        if res.kind == "Event":
            _validate_event(obj, ns)
        if res.status_subresource:
            obj.pop("status", None)  # only the /status subresource writes status
        if res.kind == "Pod":
            obj["status"] = {"phase": "Pending"}  # until a kubelet says otherwise
        for k in ("deletionTimestamp", "deletionGracePeriodSeconds", "uid", "resourceVersion"):
            meta.pop(k, None)
        obj = self._conform(res, obj)
        meta = obj["metadata"]
        with self.lock:
            if self._key(res, ns, meta["name"]) in self.objects:
                raise ApiError(409, "AlreadyExists",
                               f'{res.plural} "{meta["name"]}" already exists')
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now())
            if res.generation:
                meta["generation"] = 1
            return self._commit("ADDED", res, obj, None)

    def write(self, res: Resource, ns: str | None, name: str, new: Obj, *, status: bool,
              check_rv: str | None = None) -> Obj:
        """Store `new` as the object, honouring the status subresource split."""
        with self.lock:
            old = self.objects.get(self._key(res, ns, name))
            if old is None:
                raise ApiError(404, "NotFound", f'{res.plural} "{name}" not found')
            if check_rv and check_rv != old["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {res.plural} '
                               f'"{name}": the object has been modified; please apply your '
                               "changes to the latest version and try again")
            obj = self._conform(res, _split_status(res, old, new, status=status))
            if obj == old:
                return copy.deepcopy(old)
            if res.generation and _spec_of(obj) != _spec_of(old):
                obj["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
            if obj["metadata"].get("deletionTimestamp") and not obj["metadata"].get(
                    "finalizers") and not res.graceful:
                return self._commit("DELETED", res, obj, copy.deepcopy(old))
            return self._commit("MODIFIED", res, obj, copy.deepcopy(old))

    def delete(self, res: Resource, ns: str | None, name: str) -> Obj:
        with self.lock:
            old = self.get(res, ns, name)
            meta = old["metadata"]
            if meta.get("deletionTimestamp"):
                return old  # already terminating
            if not res.graceful and not meta.get("finalizers"):
                gone = self._commit("DELETED", res, copy.deepcopy(old), old)
                self._collect_dependents(meta["uid"])
                return gone
            obj = copy.deepcopy(old)
            obj["metadata"]["deletionTimestamp"] = _now()
            if res.graceful:
                obj["metadata"]["deletionGracePeriodSeconds"] = int(self.pod_grace_seconds)
                if not meta.get("finalizers"):  # the kubelet confirms once the pod stopped
                    self.loop.call_soon_threadsafe(
                        self.loop.call_later, self.pod_grace_seconds, self._finish_delete,
                        res, ns, name, meta["uid"])
            return self._commit("MODIFIED", res, obj, old)

    def _collect_dependents(self, owner_uid: str) -> None:
        """The garbage collector: objects owned (ownerReferences) by a deleted one go too."""
        for (plural, ns, name), obj in list(self.objects.items()):
            owners = obj["metadata"].get("ownerReferences") or []
            if any(o.get("uid") == owner_uid for o in owners):
                res = next(r for r in RESOURCES if r.plural == plural)
                self.delete(res, ns or None, name)

    def _finish_delete(self, res: Resource, ns: str | None, name: str, uid: str) -> None:
        with self.lock:
            obj = self.objects.get(self._key(res, ns, name))
            if obj is not None and obj["metadata"]["uid"] == uid:
                self._commit("DELETED", res, copy.deepcopy(obj), copy.deepcopy(obj))

    def add_watcher(self, res: Resource, sel: Selector, rv: str | None,
                    bookmarks: bool) -> tuple[Watcher, list[Change]] | ApiError:
        """Register a watcher; returns the backlog to send first, or the error (410, 504)."""
        with self.lock:
            w = Watcher(res, sel, bookmarks, asyncio.Queue())
            if rv in (None, "", "0"):
                backlog = [Change(self.rv, "ADDED", res, o, None)
                           for o in self.list(res, sel)[0]]
            else:
                start = int(rv)
                if start < self.compacted:
                    return ApiError(410, "Expired", f"too old resource version: {start} "
                                    f"({self.compacted})")
                if start > self.rv:
                    return ApiError(504, "Timeout", f"Too large resource version: {start}, "
                                    f"current: {self.rv}", {"retryAfterSeconds": 1})
                backlog = [c for c in self.history if c.rv > start and c.res == res]
            self.watchers.append(w)
            return w, backlog

    def remove_watcher(self, w: Watcher) -> None:
        with self.lock:
            if w in self.watchers:
                self.watchers.remove(w)

    def broadcast(self, item: str) -> None:
        with self.lock:
            for w in self.watchers:
                self.loop.call_soon_threadsafe(w.queue.put_nowait, item)

    def compact(self) -> None:
        with self.lock:
            self.history.clear()
            self.compacted = self.rv


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _spec_of(obj: Obj) -> Obj:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def _split_status(res: Resource, old: Obj, new: Obj, *, status: bool) -> Obj:
    new = copy.deepcopy(new)
    meta = copy.deepcopy(old["metadata"])
    if not status:  # labels, annotations and finalizers are writable through the main resource
        for k in ("labels", "annotations", "finalizers", "ownerReferences"):
            if k in new.get("metadata", {}):
                meta[k] = new["metadata"][k]
            else:
                meta.pop(k, None)
    if status:
        obj = {k: v for k, v in copy.deepcopy(old).items() if k != "status"}
        if "status" in new:
            obj["status"] = new["status"]
    elif res.status_subresource:
        obj = {k: v for k, v in new.items() if k != "status"}
        if "status" in old:
            obj["status"] = copy.deepcopy(old["status"])
    else:
        obj = new
    obj["metadata"], obj["apiVersion"], obj["kind"] = meta, res.api_version, res.kind
    return obj


def _validate_event(obj: Obj, ns: str | None) -> None:
    involved = obj.get("involvedObject") or {}
    want = involved.get("namespace") or "default"
    if want != ns:
        raise ApiError(422, "Invalid", f"involvedObject.namespace: Invalid value: "
                       f"{involved.get('namespace', '')!r}: does not match event.namespace")


# --- HTTP ----------------------------------------------------------------------------------

ROUTE = re.compile(r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<gv>[^/]+))"
                   r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[^/]+)"
                   r"(?:/(?P<name>[^/]+))?(?:/(?P<sub>[^/]+))?$")
MERGE, STRATEGIC, JSON_PATCH = ("application/merge-patch+json",
                                "application/strategic-merge-patch+json",
                                "application/json-patch+json")
WATCH_TRUE = ("1", "true", "True")
VERBS = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


class FakeKubeAPI:
    """Start with `with FakeKubeAPI() as api:` (or `start()`/`stop()`)."""

    def __init__(self, *, watch_lifetime: tuple[float, float] = (300.0, 600.0),
                 bookmark_interval: float = 60.0, history_limit: int = 1000,
                 pod_grace_seconds: float = 0.05, expired_watch_as_http: bool = False) -> None:
        self.requests: list[Recorded] = []
        self.events_sent = 0  # watch events written to clients (bookmarks not counted)
        self.watch_lifetime, self.bookmark_interval = watch_lifetime, bookmark_interval
        self.expired_watch_as_http = expired_watch_as_http
        self._loop = asyncio.new_event_loop()
        self.store = Store(self._loop, history_limit=history_limit,
                           pod_grace_seconds=pod_grace_seconds)
        self.rbac = RBAC()
        self.rbac.load(RBAC_YAML)
        self.tokens = {TOKEN: ADMIN}
        self.faults: list[Fault] = []
        self._snapshots: dict[str, tuple[int, list[Obj]]] = {}  # continue id -> (rv, objects)
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._watches_paused = threading.Event()
        self._silent = threading.Event()
        self._lock = threading.Lock()
        self.port = 0

    # lifecycle
    def start(self) -> FakeKubeAPI:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    def stop(self) -> None:
        self.drop_watches(abrupt=True)
        if self._runner:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> FakeKubeAPI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def token_for(self, namespace: str, service_account: str) -> str:
        """The bearer token of a service account (its requests are subject to RBAC)."""
        token = f"sa-{namespace}-{service_account}"
        self.tokens[token] = service_account_user(namespace, service_account)
        return token

    def bind(self, cluster_role: str, namespace: str, service_account: str) -> None:
        """A ClusterRoleBinding of `cluster_role` to a service account."""
        self.rbac.bind_cluster_role(cluster_role, namespace, service_account)

    def write_kubeconfig(self, path: Path | str,
                         service_account: tuple[str, str] | None = None) -> Path:
        """A kubeconfig for the admin, or for `(namespace, name)`'s service account."""
        token = self.token_for(*service_account) if service_account else TOKEN
        cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "fake",
               "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
               "users": [{"name": "fake", "user": {"token": token}}],
               "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}
        Path(path).write_text(yaml.safe_dump(cfg))
        return Path(path)

    # test controls (callable from any thread)
    def create(self, obj: Obj) -> Obj:
        """Create as a client would; a given status is then written as its controller would
        (a pod's kubelet: Pending first, then the status given)."""
        res = BY_KIND[obj["kind"]]
        ns = obj.get("metadata", {}).get("namespace", "default") if res.namespaced else None
        created = self.store.create(res, ns, obj)
        if res.status_subresource and obj.get("status"):
            created["status"] = obj["status"]
            return self.store.write(res, ns, created["metadata"]["name"], created, status=True)
        return created

    def update(self, obj: Obj, *, status: bool = False) -> Obj:
        res, ns, name = self._ident(obj)
        return self.store.write(res, ns, name, obj, status=status)

    def delete(self, obj: Obj) -> Obj:
        return self.store.delete(*self._ident(obj))

    def get(self, kind: str, name: str, namespace: str | None = None) -> Obj:
        res = BY_KIND[kind]
        return self.store.get(res, (namespace or "default") if res.namespaced else None, name)

    def list(self, kind: str) -> list[Obj]:
        return self.store.list(BY_KIND[kind], Selector())[0]

    def drop_watches(self, *, abrupt: bool = False) -> None:
        """End every open watch stream: cleanly (EOF) or by cutting the connection."""
        self.store.broadcast("ABORT" if abrupt else "CLOSE")

    def pause_watches(self) -> None:
        """Hold new watch requests (as a restarting server would) until `resume_watches()`."""
        self._watches_paused.set()

    def resume_watches(self) -> None:
        self._watches_paused.clear()

    def silence_watches(self, silent: bool = True) -> None:
        """Open watches (and new ones, until called with False) stay open but never deliver
        anything again, bookmarks included: a black-holing proxy."""
        with self.store.lock:
            if silent:
                self._silent.set()
                for w in self.store.watchers:
                    w.mute = True
            else:
                self._silent.clear()

    def compact(self) -> None:
        """Forget history: watches from an older resourceVersion now get 410 Gone."""
        self.store.compact()

    def restart(self) -> None:
        """A restart of the API server: every connection cut, history and snapshots lost."""
        with self.store.lock:
            self.store.compact()
            self._snapshots.clear()
        self.drop_watches(abrupt=True)

    def send_bookmarks(self) -> None:
        with self.store.lock:  # the RV is taken in order with the changes queued before it
            self.store.broadcast(f"BOOKMARK:{self.store.rv}")

    def inject(self, status: int = 503, *, times: int | None = 1, verb: str | None = None,
               resource: str | None = None, subresource: str | None = None,
               retry_after: int | None = None, stall: float = 0.0, reset: bool = False,
               user: str | None = None) -> Fault:
        """Make the next `times` matching requests fail: `status` (with Retry-After), a
        connection reset, or a stall of `stall` seconds before being served normally."""
        def match(r: Recorded) -> bool:
            return ((verb is None or r.verb == verb)
                    and (resource is None or r.resource == resource)
                    and (subresource is None or r.subresource == subresource)
                    and (user is None or r.user == user))

        fault = Fault(-1 if reset else 0 if stall else status, retry_after, stall, match, times)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def open_watches(self, plural: str | None = None) -> int:
        with self.store.lock:
            return sum(1 for w in self.store.watchers if plural in (None, w.res.plural))

    def requests_for(self, plural: str, *, watch: bool | None = None,
                     method: str = "GET") -> list[Recorded]:
        out = []
        for r in list(self.requests):
            if r.resource != plural or r.method != method or r.name:
                continue
            if watch is None or (r.verb == "watch") == watch:
                out.append(r)
        return out

    @staticmethod
    def _ident(obj: Obj) -> tuple[Resource, str | None, str]:
        res = BY_KIND[obj["kind"]]
        meta = obj["metadata"]
        return res, meta.get("namespace", "default") if res.namespaced else None, meta["name"]

    # request handling
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        q = dict(request.query)
        rec = _record(request, q)
        rec.user = self.tokens.get(request.headers.get("Authorization", "")[7:], "")
        self.requests.append(rec)
        resp = await self._answer(request, rec, q)
        rec.status = resp.status
        return resp

    async def _answer(self, request: web.Request, rec: Recorded,
                      q: dict[str, str]) -> web.StreamResponse:
        try:
            if not rec.user:
                raise ApiError(401, "Unauthorized", "Unauthorized")
            await self._apply_faults(request, rec)
            if request.path in ("/version", "/api", "/apis"):
                return web.json_response(self._discovery(request.path))
            attrs = Attributes(rec.user, rec.verb, rec.group, rec.resource, rec.subresource,
                               rec.namespace, rec.name)
            if not self.rbac.allows(attrs):
                raise ApiError(403, "Forbidden", f"{rec.resource} is forbidden: "
                               f"{attrs.describe()}", {"kind": rec.resource})
            m = ROUTE.match(request.path)
            assert m is not None
            return await self._dispatch(request, self._resource(m), m, q)
        except ApiError as e:
            headers = {}
            if e.details and "retryAfterSeconds" in e.details:
                headers["Retry-After"] = str(e.details["retryAfterSeconds"])
            return web.json_response(e.status(), status=e.code, headers=headers)

    async def _apply_faults(self, request: web.Request, rec: Recorded) -> None:
        with self._lock:
            fault = next((f for f in self.faults if f.match(rec)), None)
            if fault and fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self.faults.remove(fault)
        if fault is None:
            return
        if fault.status == 0:
            await asyncio.sleep(fault.seconds)
        elif fault.status < 0:
            if request.transport:
                request.transport.abort()
            raise ApiError(500, "InternalError", "connection reset")
        else:
            details = {"retryAfterSeconds": fault.retry_after} if fault.retry_after else None
            reason = "TooManyRequests" if fault.status == 429 else "InternalError"
            raise ApiError(fault.status, reason, f"injected {fault.status}", details)

    def _resource(self, m: re.Match[str]) -> Resource:
        group, version = ("", "v1") if m["core"] else (m["group"], m["gv"])
        for r in RESOURCES:
            if (r.group, r.version, r.plural) == (group, version, m["plural"]):
                if m["ns"] and not r.namespaced:
                    break
                return r
        raise ApiError(404, "NotFound", "the server could not find the requested resource")

    async def _dispatch(self, request: web.Request, res: Resource, m: re.Match[str],
                        q: dict[str, str]) -> web.StreamResponse:
        ns, name, sub, method = m["ns"], m["name"], m["sub"], request.method
        if res.namespaced and name and not ns:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if sub and (sub != "status" or not res.status_subresource):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if not name:
            if method == "GET":
                sel = Selector(parse_field_selector(q.get("fieldSelector", ""), res.fields),
                               parse_label_selector(q.get("labelSelector", "")), ns)
                if q.get("watch") in WATCH_TRUE:
                    return await self._watch(request, res, sel, q)
                return web.json_response(self._list(res, sel, q))
            if method == "POST" and (ns or not res.namespaced):
                body = await request.json()
                return web.json_response(self.store.create(res, ns, body), status=201)
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported")
        status = sub == "status"
        if method == "GET":
            return web.json_response(self.store.get(res, ns, name))
        if method == "DELETE":
            body = await request.json() if request.can_read_body else {}
            uid = ((body or {}).get("preconditions") or {}).get("uid")
            if uid and uid != self.store.get(res, ns, name)["metadata"]["uid"]:
                raise ApiError(409, "Conflict", f"Precondition failed: UID in precondition: "
                               f"{uid}, UID in object meta: "
                               f"{self.store.get(res, ns, name)['metadata']['uid']}")
            return web.json_response(self.store.delete(res, ns, name))
        if method == "PUT":
            body = await request.json()
            return web.json_response(self.store.write(
                res, ns, name, body, status=status,
                check_rv=body.get("metadata", {}).get("resourceVersion")))
        if method == "PATCH":
            return web.json_response(await self._patch(request, res, ns, name, status))
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported")

    async def _patch(self, request: web.Request, res: Resource, ns: str | None, name: str,
                     status: bool) -> Obj:
        ctype = request.headers.get("Content-Type", "").split(";")[0].strip()
        accepted = [MERGE, JSON_PATCH] + ([STRATEGIC] if res.group != CR_GROUP else [])
        if ctype not in accepted:
            raise ApiError(415, "UnsupportedMediaType",
                           f"the body of the request was in an unknown format - accepted "
                           f"media types include: {', '.join(accepted)}")
        patch = await request.json()
        if ctype == JSON_PATCH and not isinstance(patch, list):
            raise ApiError(400, "BadRequest", "a JSON patch must be a list of operations")
        if ctype != JSON_PATCH and not isinstance(patch, dict):
            raise ApiError(400, "BadRequest", "a merge patch must be a JSON object")
        with self.store.lock:
            old = self.store.get(res, ns, name)
            want_uid = ((patch.get("metadata") or {}).get("uid")
                        if isinstance(patch, dict) else None)
            if want_uid and want_uid != old["metadata"]["uid"]:
                raise ApiError(409, "Conflict", f"Precondition failed: UID in precondition: "
                               f"{want_uid}, UID in object meta: {old['metadata']['uid']}")
            try:
                new = json_patch(old, patch) if ctype == JSON_PATCH else merge_patch(old, patch)
            except PatchError as e:
                raise ApiError(422, "Invalid", str(e)) from None
            return self.store.write(res, ns, name, new, status=status)

    def _list(self, res: Resource, sel: Selector, q: dict[str, str]) -> Obj:
        rv_param, limit = q.get("resourceVersion", ""), int(q.get("limit") or 0)
        if q.get("continue"):
            snap_id, offset, rv, objects = self._continue(q["continue"])
        elif rv_param == "0":  # the watch cache: everything, no paging, no quorum read
            items, rv = self.store.list(res, sel)
            return _list_body(res, items, rv, None)
        else:
            if rv_param and int(rv_param) > self.store.rv:
                raise ApiError(504, "Timeout", f"Too large resource version: {rv_param}, "
                               f"current: {self.store.rv}", {"retryAfterSeconds": 1})
            with self.store.lock:
                snap_id, offset, rv, objects = uuid.uuid4().hex, 0, self.store.rv, \
                    self.store.snapshot(res)
        end = offset + limit if limit else len(objects)
        token = None
        if end < len(objects):
            with self._lock:
                self._snapshots[snap_id] = (rv, objects)
                for old in list(self._snapshots)[:-100]:
                    del self._snapshots[old]
            token = base64.b64encode(json.dumps({"id": snap_id, "offset": end,
                                                 "rv": rv}).encode()).decode()
        return _list_body(res, [o for o in objects[offset:end] if sel.match(o)], rv, token)

    def _continue(self, text: str) -> tuple[str, int, int, list[Obj]]:
        try:
            token = json.loads(base64.b64decode(text))
            snap_id, offset = token["id"], int(token["offset"])
        except (ValueError, KeyError, TypeError):
            raise ApiError(400, "BadRequest", "continue key is not valid") from None
        with self._lock:
            snap = self._snapshots.get(snap_id)
        if snap is None or snap[0] < self.store.compacted:
            raise ApiError(410, "Expired", "The provided continue parameter is too old to "
                           "display a consistent list result. You can start a new list "
                           "without the continue parameter.")
        return snap_id, offset, snap[0], snap[1]

    async def _watch(self, request: web.Request, res: Resource, sel: Selector,
                     q: dict[str, str]) -> web.StreamResponse:
        bookmarks = q.get("allowWatchBookmarks") in WATCH_TRUE
        while self._watches_paused.is_set():
            await asyncio.sleep(0.01)
        added = self.store.add_watcher(res, sel, q.get("resourceVersion"), bookmarks)
        if isinstance(added, ApiError) and self.expired_watch_as_http:
            raise added
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        if isinstance(added, ApiError):
            await resp.prepare(request)
            await resp.write(_line({"type": "ERROR", "object": added.status()}))
            await resp.write_eof()
            return resp
        watcher, backlog = added
        watcher.mute = self._silent.is_set()
        lifetime = random.uniform(*self.watch_lifetime)
        if q.get("timeoutSeconds"):
            lifetime = min(lifetime, float(q["timeoutSeconds"]))
        try:  # a client gone before the headers are out must not leave its watcher behind
            await resp.prepare(request)
            async with asyncio.timeout(lifetime):
                await self._stream(request, resp, watcher, backlog)
        except (TimeoutError, ConnectionError):  # ended by the server, or the client left
            pass
        finally:
            self.store.remove_watcher(watcher)
        if request.transport and not request.transport.is_closing():
            await resp.write_eof()
        return resp

    async def _stream(self, request: web.Request, resp: web.StreamResponse, w: Watcher,
                      backlog: list[Change]) -> None:
        for change in backlog:
            await self._send(request, resp, w, change)
        while True:
            try:
                async with asyncio.timeout(self.bookmark_interval):
                    item: Change | str = await w.queue.get()
            except TimeoutError:
                item = f"BOOKMARK:{self.store.rv}"
            if not await self._send(request, resp, w, item):
                return

    async def _send(self, request: web.Request, resp: web.StreamResponse, w: Watcher,
                    change: Change | str) -> bool:
        """Write one item to the stream; False when the stream must end."""
        if change == "ABORT" and request.transport:
            request.transport.abort()
        if change in ("CLOSE", "ABORT"):
            return False
        if w.mute:
            return True
        if isinstance(change, str) and change.startswith("BOOKMARK:"):
            if w.bookmarks:
                obj = {"kind": w.res.kind, "apiVersion": w.res.api_version,
                       "metadata": {"resourceVersion": change.split(":", 1)[1]}}
                await resp.write(_line({"type": "BOOKMARK", "object": obj}))
            return True
        assert isinstance(change, Change)
        event = _event_for(change, w.selector)
        if event:
            self.events_sent += 1
            await resp.write(_line(event))
        return True

    @staticmethod
    def _discovery(path: str) -> Obj:
        if path == "/version":
            return {"major": "1", "minor": "30", "gitVersion": "v1.30.0-fake"}
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"]}
        groups = sorted({(r.group, r.version) for r in RESOURCES if r.group})
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
            {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v}],
             "preferredVersion": {"groupVersion": f"{g}/{v}", "version": v}}
            for g, v in groups]}


def _record(request: web.Request, q: dict[str, str]) -> Recorded:
    rec = Recorded(request.method, request.path, q, request.headers.get("Content-Type", ""))
    m = ROUTE.match(request.path)
    if not m:
        rec.verb = VERBS.get(request.method, request.method.lower())
        return rec
    rec.group = "" if m["core"] else m["group"]
    rec.resource, rec.subresource = m["plural"], m["sub"] or ""
    rec.namespace, rec.name = m["ns"] or "", m["name"] or ""
    rec.verb = VERBS.get(request.method, request.method.lower())
    if request.method == "GET" and not rec.name:
        rec.verb = "watch" if q.get("watch") in WATCH_TRUE else "list"
    elif request.method == "DELETE" and not rec.name:
        rec.verb = "deletecollection"
    return rec


def _list_body(res: Resource, items: list[Obj], rv: int, token: str | None) -> Obj:
    meta: Obj = {"resourceVersion": str(rv)}
    if token:
        meta["continue"] = token
    return {"kind": f"{res.kind}List", "apiVersion": res.api_version, "metadata": meta,
            "items": items}


def _event_for(change: Change, sel: Selector) -> Obj | None:
    """The event a selector-filtered watcher sees (objects entering/leaving the selection)."""
    now, before = sel.match(change.obj), sel.match(change.old)
    if change.type == "DELETED":
        return {"type": "DELETED", "object": change.obj} if before or now else None
    if change.type == "ADDED":
        return {"type": "ADDED", "object": change.obj} if now else None
    if now and before:
        return {"type": "MODIFIED", "object": change.obj}
    if now:
        return {"type": "ADDED", "object": change.obj}
    if before:
        return {"type": "DELETED", "object": change.obj}
    return None


def _line(event: Obj) -> bytes:
    return json.dumps(event).encode() + b"\n"
