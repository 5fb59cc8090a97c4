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
from agent.store.space import out_of_space
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
        except Exception as e:
            if out_of_space(e):  # expected on a full disk: retried at the next turn
                log.warning("upkeep postponed: disk full", extra={"fields": {
                    "chore": chore.name, "error": str(e)}})
            else:
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
        self._warned = False
        self.budget_exceeds_disk = False

    def budget(self) -> int:
        """The configured budget; a warning when it is more than the disk can hold (the disk
        would fill up before eviction starts)."""
        budget = self.config.budget_bytes(self.store.filesystem_bytes())
        self.budget_exceeds_disk = budget > self.store.used_bytes() + self.store.free_bytes()
        if self.budget_exceeds_disk and not self._warned:
            log.warning("store budget is more than the disk can hold: the disk fills before "
                        "eviction starts; lower --store-budget", extra={"fields": {
                            "budget": budget, "used": self.store.used_bytes(),
                            "free": self.store.free_bytes()}})
        self._warned = self.budget_exceeds_disk
        return budget

    async def collect_garbage(self, *, dry_run: bool = False, force: bool = False) -> GcResult:
        await self.store.run_io(self.store.measure_overhead)
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

        async def disk() -> None:
            await store.run_io(store.check_disk_recovered)

        async def drop_replaced() -> None:
            store.drop_replaced(cfg.recompress_grace)

        async def forget_pending() -> None:
            store.forget_stale_pending(PENDING_TTL)

        async def scrub_later() -> None:
            await asyncio.sleep(cfg.scrub_interval)  # not at start: the last pass was recent
            await self.scrub()

        # Separate chores: one that fails (a full disk) never skips the others.
        chores = [Chore("access", ACCESS_FLUSH_INTERVAL, store.flush_access),
                  Chore("disk", cfg.gc_interval, disk),
                  Chore("drop_replaced", cfg.gc_interval, drop_replaced),
                  Chore("forget_pending", cfg.gc_interval, forget_pending),
                  Chore("gc", cfg.gc_interval, self.collect_garbage)]
        if cfg.scrub_interval > 0:
            chores.append(Chore("scrub", 0, scrub_later))
        return chores
