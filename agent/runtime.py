"""The running agent's parts, built once from the configuration and shared by every listener."""

import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from agent import metrics
from agent.config import Config
from agent.store.store import Store
from agent.upstream.client import CircuitBreaker, Timeouts, Upstream
from agent.upstream.fetch import Fetcher

log = logging.getLogger(__name__)


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
    jobs: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)

    @classmethod
    def build(cls, config: Config) -> "Agent":
        store = Store(config.store, priority=config.priority)
        timeouts = Timeouts(connect=config.upstream_connect_timeout,
                            read=config.upstream_read_timeout,
                            narinfo=config.upstream_narinfo_timeout)
        upstreams = [
            Upstream(url, timeouts, CircuitBreaker(url, config.circuit_failures,
                                                   config.circuit_cooldown))
            for url in config.upstreams
        ]
        for up in upstreams:
            up.breaker.name = up.name
        fetcher = Fetcher(store, upstreams, list(config.public_keys),
                          require_signatures=config.require_signatures,
                          signing_key=config.signing_key, negative_ttl=config.negative_ttl)
        return cls(config, store, upstreams, fetcher, Savings(upstreams))

    def background(self) -> list[Coroutine[Any, Any, None]]:
        """Long-running jobs of the other parts (eviction, scrub, watches), started by app.py."""
        return [job() for job in self.jobs]

    async def start(self) -> None:
        for up in self.upstreams:
            await up.start()

    async def stop(self) -> None:
        await self.fetcher.close()
        for up in self.upstreams:
            await up.close()
        self.store.close()
