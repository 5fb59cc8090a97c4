"""/healthz (the process answers) and /readyz (it can serve, with the state of each part)."""

import json
import time
from collections.abc import Callable

from aiohttp import web

from agent.kube import health as kube_health
from agent.readthrough import Source
from agent.store.store import Store


def source_states(sources: list[Source]) -> dict[str, str]:
    return {s.name: "circuit_open" if s.breaker.is_open else "ok" for s in sources}


def routes(store: Store, sources: list[Source],
           peers: Callable[[], dict[str, str]] | None = None) -> list[web.RouteDef]:
    """`sources`: the upstreams; `peers`: the state of each peer, with peers."""
    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        checks: dict[str, object] = {}
        ready = True
        try:
            store.counts()
            # Read-only: a full disk left no room to open it; hits are still served.
            checks["index"] = "read_only" if store.read_only else "ok"
        except Exception as e:  # the index is unusable: nothing can be served
            checks["index"] = f"error: {e}"
            ready = False
        checks["disk"] = "full" if store.disk_full else "ok"
        checks["free_bytes"] = store.free_bytes()
        checks["upstreams"] = source_states(sources)
        checks["kubernetes"] = kube_health.status()  # per-watcher health, never unready
        if peers is not None:
            checks["peers"] = peers()
        degraded = store.disk_full or any(s.breaker.is_open for s in sources)
        body = {"ready": ready, "degraded": degraded, "checks": checks, "time": time.time()}
        return web.Response(status=200 if ready else 503, text=json.dumps(body) + "\n",
                            content_type="application/json")

    return [web.get("/healthz", healthz), web.get("/readyz", readyz)]
