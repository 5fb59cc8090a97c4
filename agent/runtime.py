"""The running agent's parts, built once from the configuration and shared by every listener."""

import asyncio
import functools
import logging
import os
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from agent import metrics
from agent.config import Config, parse_size
from agent.flox.floxhub import FloxHub, ResolvedEnv
from agent.flox.watch import GenerationWatch
from agent.peers.tier import PeerTier
from agent.prefetch import Prefetcher, Target
from agent.store.gc import collect
from agent.store.recompress import Recompressor
from agent.store.store import Store
from agent.store.verify import Scrubber
from agent.upstream.client import Timeouts, Upstream
from agent.upstream.fetch import IO_POOL, Fetcher

log = logging.getLogger(__name__)


def kubernetes_enabled(config: Config) -> bool:
    """on: always; off: never; auto: inside a cluster or with --kubeconfig."""
    if config.kubernetes == "auto":
        return bool(config.kubeconfig or os.environ.get("KUBERNETES_SERVICE_HOST"))
    return config.kubernetes == "on"


# How long an upstream narinfo is remembered when its NAR is never asked for.
PENDING_TTL = 24 * 3600.0


class Savings:
    """What the cache saves clients: upstream bytes, and the seconds those bytes would take."""

    def __init__(self, upstreams: list[Upstream]) -> None:
        self.upstreams = upstreams

    def avoided(self, nbytes: int) -> None:
        if nbytes <= 0:
            return
        metrics.BYTES_AVOIDED.inc(nbytes)
        rate = max((u.throughput for u in self.upstreams), default=0.0)
        if rate > 0:  # only once a real upstream rate has been measured
            metrics.SECONDS_AVOIDED.inc(nbytes / rate)


@dataclass
class Agent:
    config: Config
    store: Store
    upstreams: list[Upstream]
    fetcher: Fetcher
    savings: Savings
    prefetcher: Prefetcher
    floxhub: FloxHub
    watch: GenerationWatch
    peers: PeerTier | None = None
    serving: Counter[str] = field(default_factory=Counter)  # NAR files being sent right now
    jobs: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)

    @classmethod
    def build(cls, config: Config) -> "Agent":
        store = Store(config.store, priority=config.priority)
        timeouts = Timeouts(connect=config.upstream_connect_timeout,
                            read=config.upstream_read_timeout,
                            narinfo=config.upstream_narinfo_timeout)
        upstreams = [Upstream(url, timeouts, config.circuit_failures, config.circuit_cooldown)
                     for url in config.upstreams]
        peers = PeerTier.build(config, upstreams)
        # Peers are asked before the upstreams (a peer's answer is verified the same way).
        sources = [peers.source, *upstreams] if peers else upstreams
        fetcher = Fetcher(store, sources, list(config.public_keys),
                          require_signatures=config.require_signatures,
                          signing_key=config.signing_key, negative_ttl=config.negative_ttl)
        floxhub = FloxHub(config.floxhub_git_url, store.layout.floxhub,
                          config.floxhub_token_file)
        prefetcher = Prefetcher(store, fetcher, floxhub, system=config.system,
                                concurrency=config.prefetch_concurrency)
        agent = cls(config, store, upstreams, fetcher, Savings(upstreams), prefetcher, floxhub,
                    GenerationWatch(floxhub, config.generation_watch_interval, lambda _: None))
        agent.peers = peers
        agent.watch.on_change = agent._new_generation
        prefetcher.on_resolved.append(agent._track_environment)
        agent.jobs += [agent.watch.run, agent._gc_loop]
        if config.recompress != "none":
            target = "none" if config.recompress == "uncompressed" else "zstd"
            recompressor = Recompressor(store, target, config.recompress_level,
                                        config.recompress_grace, IO_POOL)
            fetcher.on_commit.append(recompressor.submit)
            agent.jobs.append(recompressor.run)
        if config.scrub_interval > 0:
            agent.jobs.append(agent._scrub_loop)
        if kubernetes_enabled(config):
            agent.jobs.append(agent._kubernetes)
        if peers:
            agent.jobs += peers.jobs(kubernetes_enabled(config))
        return agent

    async def _kubernetes(self) -> None:
        from agent.kube import run_kubernetes

        cfg = self.config
        await run_kubernetes(self.prefetcher, node_name=cfg.node_name or "",
                             kubeconfig=str(cfg.kubeconfig) if cfg.kubeconfig else None,
                             system=cfg.system)

    async def _scrub_loop(self) -> None:
        scrubber = Scrubber(self.store, parse_size(self.config.scrub_rate))
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.config.scrub_interval)
            try:
                found = await loop.run_in_executor(IO_POOL, scrubber.scrub_once, self._busy)
            except Exception:
                log.exception("scrub failed")
                continue
            for problem in found:
                log.warning("scrub removed a damaged entry", extra={"fields": {
                    "file": problem.file, "problem": problem.detail}})

    # --- environments in use are watched for new generations ------------------------------

    def _track_environment(self, resolved: ResolvedEnv) -> None:
        if resolved.ref.generation is None:  # only unpinned refs follow the live generation
            self.watch.track(resolved.ref.owner, resolved.ref.name,
                             generation=resolved.generation)

    async def _new_generation(self, resolved: ResolvedEnv) -> None:
        ref = str(resolved.ref.unpinned)
        holders = self.store.index.holders_of(self._closure_head(ref))
        log.info("new generation, prefetching", extra={"fields": {
            "environment": ref, "generation": resolved.generation}})
        job = self.prefetcher.submit(Target.parse(ref=ref))
        job.pins.update(holders)

    def _closure_head(self, ref: str) -> tuple[str, ...]:
        env = next((e for e in self.store.index.environments() if e.ref == ref), None)
        return env.closure[:1] if env else ()

    def has_narinfo(self, hash_part: str) -> bool:
        """Whether the store holds this narinfo and its NAR (no fetch)."""
        row = self.store.narinfo(hash_part)
        return row is not None and row.committed

    # --- the size budget -------------------------------------------------------------------

    def budget(self) -> int:
        return self.config.budget_bytes(self.store.filesystem_bytes())

    def _busy(self) -> set[str]:
        return {f for f, n in self.serving.items() if n > 0} | set(self.fetcher.transfers)

    async def collect_garbage(self, *, dry_run: bool = False, force: bool = False) \
            -> dict[str, object]:
        budget = self.budget()
        metrics.STORE_BUDGET.set(budget)
        result = await asyncio.get_running_loop().run_in_executor(
            IO_POOL, functools.partial(
                collect, self.store, budget, low=self.config.gc_low_watermark,
                high=self.config.gc_high_watermark, busy=self._busy, dry_run=dry_run,
                force=force))
        return result.to_json()

    async def _gc_loop(self) -> None:
        while True:
            try:
                self.store.check_disk_recovered()
                self.store.drop_replaced(self.config.recompress_grace)
                self.store.index.forget_stale_pending(PENDING_TTL)
                await self.collect_garbage()
            except Exception:
                log.exception("eviction pass failed")
            await asyncio.sleep(self.config.gc_interval)

    def status(self) -> dict[str, object]:
        index = self.store.index
        return {
            "store": str(self.config.store), "used_bytes": index.used_bytes(),
            "budget_bytes": self.budget(), "free_bytes": self.store.free_bytes(),
            "entries": index.counts(), "pinned_bytes": index.pinned_bytes(),
            "pins": index.pin_holders(), "disk_full": self.store.disk_full,
            "upstreams": {u.name: "circuit_open" if u.breaker.is_open else "ok"
                          for u in self.upstreams},
            "peers": self.peers.status() if self.peers else {},
            "jobs_running": sum(1 for j in self.prefetcher.jobs.values() if not j.finished),
        }

    def background(self) -> list[Coroutine[Any, Any, None]]:
        """Long-running jobs of the other parts (eviction, scrub, watches), started by app.py."""
        return [job() for job in self.jobs]

    async def start(self) -> None:
        for up in self.upstreams:
            await up.start()
        if self.peers:
            await self.peers.source.start()
        metrics.STORE_BUDGET.set(self.budget())
        self.prefetcher.resume()

    async def stop(self) -> None:
        await self.fetcher.close()
        if self.peers:
            await self.peers.source.close()
        for up in self.upstreams:
            await up.close()
        self.store.close()
