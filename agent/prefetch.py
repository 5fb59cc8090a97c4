"""Closure prefetch: from roots (an environment, a lockfile, store paths) to every NAR on disk.

The closure is walked breadth-first through narinfo References with bounded concurrency, each
narinfo once, and each NAR is fetched as soon as its narinfo is known, through the same
coalesced, verified path that serves clients. Committed entries cost nothing, so a repeated or
interrupted prefetch only fetches what is missing.
"""

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace

from agent import metrics
from agent.flox.floxhub import EnvRef, FloxHub, FloxHubError, RefError, ResolvedEnv
from agent.flox.lockfile import Lockfile, LockfileError, node_system, parse_lockfile
from agent.flox.watch import holds_a_generation
from agent.nix.storepath import STORE_DIR, StorePath, StorePathError
from agent.readthrough import ReadThrough, Unavailable
from agent.store.pins import EnvironmentReport
from agent.store.store import Store

log = logging.getLogger(__name__)
PROGRESS_INTERVAL = 0.5  # seconds between updates of a running job's progress gauges


class TargetError(ValueError):
    """A prewarm request that cannot be understood (bad ref, lockfile, or store path)."""


@dataclass(frozen=True)
class Target:
    """What to prefetch. `name` identifies it in the index, pins and metrics."""

    name: str
    env: EnvRef | None = None
    lockfile: str | None = None
    store_paths: tuple[str, ...] = ()

    @classmethod
    def parse(cls, *, ref: str | None = None, lockfile: str | None = None,
              store_paths: Iterable[str] = ()) -> "Target":
        paths = tuple(store_paths)
        if sum(map(bool, (ref, lockfile, paths))) != 1:
            raise TargetError("give exactly one of: an environment ref, a lockfile, store paths")
        if ref:
            try:
                env = EnvRef.parse(ref)
            except RefError as e:
                raise TargetError(str(e)) from None
            return cls(str(env), env=env)
        if lockfile:
            try:
                ids = {p.install_id for p in parse_lockfile(lockfile).packages}
            except LockfileError as e:
                raise TargetError(f"lockfile: {e}") from None
            return cls(_name("lockfile", sorted(ids - {""}), lockfile), lockfile=lockfile)
        try:
            names = [StorePath.parse(p).name for p in sorted(paths)]
        except StorePathError as e:
            raise TargetError(str(e)) from None
        return cls(_name("paths", names, " ".join(sorted(paths))), store_paths=paths)


def _name(kind: str, names: list[str], content: str) -> str:
    """`kind:hello+curl@<digest of content>`: readable, and as unique as the content."""
    shown = "+".join(names[:3]) + (f"+{len(names) - 3}-more" if len(names) > 3 else "")
    digest = hashlib.sha256(content.encode()).hexdigest()[:16]
    return f"{kind}:{shown}@{digest}" if shown else f"{kind}:{digest}"


@dataclass
class Progress:
    paths_total: int = 0
    paths_done: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    bytes_fetched: int = 0   # from upstream by this job (0 when everything was present)
    failures: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    @property
    def rate(self) -> float:
        """Bytes per second fetched from upstream so far."""
        elapsed = time.monotonic() - self.started
        return self.bytes_fetched / elapsed if elapsed > 0 else 0.0

    def to_json(self) -> dict[str, object]:
        return {"paths_total": self.paths_total, "paths_done": self.paths_done,
                "bytes_total": self.bytes_total, "bytes_done": self.bytes_done,
                "bytes_fetched": self.bytes_fetched, "rate_bytes_per_second": round(self.rate),
                "failures": self.failures}


@dataclass
class Job:
    id: str
    target: Target
    system: str
    pins: set[str] = field(default_factory=set)
    state: str = "pending"     # pending | running | succeeded | failed
    error: str | None = None
    generation: int | None = None
    progress: Progress = field(default_factory=Progress)
    created: float = field(default_factory=time.time)
    finished: float | None = None
    _done: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    task: "asyncio.Task[None] | None" = field(default=None, repr=False)

    @property
    def ref(self) -> str:
        return self.target.name

    async def wait(self) -> None:
        await self._done.wait()

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "target": self.target.name, "system": self.system,
                "state": self.state, "error": self.error, "generation": self.generation,
                "pins": sorted(self.pins), "progress": self.progress.to_json(),
                "created": self.created, "finished": self.finished}


class Prefetcher:
    """Runs prefetch jobs; an async context manager that cancels its running jobs on exit."""

    def __init__(self, store: Store, readthrough: ReadThrough, floxhub: FloxHub | None, *,
                 system: str | None = None, concurrency: int = 8,
                 on_resolved: Callable[[ResolvedEnv], None] = lambda resolved: None,
                 on_pinned_complete: Callable[["Job"], None] = lambda job: None,
                 on_unpinned: Callable[[str], None] = lambda holder: None,
                 node_status: Callable[[str], Awaitable[dict[str, object]]] | None = None) \
            -> None:
        self.store = store
        self.readthrough = readthrough
        self.floxhub = floxhub
        self.system = system or node_system()
        self.concurrency = concurrency
        self.jobs: dict[str, Job] = {}
        self._running: dict[tuple[str, str], Job] = {}
        # Called with each environment resolved through FloxHub (the generation watch listens).
        self._on_resolved = on_resolved
        # Told of each job that succeeded with pins, and each holder unpinned (the node
        # realiser listens); node_status(holder) says where it stands in the node's store.
        self._on_pinned_complete = on_pinned_complete
        self._on_unpinned = on_unpinned
        self.node_status = node_status
        self._stopping = False

    async def __aenter__(self) -> "Prefetcher":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stopping = True
        tasks = [j.task for j in self._running.values() if j.task]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- the API used by the admin endpoints, the CLI and the Kubernetes watchers ----------

    def submit(self, target: Target, *, pin: str | None = None, system: str | None = None) \
            -> Job:
        """Start a prefetch, or join the identical one already running."""
        system = system or self.system
        running = self._running.get((target.name, system))
        if running:
            if pin:
                running.pins.add(pin)
            return running
        job = Job(uuid.uuid4().hex[:12], target, system, pins={pin} if pin else set())
        self.jobs[job.id] = job
        self._running[(target.name, system)] = job
        job.task = asyncio.ensure_future(self._run(job))
        self._forget_old_jobs()
        return job

    async def prewarm(self, ref: str, *, pin: str | None = None, system: str | None = None) \
            -> Job:
        return self.submit(Target.parse(ref=ref), pin=pin, system=system)

    def cancel(self, job: Job) -> None:
        """Stop a running job (fetches already under way finish for their other waiters)."""
        if job.task and job.state == "running":  # a pending task cancelled would never clean up
            job.task.cancel()

    def unpin(self, holder: str) -> bool:
        # A running job must not pin again for a holder that has let go meanwhile.
        for job in self._running.values():
            job.pins.discard(holder)
        removed = self.store.pins.release(holder)
        self.store.update_gauges()
        self._on_unpinned(holder)
        return removed

    def environments(self) -> list[EnvironmentReport]:
        running = {j.target.name for j in self.jobs.values() if not j.finished}
        return [replace(r, prefetching=r.ref in running) for r in self.store.pins.reports()]

    def resume(self) -> int:
        """After a restart, finish the prefetch of pinned environments that are incomplete."""
        count = 0
        pins = self.store.pins
        for env in pins.environments():
            holders = pins.holders_of_environment(env)
            if not holders or pins.is_complete(env):
                continue
            # A target with only a name walks the closure recorded for it.
            job = self.submit(Target(env.ref), system=env.system)
            job.pins.update(holders)
            count += 1
        if count:
            log.info("resuming interrupted prefetches", extra={"fields": {"count": count}})
        return count

    async def follow_generation(self, resolved: ResolvedEnv) -> None:
        """A new live generation of an environment in use: prefetch it, pinned by whoever
        pins the one before."""
        ref = str(resolved.ref.unpinned)
        env = self.store.pins.environment(ref)
        holders = {h for h in (self.store.pins.holders_of_environment(env) if env else ())
                   if not holds_a_generation(h)}  # an explicit `owner/env:N` pin stays on N
        log.info("new generation, prefetching", extra={"fields": {
            "environment": ref, "generation": resolved.generation}})
        job = self.submit(Target.parse(ref=ref))
        job.pins.update(holders)

    # --- the work --------------------------------------------------------------------------

    async def _run(self, job: Job) -> None:
        job.state = "running"
        label = job.target.name
        held_before = set(self.store.pins.holders())
        reporter = asyncio.create_task(_report_progress(job))
        try:
            full = await self._roots(job)
            roots = [StorePath.parse(r).hash_part if r.startswith("/") else r for r in full]
            # Known from the start, so a restart can resume an interrupted prefetch.
            self.store.pins.record_environment(job.target.name, job.generation, job.system,
                                               roots, walked=False)
            closure = await self._walk_and_fetch(job, roots, _paths_by_hash(full))
            self._record(job, closure, pin=not job.progress.failures)
            if job.progress.failures:
                n = len(job.progress.failures)
                first = next(iter(job.progress.failures.items()))
                raise RuntimeError(f"{n} path(s) failed, first {first[0]}: {first[1]}")
            job.state = "succeeded"
        except (FloxHubError, TargetError, LockfileError, RuntimeError) as e:
            job.state, job.error = "failed", str(e)
        except Exception as e:  # never let a job die silently
            log.exception("prefetch crashed", extra={"fields": {"job": job.id}})
            job.state, job.error = "failed", f"internal error: {type(e).__name__}"
        except asyncio.CancelledError:
            job.state, job.error = "failed", "cancelled"
            raise
        finally:
            # A failed --pin prewarm leaves no pin of its own behind; one interrupted by the
            # agent stopping keeps it, so that it resumes at the next start.
            if job.state == "failed" and not self._stopping:
                for holder in job.pins - held_before:
                    self.store.pins.release(holder)
            job.finished = time.time()
            self._running.pop((job.target.name, job.system), None)
            metrics.PREWARM_JOBS.labels(job.state).inc()
            reporter.cancel()
            _set_gauges(job)
            log.info("prefetch finished", extra={"fields": {
                "job": job.id, "target": label, "state": job.state, "error": job.error,
                **job.progress.to_json()}})
            job._done.set()
            if job.pins and job.state == "succeeded":
                self._on_pinned_complete(job)

    async def _roots(self, job: Job) -> list[str]:
        t = job.target
        if t.env:
            if self.floxhub is None:
                raise TargetError("FloxHub is not configured")
            resolved = await self.floxhub.resolve(t.env)
            job.generation = resolved.generation
            self._on_resolved(resolved)
            return _system_roots(resolved.lockfile, job.system, t.name)
        if t.lockfile:
            lock = parse_lockfile(t.lockfile)
            return _system_roots(lock, job.system, t.name)
        if t.store_paths:  # whole paths, so a failure names them
            return list(t.store_paths)
        # A resumed target: its recorded closure.
        env = self.store.pins.environment(t.name)
        return list(env.closure) if env else []

    async def _walk_and_fetch(self, job: Job, roots: list[str], paths: dict[str, str]) \
            -> list[str]:
        """`paths`: the full store paths known so far by hash part, for failure messages."""
        seen: set[str] = set(roots)
        order: list[str] = list(roots)
        queue: asyncio.Queue[str] = asyncio.Queue()
        for h in roots:
            queue.put_nowait(h)
        p = job.progress
        p.paths_total = len(roots)
        files_counted: set[str] = set()

        async def visit(h: str) -> None:
            try:
                found = await self.readthrough.narinfo(h)
            except Unavailable as e:
                p.failures[paths.get(h, h)] = f"upstream unavailable: {e}"
                return
            if found.row is None:
                p.failures[paths.get(h, h)] = found.reason
                return
            paths[h] = found.row.store_path
            paths.update(_paths_by_hash(_references(found.row.text)))
            for ref in found.row.refs:
                if ref not in seen:
                    seen.add(ref)
                    order.append(ref)
                    p.paths_total += 1
                    queue.put_nowait(ref)
            nar = self.store.nar_row(found.row.nar_file)
            size = (nar.file_size or nar.nar_size) if nar else 0
            if found.row.nar_file not in files_counted:
                files_counted.add(found.row.nar_file)
                p.bytes_total += size
            if job.pins:  # protect what is known before fetching the rest
                for holder in job.pins:
                    self.store.pins.add(holder, [h])
            try:
                fetched = await self.readthrough.fetch_nar(found.row.nar_file)
            except Exception as e:  # upstream error, verification failure, store full
                p.failures[paths[h]] = str(e) or type(e).__name__
                return
            p.bytes_fetched += fetched
            if fetched:
                metrics.PREFETCHED_PATHS.inc()
                metrics.PREFETCHED_BYTES.inc(fetched)
            p.bytes_done += size
            p.paths_done += 1

        async def worker() -> None:
            while True:
                h = await queue.get()
                try:
                    await visit(h)
                finally:
                    queue.task_done()

        workers = [asyncio.create_task(worker()) for _ in range(self.concurrency)]
        try:
            await queue.join()
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        return order

    def _record(self, job: Job, closure: list[str], *, pin: bool) -> None:
        # A failed path's references are unknown: the closure is whole only without failures.
        self.store.pins.record_environment(job.target.name, job.generation, job.system, closure,
                                           walked=not job.progress.failures)
        for holder in job.pins if pin else ():
            self.store.pins.replace(holder, closure)
        self.store.update_gauges()

    def _forget_old_jobs(self, keep: int = 500) -> None:
        finished = [j for j in self.jobs.values() if j.finished]
        forgotten = sorted(finished, key=lambda j: j.created)[:max(0, len(finished) - keep)]
        for j in forgotten:
            del self.jobs[j.id]
        # A target's gauges go with its last remembered job.
        remembered = {j.target.name for j in self.jobs.values()}
        for name in {j.target.name for j in forgotten} - remembered:
            for gauge in (metrics.PREWARM_PROGRESS, metrics.PREWARM_REMAINING):
                with contextlib.suppress(KeyError):  # never set: nothing to fetch
                    gauge.remove(name)


async def _report_progress(job: Job) -> None:
    """Keep a running job's progress gauges current, so a scrape sees them move."""
    while True:
        _set_gauges(job)
        await asyncio.sleep(PROGRESS_INTERVAL)


def _set_gauges(job: Job) -> None:
    p = job.progress
    if p.bytes_total:  # unknown until the first narinfo
        metrics.PREWARM_PROGRESS.labels(job.target.name).set(p.bytes_done / p.bytes_total)
        metrics.PREWARM_REMAINING.labels(job.target.name).set(p.bytes_total - p.bytes_done)


def _paths_by_hash(paths: Iterable[str]) -> dict[str, str]:
    return {StorePath.parse(p).hash_part: p for p in paths if p.startswith(STORE_DIR + "/")}


def _references(narinfo_text: str) -> list[str]:
    """The full store paths a narinfo's References line names."""
    for line in narinfo_text.splitlines():
        if line.startswith("References:"):
            return [f"{STORE_DIR}/{name}" for name in line.split()[1:]]
    return []


def _system_roots(lock: Lockfile, system: str, name: str) -> list[str]:
    roots = lock.roots(system)
    if not roots and lock.systems():
        raise TargetError(f"{name} has no packages for system {system} "
                          f"(it has {', '.join(sorted(lock.systems()))})")
    return roots
