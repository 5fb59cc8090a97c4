"""Every HTTP answer counted the same way, whichever path gave it: a request id, the requests
and duration metrics, and a debug line. The aiohttp routes go through `middleware`; the fast
path (serve/fastpath.py) calls `Answers.record` itself.
"""

import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from agent import metrics
from agent.logs import new_request_id, request_id

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def endpoint_of(path: str) -> str:
    """The metrics' endpoint label of a route's canonical path."""
    if path.endswith(".narinfo"):
        return "narinfo"
    if path.startswith("/nar/"):
        return "nar"
    if path.startswith("/v1/"):
        return "admin"
    return path.strip("/") or "other"


class Answers:
    """One listener's answers (the metrics are lock-free: agent/loop_metrics.py)."""

    def __init__(self, listener: str) -> None:
        self.listener = listener

    def record(self, endpoint: str, method: str, code: int, started: float, path: str,
               rid: bytes = b"") -> None:
        """Count an answer begun at `started` (time.monotonic()); `rid` when the request id is
        not in the logging context (the fast path)."""
        elapsed = time.monotonic() - started
        metrics.HTTP_REQUESTS.labels(self.listener, endpoint, method, str(code)).inc()
        metrics.HTTP_DURATION.labels(endpoint).observe(elapsed)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request", extra={"fields": {
                "listener": self.listener, "method": method, "path": path, "status": code,
                "ms": round(elapsed * 1000, 2), **({"request_id": rid.decode()} if rid else {})}})


def middleware(listener: str) -> Callable:
    """The aiohttp middleware: request id (echoed, or made), then `Answers.record`."""
    answers = Answers(listener)
    endpoints: dict[web.AbstractResource | None, str] = {}

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = request.headers.get("X-Request-Id") or new_request_id()
        token = request_id.set(rid)
        start = time.monotonic()
        resource = request.match_info.route.resource
        endpoint = endpoints.get(resource)
        if endpoint is None:
            endpoint = endpoints[resource] = endpoint_of(
                resource.canonical if resource is not None else "")
        code = 500
        try:
            resp = await handler(request)
            code = resp.status
            if not resp.prepared:
                resp.headers["X-Request-Id"] = rid
            return resp
        except web.HTTPException as e:
            code = e.status
            raise
        finally:
            answers.record(endpoint, request.method, code, start, request.path)
            request_id.reset(token)
    return observe
