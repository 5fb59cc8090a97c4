"""Eviction under a size budget: least recently used whole entries first.

Never evicted: NARs a pinned narinfo points to (pods on the node, prewarm pins), and NARs being
served or written right now. A NAR shared by several narinfos is one entry, counted and removed
once, together with every narinfo that points to it (narinfo files first).
"""

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from agent import metrics
from agent.store.store import Store

log = logging.getLogger(__name__)


@dataclass
class GcResult:
    dry_run: bool
    budget_bytes: int
    used_before: int
    used_after: int
    evicted_files: list[str] = field(default_factory=list)
    evicted_bytes: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def collect(store: Store, budget: int, *, low: float, high: float, busy: Callable[[], set[str]],
            dry_run: bool = False, force: bool = False) -> GcResult:
    """Evict down to `low` x budget once usage is above `high` x budget (or always, `force`)."""
    start = time.monotonic()
    used = store.used_bytes()
    result = GcResult(dry_run, budget, used, used)
    if used <= high * budget and not force:
        return result
    target = low * budget
    for nar in store.eviction_candidates():
        if result.used_after <= target:
            break
        if nar.file in busy():
            continue
        size = nar.file_size or 0
        result.evicted_files.append(nar.file)
        result.evicted_bytes += size
        result.used_after -= size
    if not dry_run and result.evicted_files:
        # All at once: on a full disk the files go first, and together they make room for
        # the index's own delete.
        store.remove_nars(result.evicted_files)
        metrics.EVICTIONS.labels("nar").inc(len(result.evicted_files))
        metrics.EVICTED_BYTES.inc(result.evicted_bytes)
    result.seconds = time.monotonic() - start
    if not dry_run:
        metrics.GC_DURATION.observe(result.seconds)
        store.update_gauges()
        if result.evicted_files:
            log.info("evicted", extra={"fields": {
                "entries": len(result.evicted_files), "bytes": result.evicted_bytes,
                "used": result.used_after, "budget": budget}})
    return result
