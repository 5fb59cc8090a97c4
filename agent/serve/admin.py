"""The admin API (JSON), served on the Unix socket only: prewarm, environments, pins, gc.

  POST   /v1/prewarm          {"ref": "owner/env[:N]"} | {"lockfile": "..."}
                              | {"store_paths": [...]}; options: "system", "pin" (default
                              false) -> 202 {"id", ...}
  GET    /v1/prewarm          recent jobs
  GET    /v1/prewarm/{id}     one job: state and progress
  DELETE /v1/prewarm/{id}     cancel a running job (it ends failed, "cancelled"); 409 when
                              it is not running
  GET    /v1/environments     known environments: generation, closure size, presence, pins
  DELETE /v1/pins/{ref}       drop the pin an explicit prewarm put on ref
  GET    /v1/status           store usage, budget, entries
  POST   /v1/gc               {"dry_run": bool} -> what an eviction pass removes
"""

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from agent.prefetch import Prefetcher, Target, TargetError
from agent.store.gc import GcResult

MAX_BODY = 1 << 20  # a lockfile is a few hundred KB at most
CANCEL_WAIT = 5.0   # seconds DELETE /v1/prewarm/{id} waits for the job to stop


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
    except RecursionError:
        raise BadRequest(400, "body is nested too deeply") from None
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


def routes(prefetcher: Prefetcher, status_report: Callable[[], dict[str, object]],
           environments_report: Callable[[], list[dict[str, object]]],
           collect_garbage: Callable[..., Awaitable[GcResult]]) -> list[web.RouteDef]:

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

    async def cancel(request: web.Request) -> web.Response:
        found = prefetcher.jobs.get(request.match_info["id"])
        if found is None:
            return _error(404, "no such prewarm job")
        if found.finished:
            return _error(409, f"prewarm job {found.id} is not running: it {found.state}"
                          + (f" ({found.error})" if found.error else ""))
        prefetcher.cancel(found)
        with contextlib.suppress(TimeoutError):  # answer with its final state when it has one
            await asyncio.wait_for(found.wait(), CANCEL_WAIT)
        return _json(found.to_json())

    async def jobs(request: web.Request) -> web.Response:
        return _json([j.to_json() for j in prefetcher.jobs.values()])

    async def environments(request: web.Request) -> web.Response:
        return _json(environments_report())

    async def unpin(request: web.Request) -> web.Response:
        ref = request.match_info["ref"]
        if prefetcher.unpin(env_pin_holder(ref)):
            return _json({"unpinned": ref})
        return _error(404, f"{ref} is not pinned by a prewarm")

    async def status(request: web.Request) -> web.Response:
        return _json(status_report())

    async def gc(request: web.Request) -> web.Response:
        body = await _body(request)
        result = await collect_garbage(dry_run=bool(body.get("dry_run")))
        return _json(result.to_json())

    return [
        web.post("/v1/prewarm", prewarm),
        web.get("/v1/prewarm", jobs),
        web.get("/v1/prewarm/{id}", job),
        web.delete("/v1/prewarm/{id}", cancel),
        web.get("/v1/environments", environments),
        web.delete("/v1/pins/{ref:.+}", unpin),
        web.get("/v1/status", status),
        web.post("/v1/gc", gc),
    ]
