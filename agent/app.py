"""The composition root: every part of the agent is built here, from the configuration, and
started and stopped here, in one exit stack (stopped in the reverse order of starting).

The listeners share the parts:
  - the Unix socket: cache protocol + health + the admin API (prewarm, pins, gc);
  - loopback TCP: cache protocol + health only (what the node's nix-daemon uses);
  - with --peer-listen, the peer port: the cache protocol for other nodes' agents, behind the
    shared token, answered without asking further peers (agent/peers/listener.py);
  - the metrics port: /metrics + health (what Prometheus and the kubelet probe).
"""

import asyncio
import contextlib
import ctypes
import functools
import gc
import grp
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import prometheus_client
from aiohttp import web

from agent import __version__, metrics
from agent.config import Config
from agent.flox.floxhub import FloxHub
from agent.flox.watch import GenerationWatch
from agent.kube import health as kube_health
from agent.node.realiser import NodeRealiser
from agent.peers.listener import peer_app
from agent.peers.tier import PeerTier
from agent.prefetch import Prefetcher
from agent.readthrough import ReadThrough
from agent.serve import admin, cache, health, listeners, observe
from agent.serve.fastpath import Hits
from agent.serve.sendfile import FileSender
from agent.store import lock
from agent.store.access import DirectReads
from agent.store.recompress import Recompressor
from agent.store.store import Store
from agent.upkeep import Upkeep, run_chores
from agent.upstream.client import Timeouts, Upstream

log = logging.getLogger(__name__)


@dataclass
class Parts:
    """The running agent's parts, as the listeners and background tasks use them."""

    config: Config
    store: Store
    upstreams: list[Upstream]
    readthrough: ReadThrough
    sender: FileSender
    prefetcher: Prefetcher
    upkeep: Upkeep
    realiser: NodeRealiser
    background: list[Callable[[], Coroutine[Any, Any, None]]]  # started by the caller
    peers: PeerTier | None = None

    def status(self) -> dict[str, object]:
        store = self.store
        return {
            "store": str(self.config.store), "used_bytes": store.used_bytes(),
            "budget_bytes": self.upkeep.budget(), "free_bytes": store.free_bytes(),
            "budget_exceeds_disk": self.upkeep.budget_exceeds_disk, "usage": store.usage(),
            "entries": store.counts(), "pinned_bytes": store.pins.pinned_bytes(),
            "pins": store.pins.holders(), "disk_full": store.disk_full,
            "upstreams": health.source_states(self.upstreams),  # type: ignore[arg-type]
            "peers": self.peers.status() if self.peers else {},
            "jobs_running": sum(1 for j in self.prefetcher.jobs.values() if not j.finished),
            "node_store": self.realiser.status(),
            "kubernetes": kube_health.status(),
        }

    def has_narinfo(self, hash_part: str) -> bool:
        """Whether the store holds this narinfo and its NAR (no fetch)."""
        row = self.store.narinfo_row(hash_part)
        return row is not None and row.committed

    def health_routes(self) -> list[web.RouteDef]:
        return health.routes(self.store, self.upstreams,  # type: ignore[arg-type]
                             self.peers.status if self.peers else None)

    def environments(self) -> list[dict[str, object]]:
        return self.realiser.annotate([e.to_json() for e in self.prefetcher.environments()])


@asynccontextmanager
async def build(config: Config) -> AsyncIterator[Parts]:
    """Build and start every part; on exit, stop them in reverse order."""
    async with AsyncExitStack() as stack:
        store = Store(config.store, priority=config.priority)
        stack.callback(store.close)
        timeouts = Timeouts(connect=config.upstream_connect_timeout,
                            read=config.upstream_read_timeout,
                            narinfo=config.upstream_narinfo_timeout)
        upstreams = [await stack.enter_async_context(
            Upstream(url, timeouts, config.circuit_failures, config.circuit_cooldown,
                     config.upstream_redirect_origin))
            for url in config.upstreams]
        # Peers are asked before the upstreams (a peer's answer is verified the same way).
        peers = PeerTier.build(config, upstreams)
        if peers:
            await peers.source.start()
            stack.push_async_callback(peers.source.close)
        background: list[Callable[[], Coroutine[Any, Any, None]]] = []
        recompressor = None
        if config.recompress != "none":
            target = "none" if config.recompress == "uncompressed" else "zstd"
            recompressor = Recompressor(store, target, config.recompress_level,
                                        config.recompress_grace)
            background.append(recompressor.run)
        readthrough = ReadThrough(
            store, [*([peers.source] if peers else []), *upstreams], list(config.public_keys),
            require_signatures=config.require_signatures, signing_key=config.signing_key,
            negative_ttl=config.negative_ttl, recompress_level=config.recompress_level,
            upstream_downloads=config.upstream_downloads,
            on_committed=recompressor.submit if recompressor else lambda file: None)
        stack.push_async_callback(readthrough.aclose)
        sender = FileSender(config.client_stall_timeout)
        stack.callback(sender.close)
        floxhub = FloxHub(config.floxhub_git_url, store.layout.floxhub,
                          config.floxhub_token_file)
        watch = GenerationWatch(floxhub, config.generation_watch_interval)
        realiser = NodeRealiser(config, store)
        prefetcher = await stack.enter_async_context(Prefetcher(
            store, readthrough, floxhub, system=config.system,
            concurrency=config.prefetch_concurrency, on_resolved=watch.follow,
            on_pinned_complete=realiser.on_pinned_complete, on_unpinned=realiser.on_unpinned,
            node_status=realiser.settled if realiser.enabled else None))
        direct_reads = DirectReads(store, config.direct_read_grace, readthrough.count_savings)
        if direct_reads.start():
            stack.callback(direct_reads.close)
        upkeep = Upkeep(store, readthrough.busy, config,
                        recently_read=direct_reads.recently_opened)
        background += [functools.partial(run_chores, upkeep.chores()),
                       functools.partial(watch.run, prefetcher.follow_generation),
                       realiser.run]
        if config.kubernetes_enabled():
            from agent.kube.agent import KubeOptions, run_kubernetes

            background.append(functools.partial(
                run_kubernetes, prefetcher, node_name=config.node_name or "",
                kubeconfig=str(config.kubeconfig) if config.kubeconfig else None,
                system=config.system,
                options=KubeOptions(warm_taint=config.warm_taint,
                                    warm_taint_timeout=config.warm_taint_timeout),
                pin_holders=store.pins.holders))
        if peers:
            background += peers.jobs(config.kubernetes_enabled())
        metrics.STORE_BUDGET.set(upkeep.budget())
        prefetcher.resume()
        yield Parts(config, store, upstreams, readthrough, sender, prefetcher, upkeep, realiser,
                    background, peers)


# --- the HTTP applications -------------------------------------------------------------------

def cache_app(parts: Parts, listener: str, with_admin: bool) -> web.Application:
    middlewares = [observe.middleware(listener), *([admin.json_errors] if with_admin else [])]
    app = web.Application(middlewares=middlewares, client_max_size=admin.MAX_BODY)
    app.add_routes(cache.routes(parts.readthrough, parts.sender, parts.store.cache_info))
    app.add_routes(parts.health_routes())
    if with_admin:
        app.add_routes(admin.routes(parts.prefetcher, parts.status, parts.environments,
                                    parts.upkeep.collect_garbage))
    return app


def metrics_app(parts: Parts) -> web.Application:
    async def scrape(request: web.Request) -> web.Response:
        parts.store.update_gauges()
        body = prometheus_client.generate_latest()
        return web.Response(body=body,
                            headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})

    app = web.Application(middlewares=[observe.middleware("metrics")])
    app.add_routes([web.get("/metrics", scrape), *parts.health_routes()])
    return app


def peers_app(parts: Parts, peers: PeerTier) -> web.Application:
    """The cache protocol for other agents: forwarded requests, never relayed further."""
    readthrough = parts.readthrough
    return peer_app(cache.routes(readthrough, parts.sender, parts.store.cache_info,
                                 forwarded=True),
                    peers.token, resolve=functools.partial(readthrough.narinfo, forwarded=True),
                    has_narinfo=parts.has_narinfo, middlewares=[observe.middleware("peer")])


# --- the process ---------------------------------------------------------------------------

def _prepare_socket(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a stale socket from a previous run


def _secure_socket(path: Path, group: str | None) -> None:
    if group:
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
    os.chmod(path, 0o660)


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives every thread that allocates its own arena; with a thread per transfer that
    is tens of MB of resident memory that is never given back. A DaemonSet's memory limit is
    tight (request = limit), so keep a few arenas. No effect without glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # M_ARENA_MAX


KEEPALIVE_OFF = 7 * 24 * 3600.0  # aiohttp has no "off": 0 would close every idle connection


async def _listen(stack: AsyncExitStack, app: web.Application,
                  make_site: Callable[[web.AppRunner], web.BaseSite]) -> None:
    # Idle connections are closed by serve/listeners.py, which also sees the requests that
    # serve/fastpath.py answers without aiohttp: aiohttp's own keep-alive deadline stays off.
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=5,
                           keepalive_timeout=KEEPALIVE_OFF)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)  # stop accepting, give requests a moment
    await make_site(runner).start()


async def _background(stack: AsyncExitStack,
                      jobs: list[Callable[[], Coroutine[Any, Any, None]]]) -> None:
    tasks = [asyncio.create_task(job()) for job in jobs]

    async def cancel() -> None:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    stack.push_async_callback(cancel)


def _freeze_startup_heap() -> None:
    """Take what startup built (modules, classes, the composed parts: ~50,000 objects) out of
    the garbage collector's reach: it lives as long as the process, and each full collection
    that walked it held the event loop for 20-30 ms, every request in flight with it."""
    gc.collect()
    gc.freeze()


async def serve(config: Config, ready: Callable[[], None] | None = None) -> None:
    """Run the agent until SIGTERM or SIGINT."""
    _limit_malloc_arenas()
    metrics.BUILD_INFO.info({"version": __version__})
    metrics.initialise()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with AsyncExitStack() as stack:
        # One agent per store and socket: the locks come before recovery touches .tmp/ or the
        # socket is replaced, and go last.
        stack.callback(lock.acquire(config.store, config.socket).release)
        limits, metrics_limits = listeners.prepare_limits(config)
        parts = await stack.enter_async_context(build(config))
        _prepare_socket(config.socket)
        stack.callback(lambda: config.socket.unlink(missing_ok=True))
        await _listen(stack, cache_app(parts, "unix", with_admin=True),
                      lambda r: listeners.unix_site(r, "unix", config.socket, limits,
                                                    Hits(parts.readthrough, parts.sender, "unix")))
        _secure_socket(config.socket, config.socket_group)
        host, port = config.listen_addr
        await _listen(stack, cache_app(parts, "tcp", with_admin=False),
                      lambda r: listeners.tcp_site(r, "tcp", host, port, limits,
                                                   Hits(parts.readthrough, parts.sender, "tcp")))
        if parts.peers and config.peer_addr:  # before /readyz: an agent that answers it is a peer
            phost, pport = config.peer_addr
            await _listen(stack, peers_app(parts, parts.peers),
                          lambda r: listeners.tcp_site(r, "peer", phost, pport,
                                                       listeners.peer_limits(limits)))
        mhost, mport = config.metrics_addr
        await _listen(stack, metrics_app(parts),
                      lambda r: listeners.tcp_site(r, "metrics", mhost, mport, metrics_limits))
        await _background(stack, parts.background)
        _freeze_startup_heap()
        log.info("agent ready", extra={"fields": {
            "store": str(config.store), "socket": str(config.socket), "listen": config.listen,
            "metrics": config.metrics_listen, "upstreams": list(config.upstreams),
            "peer_listen": config.peer_listen}})
        if ready:
            ready()
        await stop.wait()
        log.info("shutting down")
    log.info("stopped")
