"""Tasks the watchers start and must not wait for (following a prefetch job to its end)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from agent.kube.types import Job

log = logging.getLogger(__name__)


class Background:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)  # keep a reference: the loop only holds weak ones
        task.add_done_callback(self._tasks.discard)
        return task

    def follow(self, job: Job, why: str) -> None:
        """Log the job's outcome when it ends."""
        self.spawn(_follow(job, why))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _follow(job: Job, why: str) -> None:
    await job.wait()
    fields = {"ref": job.ref, "job": job.id, "why": why}
    if job.state == "failed":
        log.warning("prewarm failed: %s", job.error, extra={"fields": fields})
    else:
        log.info("prewarm %s", job.state, extra={"fields": fields})


async def start_prewarm(prewarmer: Any, background: Background, ref: str, *, why: str,
                        pin: str | None, system: str | None) -> Job | None:
    """Start a prefetch; a refusal (bad ref, agent shutting down) is logged, not raised."""
    try:
        job: Job = await prewarmer.prewarm(ref, pin=pin, system=system)
    except asyncio.CancelledError:
        raise
    except Exception as e:
        log.warning("cannot prewarm %s: %s", ref, e, extra={"fields": {"why": why}})
        return None
    background.follow(job, why)
    return job
