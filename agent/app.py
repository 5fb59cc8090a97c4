"""Builds the aiohttp applications and owns the agent's lifetime.

The listeners share one Agent:
  - the Unix socket: cache protocol + health + the admin API (prewarm, pins, gc);
  - loopback TCP: cache protocol + health only (what the node's nix-daemon uses);
  - the metrics port: /metrics + health (what Prometheus and the kubelet probe);
  - with --peer-listen, the peer port: cache protocol for other nodes' agents, behind the
    shared token, answered without asking further peers (agent/peers/listener.py).
"""

import asyncio
import contextlib
import ctypes
import grp
import itertools
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import prometheus_client
from aiohttp import web

from agent import __version__, metrics
from agent.config import Config
from agent.logs import request_id
from agent.peers.listener import peer_app
from agent.runtime import Agent
from agent.serve import admin, cache, health

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _endpoint_of(resource: web.AbstractResource | None) -> str:
    path = resource.canonical if resource is not None else ""
    if path.endswith(".narinfo"):
        return "narinfo"
    if path.startswith("/nar/"):
        return "nar"
    if path.startswith("/v1/"):
        return "admin"
    return path.strip("/") or "other"


_REQUEST_IDS = itertools.count()
_ID_PREFIX = os.urandom(4).hex()


def observe(listener: str) -> Callable:
    """Request id, per-request metrics and a debug line. A narinfo hit costs ~100 us in all,
    so label lookups are cached rather than redone per request."""
    endpoints: dict[web.AbstractResource | None, str] = {}
    counters: dict[tuple[str, str, int], Any] = {}
    timers: dict[str, Any] = {}

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = request.headers.get("X-Request-Id") or f"{_ID_PREFIX}{next(_REQUEST_IDS):08x}"
        token = request_id.set(rid)
        start = time.monotonic()
        resource = request.match_info.route.resource
        endpoint = endpoints.get(resource)
        if endpoint is None:
            endpoint = endpoints[resource] = _endpoint_of(resource)
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
            elapsed = time.monotonic() - start
            key = (endpoint, request.method, code)
            counter = counters.get(key)
            if counter is None:
                counter = counters[key] = metrics.HTTP_REQUESTS.labels(
                    listener, endpoint, request.method, str(code))
            counter.inc()
            timer = timers.get(endpoint)
            if timer is None:
                timer = timers[endpoint] = metrics.HTTP_DURATION.labels(endpoint)
            timer.observe(elapsed)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("request", extra={"fields": {
                    "listener": listener, "method": request.method, "path": request.path,
                    "status": code, "ms": round(elapsed * 1000, 2)}})
            request_id.reset(token)
    return middleware


def cache_app(agent: Agent, listener: str, with_admin: bool) -> web.Application:
    middlewares = [observe(listener), *([admin.json_errors] if with_admin else [])]
    app = web.Application(middlewares=middlewares, client_max_size=admin.MAX_BODY)
    app.add_routes(cache.routes(agent) + health.routes(agent))
    if with_admin:
        app.add_routes(admin.routes(agent))
    return app


def metrics_app(agent: Agent) -> web.Application:
    async def scrape(request: web.Request) -> web.Response:
        agent.store.update_gauges()
        body = prometheus_client.generate_latest()
        return web.Response(body=body,
                            headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})

    app = web.Application(middlewares=[observe("metrics")])
    app.add_routes([web.get("/metrics", scrape), *health.routes(agent)])
    return app


def _prepare_socket(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a stale socket from a previous run


def _secure_socket(path: Path, group: str | None) -> None:
    if group:
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
    os.chmod(path, 0o660)


async def _periodic(every: float, fn: Callable[[], object], name: str) -> None:
    while True:
        await asyncio.sleep(every)
        try:
            result = fn()
            if asyncio.iscoroutine(result):
                await result
        except Exception:
            log.exception("background task failed", extra={"fields": {"task": name}})


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives every thread that allocates its own arena; with a thread per transfer that
    is tens of MB of resident memory that is never given back. A DaemonSet's memory limit is
    tight (request = limit), so keep a few arenas. No effect without glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # M_ARENA_MAX


async def serve(config: Config, ready: Callable[[], None] | None = None) -> None:
    """Run the agent until SIGTERM or SIGINT."""
    _limit_malloc_arenas()
    metrics.BUILD_INFO.info({"version": __version__})
    metrics.initialise()
    agent = Agent.build(config)
    await agent.start()
    runners: list[web.AppRunner] = []

    async def start(app: web.Application, make_site: Callable[[web.AppRunner], web.BaseSite]) \
            -> None:
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=5)
        await runner.setup()
        runners.append(runner)
        await make_site(runner).start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks: list[asyncio.Task] = []
    try:
        _prepare_socket(config.socket)
        await start(cache_app(agent, "unix", with_admin=True),
                    lambda r: web.UnixSite(r, str(config.socket)))
        _secure_socket(config.socket, config.socket_group)
        host, port = config.listen_addr
        await start(cache_app(agent, "tcp", with_admin=False), lambda r: web.TCPSite(r, host, port))
        if agent.peers and config.peer_addr:  # before /readyz: ready agents are peers
            phost, pport = config.peer_addr
            await start(peer_app(cache.routes(agent), agent.peers.token,
                                 resolve=agent.fetcher.lookup, has_narinfo=agent.has_narinfo,
                                 middlewares=[observe("peer")]),
                        lambda r: web.TCPSite(r, phost, pport))
        mhost, mport = config.metrics_addr
        await start(metrics_app(agent), lambda r: web.TCPSite(r, mhost, mport))
        tasks += [asyncio.create_task(t) for t in agent.background()]
        tasks.append(asyncio.create_task(_periodic(5, agent.store.index.flush_access, "access")))
        log.info("agent ready", extra={"fields": {
            "store": str(config.store), "socket": str(config.socket), "listen": config.listen,
            "metrics": config.metrics_listen, "upstreams": list(config.upstreams),
            "peer_listen": config.peer_listen}})
        if ready:
            ready()
        await stop.wait()
        log.info("shutting down")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for runner in runners:  # stop accepting, then give in-flight requests a moment
            await runner.cleanup()
        await agent.stop()
        with contextlib.suppress(FileNotFoundError):
            config.socket.unlink()
        for leftover in agent.store.layout.tmp.iterdir():
            leftover.unlink(missing_ok=True)
        log.info("stopped")
