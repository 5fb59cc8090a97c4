"""The admin API (JSON), served on the Unix socket only: prewarm, environments, pins, gc.

  POST   /v1/prewarm          {"ref": "owner/env[:N]"} | {"lockfile": "..."}
                              | {"store_paths": [...]}; options: "system", "pin" (default
                              false) -> 202 {"id", ...}
  GET    /v1/prewarm          recent jobs
  GET    /v1/prewarm/{id}     one job: state and progress
  GET    /v1/environments     known environments: generation, closure size, presence, pins
  DELETE /v1/pins/{ref}       drop the pin an explicit prewarm put on ref
  GET    /v1/status           store usage, budget, entries
  POST   /v1/gc               {"dry_run": bool} -> what an eviction pass removes
"""

import json
from typing import Any

from aiohttp import web

from agent.prefetch import Target, TargetError
from agent.runtime import Agent

MAX_BODY = 1 << 20  # a lockfile is a few hundred KB at most


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(data, indent=1) + "\n",
                        content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


def env_pin_holder(ref: str) -> str:
    return f"env:{ref}"


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def _body(request: web.Request) -> dict[str, Any]:
    too_large = f"body larger than {MAX_BODY} bytes"
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise BadRequest(413, too_large)
    try:
        data = json.loads(await request.read() or b"{}")
    except web.HTTPRequestEntityTooLarge:  # a chunked body past the app's client_max_size
        raise BadRequest(413, too_large) from None
    except (ValueError, UnicodeDecodeError):
        raise BadRequest(400, "body is not JSON") from None
    if not isinstance(data, dict):
        raise BadRequest(400, "body must be a JSON object")
    return data


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every admin error is JSON {"error": ...}, unknown paths and methods included."""
    if not request.path.startswith("/v1/"):
        return await handler(request)
    try:
        return await handler(request)
    except BadRequest as e:
        return _error(e.status, str(e))
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _error(e.status, e.reason)


def routes(agent: Agent) -> list[web.RouteDef]:
    prefetcher = agent.prefetcher

    async def prewarm(request: web.Request) -> web.Response:
        body = await _body(request)
        unknown = set(body) - {"ref", "lockfile", "store_paths", "system", "pin"}
        if unknown:
            return _error(400, f"unknown field(s): {', '.join(sorted(unknown))}")
        lockfile = body.get("lockfile")
        if isinstance(lockfile, dict):
            lockfile = json.dumps(lockfile)
        paths = body.get("store_paths") or []
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            return _error(400, "store_paths must be a list of store paths")
        for key in ("ref", "system"):
            if body.get(key) is not None and not isinstance(body[key], str):
                return _error(400, f"{key} must be a string")
        try:
            target = Target.parse(ref=body.get("ref"), lockfile=lockfile, store_paths=paths)
        except TargetError as e:
            return _error(400, str(e))
        pin = env_pin_holder(target.name) if body.get("pin") else None
        job = prefetcher.submit(target, pin=pin, system=body.get("system"))
        return _json({**job.to_json(), "status_url": f"/v1/prewarm/{job.id}"}, 202)

    async def job(request: web.Request) -> web.Response:
        found = prefetcher.jobs.get(request.match_info["id"])
        return _json(found.to_json()) if found else _error(404, "no such prewarm job")

    async def jobs(request: web.Request) -> web.Response:
        return _json([j.to_json() for j in prefetcher.jobs.values()])

    async def environments(request: web.Request) -> web.Response:
        return _json(agent.realiser.annotate(prefetcher.environments()))

    async def unpin(request: web.Request) -> web.Response:
        ref = request.match_info["ref"]
        if prefetcher.unpin(env_pin_holder(ref)):
            return _json({"unpinned": ref})
        return _error(404, f"{ref} is not pinned by a prewarm")

    async def status(request: web.Request) -> web.Response:
        return _json(agent.status())

    async def gc(request: web.Request) -> web.Response:
        body = await _body(request)
        return _json(await agent.collect_garbage(dry_run=bool(body.get("dry_run"))))

    return [
        web.post("/v1/prewarm", prewarm),
        web.get("/v1/prewarm", jobs),
        web.get("/v1/prewarm/{id}", job),
        web.get("/v1/environments", environments),
        web.delete("/v1/pins/{ref:.+}", unpin),
        web.get("/v1/status", status),
        web.post("/v1/gc", gc),
    ]
