"""All periodic upkeep of the store, and the one loop runner that drives it.

Each chore runs on its own interval and fails alone: an error in one (logged, retried at its
next turn) never skips the others. Eviction is also run on demand by the admin API.
"""

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from agent import metrics
from agent.config import Config, parse_size
from agent.store.gc import GcResult, collect
from agent.store.store import Store
from agent.store.verify import Scrubber

log = logging.getLogger(__name__)
# How long an upstream narinfo is remembered when its NAR is never asked for.
PENDING_TTL = 24 * 3600.0
ACCESS_FLUSH_INTERVAL = 5.0


@dataclass(frozen=True)
class Chore:
    name: str
    every: float
    run: Callable[[], Awaitable[object]]


async def run_chores(chores: list[Chore]) -> None:
    """Run every chore at its interval until cancelled."""
    async with asyncio.TaskGroup() as tg:
        for chore in chores:
            tg.create_task(_repeat(chore))


async def _repeat(chore: Chore) -> None:
    while True:
        try:
            await chore.run()
        except Exception:
            log.exception("upkeep failed", extra={"fields": {"chore": chore.name}})
        await asyncio.sleep(chore.every)


class Upkeep:
    """Eviction under the budget, scrubbing, access-time flushes and old rows and files."""

    def __init__(self, store: Store, busy: Callable[[], set[str]], config: Config, *,
                 recently_read: Callable[[], set[str]] = set) -> None:
        self.store = store
        self.busy = busy
        self.recently_read = recently_read  # also kept by eviction (not by scrub)
        self.config = config
        self._scrubber = Scrubber(store, parse_size(config.scrub_rate))

    def budget(self) -> int:
        return self.config.budget_bytes(self.store.filesystem_bytes())

    async def collect_garbage(self, *, dry_run: bool = False, force: bool = False) -> GcResult:
        budget = self.budget()
        metrics.STORE_BUDGET.set(budget)
        cfg = self.config
        return await self.store.run_io(functools.partial(
            collect, self.store, budget, low=cfg.gc_low_watermark, high=cfg.gc_high_watermark,
            busy=lambda: self.busy() | self.recently_read(), dry_run=dry_run, force=force))

    async def scrub(self) -> None:
        for problem in await self.store.run_io(self._scrubber.scrub_once, self.busy):
            log.warning("scrub removed a damaged entry", extra={"fields": {
                "file": problem.file, "problem": problem.detail}})

    def chores(self) -> list[Chore]:
        store, cfg = self.store, self.config

        async def flush_access() -> None:
            store.flush_access()

        async def tidy() -> None:
            store.check_disk_recovered()
            store.drop_replaced(cfg.recompress_grace)
            store.forget_stale_pending(PENDING_TTL)

        async def scrub_later() -> None:
            await asyncio.sleep(cfg.scrub_interval)  # not at start: the last pass was recent
            await self.scrub()

        chores = [Chore("access", ACCESS_FLUSH_INTERVAL, flush_access),
                  Chore("tidy", cfg.gc_interval, tidy),
                  Chore("gc", cfg.gc_interval, self.collect_garbage)]
        if cfg.scrub_interval > 0:
            chores.append(Chore("scrub", 0, scrub_later))
        return chores
