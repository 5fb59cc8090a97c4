"""An in-process Kubernetes API server, faithful for everything the agent uses.

It runs aiohttp in its own thread and asyncio loop (like `upstream.py`), so async tests whose
loop runs the real kubernetes-asyncio client, sync tests and subprocesses can all use it.

Behaviour copied from kube-apiserver:
- one global, monotonically increasing resourceVersion; lists carry `metadata.resourceVersion`
  and support `limit`/`continue`;
- `?watch=1&resourceVersion=RV` streams JSON lines from RV (exclusive); no RV (or "0") first
  sends ADDED for the current state; an RV older than the compaction point yields an ERROR
  event with a 410 Status; `allowWatchBookmarks` enables BOOKMARK events; `timeoutSeconds`
  ends the stream; with a selector, an object that stops matching is sent as DELETED and one
  that starts matching as ADDED;
- field selectors (per-resource supported fields, 400 otherwise) and label selectors
  (=, ==, !=, in, notin, exists, !exists);
- resources with a status subresource: writes to the main resource keep the old status,
  writes to `/status` change only the status; `metadata.generation` increments on spec change;
  a patch that changes nothing is a no-op (no new resourceVersion, no watch event);
- PATCH accepts merge-patch+json (and strategic-merge-patch+json on built-in kinds, applied as
  a merge patch) and json-patch+json (RFC 6902: add, remove, replace, test; a failed op is 422
  and leaves the object unchanged); anything else is 415, as custom resources refuse strategic
  merge;
- PUT with a stale `metadata.resourceVersion` is 409 Conflict;
- bearer-token authentication (401 without it); core/v1 Events must live in the namespace of
  their involved object (`default` for cluster-scoped objects).

Test controls: `create/update/delete/get`, `drop_watches()`, `pause_watches()`/`resume_watches()`,
`compact()`, `send_bookmarks()`,
`requests` (a record of every request) and `write_kubeconfig(path)`.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import re
import socket
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

Obj = dict[str, Any]
TOKEN = "fake-kubeapi-token"
CR_GROUP = "nodecache.flox.dev"


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

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


POD_FIELDS = ("metadata.name", "metadata.namespace", "spec.nodeName", "spec.restartPolicy",
              "spec.schedulerName", "spec.serviceAccountName", "status.phase", "status.podIP",
              "status.nominatedNodeName")
RESOURCES = [
    Resource("", "v1", "pods", "Pod", True, fields=POD_FIELDS),
    Resource("", "v1", "nodes", "Node", False, generation=False),
    Resource("", "v1", "events", "Event", True, status_subresource=False, generation=False),
    Resource("apps", "v1", "deployments", "Deployment", True),
    Resource("apps", "v1", "statefulsets", "StatefulSet", True),
    Resource("apps", "v1", "daemonsets", "DaemonSet", True),
    Resource("batch", "v1", "jobs", "Job", True),
    Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True,
             status_subresource=False, generation=False),
    Resource("batch", "v1", "cronjobs", "CronJob", True),
    Resource(CR_GROUP, "v1alpha1", "environmentprewarms", "EnvironmentPrewarm", False),
]
BY_KIND = {r.kind: r for r in RESOURCES}


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> Obj:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    content_type: str


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


class Store:
    """Objects, history and watchers; thread-safe (tests mutate it from their own loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = threading.RLock()
        self.rv = 100
        self.objects: dict[tuple[str, str, str], Obj] = {}
        self.history: list[Change] = []
        self.compacted = self.rv
        self.watchers: list[Watcher] = []

    def _key(self, res: Resource, ns: str | None, name: str) -> tuple[str, str, str]:
        return (res.plural, ns or "", name)

    def get(self, res: Resource, ns: str | None, name: str) -> Obj:
        with self.lock:
            obj = self.objects.get(self._key(res, ns, name))
            if obj is None:
                raise ApiError(404, "NotFound", f'{res.plural} "{name}" not found')
            return copy.deepcopy(obj)

    def list(self, res: Resource, sel: Selector) -> tuple[list[Obj], int]:
        with self.lock:
            items = [copy.deepcopy(o) for (plural, _, _), o in sorted(self.objects.items())
                     if plural == res.plural and sel.match(o)]
            return items, self.rv

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
        for w in self.watchers:
            if w.res == res:
                self.loop.call_soon_threadsafe(w.queue.put_nowait, change)
        return copy.deepcopy(obj)

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
                               f'"{name}": the object has been modified')
            obj = _split_status(res, old, new, status=status)
            if obj == old:
                return copy.deepcopy(old)
            if res.generation and _spec_of(obj) != _spec_of(old):
                obj["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
            return self._commit("MODIFIED", res, obj, copy.deepcopy(old))

    def delete(self, res: Resource, ns: str | None, name: str) -> Obj:
        with self.lock:
            old = self.get(res, ns, name)
            return self._commit("DELETED", res, copy.deepcopy(old), old)

    def add_watcher(self, res: Resource, sel: Selector, rv: str | None,
                    bookmarks: bool) -> tuple[Watcher, list[Change]] | None:
        """Register a watcher; returns the backlog to send first, or None for 410 Gone."""
        with self.lock:
            w = Watcher(res, sel, bookmarks, asyncio.Queue())
            if rv in (None, "", "0"):
                backlog = [Change(self.rv, "ADDED", res, o, None)
                           for o in self.list(res, sel)[0]]
            else:
                start = int(rv)
                if start < self.compacted:
                    return None
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
    if not status:  # labels and annotations are writable through the main resource
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
                   r"(?:/(?P<name>[^/]+))?(?:/(?P<sub>status))?$")
PATCH_TYPES = {"application/merge-patch+json", "application/strategic-merge-patch+json"}


class FakeKubeAPI:
    """Start with `with FakeKubeAPI() as api:` (or `start()`/`stop()`)."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self._loop = asyncio.new_event_loop()
        self.store = Store(self._loop)
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._streams: set[web.StreamResponse] = set()
        self._watches_paused = threading.Event()
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

    def write_kubeconfig(self, path: Path | str) -> Path:
        cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "fake",
               "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
               "users": [{"name": "fake", "user": {"token": TOKEN}}],
               "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}
        Path(path).write_text(yaml.safe_dump(cfg))
        return Path(path)

    # test controls (callable from any thread)
    def create(self, obj: Obj) -> Obj:
        res = BY_KIND[obj["kind"]]
        ns = obj.get("metadata", {}).get("namespace", "default") if res.namespaced else None
        return self.store.create(res, ns, obj)

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

    def compact(self) -> None:
        """Forget history: watches from an older resourceVersion now get 410 Gone."""
        self.store.compact()

    def send_bookmarks(self) -> None:
        with self.store.lock:  # the RV is taken in order with the changes queued before it
            self.store.broadcast(f"BOOKMARK:{self.store.rv}")

    def open_watches(self, plural: str | None = None) -> int:
        with self.store.lock:
            return sum(1 for w in self.store.watchers if plural in (None, w.res.plural))

    def requests_for(self, plural: str, *, watch: bool | None = None,
                     method: str = "GET") -> list[Recorded]:
        out = []
        for r in list(self.requests):
            m = ROUTE.match(r.path)
            if not m or m["plural"] != plural or r.method != method or m["name"]:
                continue
            if watch is None or (r.query.get("watch") in ("1", "true", "True")) == watch:
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
        self.requests.append(Recorded(request.method, request.path, q,
                                      request.headers.get("Content-Type", "")))
        try:
            if request.headers.get("Authorization") != f"Bearer {TOKEN}":
                raise ApiError(401, "Unauthorized", "Unauthorized")
            if request.path in ("/version", "/api", "/apis"):
                return web.json_response(self._discovery(request.path))
            m = ROUTE.match(request.path)
            res = self._resource(m)
            return await self._dispatch(request, res, m, q)
        except ApiError as e:
            return web.json_response(e.status(), status=e.code)

    def _resource(self, m: re.Match[str] | None) -> Resource:
        if m:
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
        if sub and not res.status_subresource:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if not name:
            if method == "GET":
                sel = Selector(parse_field_selector(q.get("fieldSelector", ""), res.fields),
                               parse_label_selector(q.get("labelSelector", "")), ns)
                if q.get("watch") in ("1", "true", "True"):
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
        if ctype == JSON_PATCH:
            return self._json_patch(res, ns, name, status, await request.json())
        strategic_ok = res.group != CR_GROUP
        if ctype not in PATCH_TYPES or (ctype.startswith("application/strategic") and
                                        not strategic_ok):
            raise ApiError(415, "UnsupportedMediaType",
                           f"the body of the request was in an unknown format - accepted "
                           f"media types include: {', '.join(sorted(PATCH_TYPES))}")
        patch = await request.json()
        if not isinstance(patch, dict):
            raise ApiError(400, "BadRequest", "a merge patch must be a JSON object")
        with self.store.lock:
            old = self.store.get(res, ns, name)
            return self.store.write(res, ns, name, merge_patch(old, patch), status=status)

    def _json_patch(self, res: Resource, ns: str | None, name: str, status: bool,
                    ops: Any) -> Obj:
        with self.store.lock:  # test-and-set: the ops see exactly the object they change
            old = self.store.get(res, ns, name)
            return self.store.write(res, ns, name, json_patch(old, ops), status=status)

    def _list(self, res: Resource, sel: Selector, q: dict[str, str]) -> Obj:
        items, rv = self.store.list(res, sel)
        meta: Obj = {"resourceVersion": str(rv)}
        start = 0
        if q.get("continue"):
            token = json.loads(base64.b64decode(q["continue"]))
            if token["rv"] < self.store.compacted:
                raise ApiError(410, "Expired", "The provided continue parameter is too old")
            start, meta["resourceVersion"] = token["start"], str(token["rv"])
        limit = int(q.get("limit") or 0)
        end = start + limit if limit else len(items)
        if end < len(items):
            token = {"start": end, "rv": int(meta["resourceVersion"])}
            meta["continue"] = base64.b64encode(json.dumps(token).encode()).decode()
        return {"kind": f"{res.kind}List", "apiVersion": res.api_version, "metadata": meta,
                "items": items[start:end]}

    async def _watch(self, request: web.Request, res: Resource, sel: Selector,
                     q: dict[str, str]) -> web.StreamResponse:
        bookmarks = q.get("allowWatchBookmarks") in ("1", "true", "True")
        while self._watches_paused.is_set():
            await asyncio.sleep(0.01)
        added = self.store.add_watcher(res, sel, q.get("resourceVersion"), bookmarks)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        if added is None:
            gone = ApiError(410, "Expired", f"too old resource version: "
                            f"{q.get('resourceVersion')} ({self.store.compacted})")
            await resp.write(_line({"type": "ERROR", "object": gone.status()}))
            await resp.write_eof()
            return resp
        watcher, backlog = added
        timeout = float(q["timeoutSeconds"]) if q.get("timeoutSeconds") else None
        self._streams.add(resp)
        try:
            async with asyncio.timeout(timeout):
                await self._stream(request, resp, watcher, backlog)
        except TimeoutError:
            pass
        finally:
            self.store.remove_watcher(watcher)
            self._streams.discard(resp)
        if request.transport and not request.transport.is_closing():
            await resp.write_eof()
        return resp

    async def _stream(self, request: web.Request, resp: web.StreamResponse, w: Watcher,
                      backlog: list[Change]) -> None:
        for change in backlog:
            await self._send(request, resp, w, change)
        while await self._send(request, resp, w, await w.queue.get()):
            pass

    async def _send(self, request: web.Request, resp: web.StreamResponse, w: Watcher,
                    change: Change | str) -> bool:
        """Write one item to the stream; False when the stream must end."""
        if change == "ABORT" and request.transport:
            request.transport.abort()
        if change in ("CLOSE", "ABORT"):
            return False
        if isinstance(change, str) and change.startswith("BOOKMARK:"):
            if w.bookmarks:
                obj = {"kind": w.res.kind, "apiVersion": w.res.api_version,
                       "metadata": {"resourceVersion": change.split(":", 1)[1]}}
                await resp.write(_line({"type": "BOOKMARK", "object": obj}))
            return True
        assert isinstance(change, Change)
        event = _event_for(change, w.selector)
        if event:
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


# --- JSON patch (RFC 6902), for the warm taint's test-and-remove on a Node ------------------

JSON_PATCH = "application/json-patch+json"


def json_patch(doc: Obj, ops: Any) -> Obj:
    """Apply add/remove/replace/test ops in order to a copy of `doc`. Like kube-apiserver, a
    malformed patch is 400 and an op that cannot apply (a failed `test`, a missing path) 422."""
    if not isinstance(ops, list) or not all(isinstance(o, dict) for o in ops):
        raise ApiError(400, "BadRequest", "a JSON patch must be a list of operations")
    doc = copy.deepcopy(doc)
    for op in ops:
        kind, path = op.get("op"), op.get("path")
        if kind not in ("add", "remove", "replace", "test") or not isinstance(path, str):
            raise ApiError(400, "BadRequest", f"unsupported JSON patch operation: {op}")
        if kind != "remove" and "value" not in op:
            raise ApiError(400, "BadRequest", f"JSON patch {kind} needs a value: {op}")
        parent, key = _pointer_parent(doc, path)
        _apply_op(parent, key, kind, op.get("value"), path)
    return doc


def _unprocessable(message: str) -> ApiError:
    return ApiError(422, "Invalid", f"the server rejected our request due to an error in our "
                    f"request: {message}")


def _pointer_parent(doc: Obj, path: str) -> tuple[Any, str]:
    if not path.startswith("/"):
        raise ApiError(400, "BadRequest", f"JSON pointer {path!r} must start with /")
    *parents, last = [t.replace("~1", "/").replace("~0", "~") for t in path[1:].split("/")]
    cur: Any = doc
    for token in parents:
        if isinstance(cur, list) and token.isdigit() and int(token) < len(cur):
            cur = cur[int(token)]
        elif isinstance(cur, dict) and token in cur:
            cur = cur[token]
        else:
            raise _unprocessable(f"doc is missing path: {path!r}")
    return cur, last


def _apply_op(parent: Any, key: str, kind: str, value: Any, path: str) -> None:
    if isinstance(parent, list):
        size = len(parent) + (1 if kind == "add" else 0)
        index = len(parent) if kind == "add" and key == "-" else \
            int(key) if key.isdigit() and int(key) < size else None
        if index is None:
            raise _unprocessable(f"index out of range or invalid in path {path!r}")
        if kind == "add":
            parent.insert(index, copy.deepcopy(value))
        elif kind == "test" and parent[index] != value:
            raise _unprocessable(f"testing value {path!r} failed: test failed")
        elif kind == "remove":
            del parent[index]
        elif kind == "replace":
            parent[index] = copy.deepcopy(value)
    elif isinstance(parent, dict):
        if kind != "add" and key not in parent:
            raise _unprocessable(f"doc is missing key: {path!r}")
        if kind == "test" and parent[key] != value:
            raise _unprocessable(f"testing value {path!r} failed: test failed")
        if kind == "remove":
            del parent[key]
        elif kind in ("add", "replace"):
            parent[key] = copy.deepcopy(value)
    else:
        raise _unprocessable(f"doc is missing path: {path!r}")
