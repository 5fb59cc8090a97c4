"""/healthz (the process answers) and /readyz (it can serve, with the state of each part)."""

import json
import time

from aiohttp import web

from agent.runtime import Agent


def routes(agent: Agent) -> list[web.RouteDef]:
    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        checks: dict[str, object] = {}
        ready = True
        try:
            agent.store.index.counts()
            checks["index"] = "ok"
        except Exception as e:  # the index is unusable: nothing can be served
            checks["index"] = f"error: {e}"
            ready = False
        checks["disk"] = "full" if agent.store.disk_full else "ok"
        checks["free_bytes"] = agent.store.free_bytes()
        checks["upstreams"] = {u.name: "circuit_open" if u.breaker.is_open else "ok"
                               for u in agent.upstreams}
        if agent.peers:
            checks["peers"] = agent.peers.status()
        body = {"ready": ready, "degraded": agent.store.disk_full or any(
            u.breaker.is_open for u in agent.upstreams), "checks": checks, "time": time.time()}
        return web.Response(status=200 if ready else 503, text=json.dumps(body) + "\n",
                            content_type="application/json")

    return [web.get("/healthz", healthz), web.get("/readyz", readyz)]
