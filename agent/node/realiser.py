"""Realise pinned closures into the node's own Nix store, so a pod start copies nothing.

One reconciliation pass makes the GC roots directory match the index's pins:
  1. plan: every holder whose pinned environments are all complete (present and verified in
     the agent's store) gets its top-level paths; a holder with a prefetch still running is
     left as it is (its current roots stay until the new closure is rooted);
  2. budget: newest holders first, until --node-realise-budget bytes of NarSize; the oldest
     lose their node roots (the agent's own store still serves them);
  3. create: `nix-store -r TOP --add-root LINK` for each top-level path not yet rooted;
  4. release: only then remove links no plan wants, and the directories of holders that no
     longer pin anything (unpinned, or orphaned while the agent was down).
Passes run at start, after every pinned prefetch that completes, after every unpin, and
periodically (sooner after a failure). A failure is a reason in `status`, a log line and a
metric; the agent's cache is not affected.
"""

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

from agent import metrics
from agent.config import Config, ConfigError, parse_budget
from agent.node.nixstore import NodeStore, NodeStoreError
from agent.node.roots import HolderRoots, RootsDir
from agent.store.store import Store

log = logging.getLogger(__name__)

IDLE_INTERVAL = 300.0   # a pass every so often even without events (roots removed by hand)
RETRY_INTERVAL = 30.0   # after a failure


@dataclass(frozen=True)
class Plan:
    holder: str
    tops: dict[str, str]        # link name -> store path
    closure: frozenset[str]     # hash parts
    since: float = 0.0


@dataclass
class Pass:
    """What one reconciliation pass found, from the index (in a worker thread)."""

    pinned: set[str]
    plans: list[Plan]
    waiting: set[str]           # holders with an incomplete closure: left as they are
    paths: dict[str, str]       # hash part -> store path, for every planned path
    sizes: dict[str, int]       # hash part -> NarSize


class NodeRealiser:
    def __init__(self, config: Config, store: Store) -> None:
        self.enabled = config.realise_into_node == "pinned"
        self.budget_text = config.node_realise_budget
        self.store = store
        self.node = NodeStore(config.nix_daemon_socket)
        self.roots = RootsDir(config.node_gcroots_dir)
        self._wake = asyncio.Event()
        self._passes = 0
        self._running = False
        self._passed = asyncio.Condition()
        self.error: NodeStoreError | None = None       # of the last pass, for status
        self._pass_error: NodeStoreError | None = None  # of the pass running now
        self.holder_state: dict[str, str] = {}   # holder -> rooted | over_budget | waiting | ...
        self.holder_errors: dict[str, str] = {}  # holder -> why its last realisation failed
        self.rooted: dict[str, frozenset[str]] = {}
        self.sizes: dict[str, int] = {}
        self.budget = 0
        self.last_pass: float | None = None

    # --- hooks (prefetch and admin call these) ----------------------------------------------

    def on_pinned_complete(self, job: object) -> None:
        self.wake()

    def on_unpinned(self, holder: str) -> None:
        self.wake()

    def wake(self) -> None:
        self._wake.set()

    # --- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        if not self.enabled:
            return
        while True:
            self._wake.clear()
            try:
                await self.reconcile()
            except Exception:  # never let the loop die; the next pass retries
                log.exception("node realisation pass crashed")
            failing = self.error or any(s.startswith("failed") for s in self.holder_state.values())
            interval = RETRY_INTERVAL if failing else IDLE_INTERVAL
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)

    async def settled(self, holder: str, timeout: float = 600.0) -> dict[str, object]:
        """Wait for a pass that started after now (bounded), then `holder`'s node status."""
        if self.enabled:
            # A pass running now may have read the index before the caller's change.
            target = self._passes + (2 if self._running else 1)
            self.wake()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout), self._passed:
                    await self._passed.wait_for(lambda: self._passes >= target)
        return self.node_status(holder)

    async def reconcile(self) -> None:
        """One pass; `status` shows its outcome once it is over."""
        self._running = True
        self._pass_error = None
        try:
            found = await self.store.run_io(self._read_index)
            await self._apply(found)
            self._publish(found)
        finally:
            self.error = self._pass_error
            async with self._passed:
                self._passes += 1
                self._running = False
                self._passed.notify_all()

    async def _apply(self, found: Pass) -> None:
        try:
            existing = await self.store.run_io(self._prepare_roots, found)
            self.budget = parse_budget(self.budget_text, _filesystem_bytes(self.roots.path))
            fit, over = _fit(found.plans, found.sizes, self.budget)
            done: set[str] = set()
            try:
                done = await self._create(fit, found, existing)
            except NodeStoreError as e:
                self._failed(e, None)
            self._release(existing, found, done, over)
        except (OSError, ConfigError) as e:
            self._failed(NodeStoreError("roots_dir", f"{self.roots.path}: {e}"), None)

    # --- the pass, step by step -------------------------------------------------------------

    def _read_index(self) -> Pass:
        pins = self.store.pins
        pinned = set(pins.holders())
        closures: dict[str, set[str]] = {}
        waiting: set[str] = set()
        for env in pins.environments():
            holders = pins.holders_of_environment(env) & pinned if env.closure else set()
            if not holders:
                continue
            complete = pins.is_complete(env)
            for h in holders:
                if complete:
                    closures.setdefault(h, set()).update(env.closure)
                else:
                    waiting.add(h)
        paths, sizes, refs = _path_info(self.store, set().union(*closures.values()))
        plans = []
        for holder, closure in closures.items():
            if holder in waiting:
                continue
            referenced = {r for h in closure for r in refs.get(h, ()) if r != h}
            tops = {os.path.basename(paths[h]): paths[h] for h in closure
                    if h not in referenced and h in paths}
            plans.append(Plan(holder, tops, frozenset(closure)))
        return Pass(pinned, plans, waiting, paths, sizes)

    def _prepare_roots(self, found: Pass) -> dict[str, HolderRoots]:
        """Every planned holder gets its directory (and its age, for the budget)."""
        self.roots.path.mkdir(parents=True, exist_ok=True)
        found.plans = [Plan(p.holder, p.tops, p.closure, self.roots.plan(p.holder))
                       for p in found.plans]
        return self.roots.holders()

    async def _create(self, fit: list[Plan], found: Pass,
                      existing: dict[str, HolderRoots]) -> set[str]:
        """Root every top-level path of `fit`; the holders now fully rooted."""
        if not fit:
            return set()
        await self.store.run_io(self.node.check)
        wanted = sorted({found.paths[h] for p in fit for h in p.closure if h in found.paths})
        invalid = await self.node.invalid(wanted)
        done = set()
        for plan in fit:
            links = existing[plan.holder].links if plan.holder in existing else {}
            rooted = all(links.get(name) == path and path not in invalid
                         for name, path in plan.tops.items())
            if not rooted and not await self._root(plan, found, invalid):
                continue
            done.add(plan.holder)
            self.holder_errors.pop(plan.holder, None)
            self.holder_state[plan.holder] = "rooted"
            self.rooted[plan.holder] = plan.closure
        return done

    async def _root(self, plan: Plan, found: Pass, invalid: set[str]) -> bool:
        copied = {found.paths[h] for h in plan.closure if found.paths.get(h) in invalid}
        for path in plan.tops.values():
            started = time.monotonic()
            try:
                await self.node.realise(path, self.roots.link(plan.holder, path))
            except NodeStoreError as e:
                if e.reason in ("socket_missing", "daemon_unreachable", "trusted_connection",
                                "nix_missing"):
                    raise  # nothing else can work either
                self._failed(e, plan.holder)
                return False
            metrics.NODE_REALISATIONS.inc()
            metrics.NODE_REALISE_DURATION.observe(time.monotonic() - started)
        invalid -= copied
        metrics.NODE_COPIED_PATHS.inc(len(copied))
        log.info("realised into the node's store", extra={"fields": {
            "holder": plan.holder, "top_paths": len(plan.tops), "paths": len(plan.closure),
            "copied_paths": len(copied)}})
        return True

    def _release(self, existing: dict[str, HolderRoots], found: Pass, done: set[str],
                 over: list[Plan]) -> None:
        """Remove the links nothing wants any more (after every creation of this pass)."""
        wanted = {p.holder: p for p in found.plans if p.holder in done}
        over_holders = {p.holder for p in over}
        for holder, entry in existing.items():
            if holder not in found.pinned:
                RootsDir.remove(entry)
                self._forget(holder)
                log.info("released node roots", extra={"fields": {"holder": holder}})
            elif holder in wanted or holder in over_holders:
                keep = wanted[holder].tops if holder in wanted else {}
                for name in [n for n in entry.links if n not in keep]:
                    RootsDir.unlink(entry, name)
        for holder in over_holders:
            self.holder_state[holder] = "over_budget"
            self.rooted.pop(holder, None)
        for holder in found.waiting:
            self.holder_state.setdefault(holder, "waiting")

    def _forget(self, holder: str) -> None:
        self.holder_state.pop(holder, None)
        self.holder_errors.pop(holder, None)
        self.rooted.pop(holder, None)

    def _failed(self, error: NodeStoreError, holder: str | None) -> None:
        metrics.NODE_REALISE_FAILURES.labels(error.reason).inc()
        if holder is None:
            self._pass_error = error
        else:
            self.holder_state[holder] = f"failed: {error.reason}"
            self.holder_errors[holder] = str(error)
        log.warning("cannot realise into the node's store", extra={"fields": {
            "reason": error.reason, "error": str(error), "holder": holder}})

    def _publish(self, found: Pass) -> None:
        for holder in [h for h in self.holder_state if h not in found.pinned]:
            self._forget(holder)
        rooted = self.rooted_paths()
        # Sizes of what is rooted only (a waiting holder keeps its earlier closure's).
        self.sizes = {h: s for h, s in {**self.sizes, **found.sizes}.items() if h in rooted}
        metrics.NODE_ROOTED_PATHS.set(len(rooted))
        metrics.NODE_ROOTED_BYTES.set(sum(self.sizes.get(h, 0) for h in rooted))
        metrics.NODE_REALISE_BUDGET.set(self.budget)
        metrics.NODE_OVER_BUDGET.set(sum(1 for s in self.holder_state.values()
                                         if s == "over_budget"))
        self.last_pass = time.time()

    # --- what it shows ----------------------------------------------------------------------

    def rooted_paths(self) -> frozenset[str]:
        return frozenset().union(*self.rooted.values())

    def _bytes(self, hashes: Iterable[str]) -> int:
        return sum(self.sizes.get(h, 0) for h in hashes)

    def status(self) -> dict[str, object]:
        if not self.enabled:
            return {"mode": "off"}
        rooted = self.rooted_paths()
        over = sorted(h for h, s in self.holder_state.items() if s == "over_budget")
        return {"mode": "pinned", "socket": str(self.node.socket),
                "roots_dir": str(self.roots.path),
                "state": "error" if self.error else ("pending" if self.last_pass is None
                                                     else "ok"),
                "reason": self.error.reason if self.error else None,
                "error": str(self.error) if self.error else None,
                "rooted_paths": len(rooted), "rooted_bytes": self._bytes(rooted),
                "budget_bytes": self.budget, "over_budget": over,
                "holders": dict(sorted(self.holder_state.items())),
                "holder_errors": dict(sorted(self.holder_errors.items())),
                "last_pass": self.last_pass}

    def node_status(self, holder: str) -> dict[str, object]:
        """For EnvironmentPrewarm's per-node status."""
        closure = self.rooted.get(holder, frozenset())
        state = self.holder_state.get(holder, "off" if not self.enabled else "pending")
        if self.error and state != "rooted":
            state = f"failed: {self.error.reason}"
        return {"realised": bool(closure), "rootedBytes": self._bytes(closure), "state": state}

    def annotate(self, environments: list[dict[str, object]]) -> list[dict[str, object]]:
        """Add `node_realised` and `node_rooted_bytes` to each of /v1/environments' entries."""
        closures = {e.ref: e.closure for e in self.store.pins.environments()}
        rooted = self.rooted_paths()
        for env in environments:
            closure = set(closures.get(str(env["ref"]), ()))
            env["node_realised"] = bool(closure) and closure <= rooted
            env["node_rooted_bytes"] = self._bytes(closure & rooted)
        return environments


def _fit(plans: list[Plan], sizes: dict[str, int], budget: int) -> tuple[list[Plan], list[Plan]]:
    """Newest holders first while the union of their closures fits in `budget`."""
    fit: list[Plan] = []
    over: list[Plan] = []
    used: set[str] = set()
    total = 0
    for plan in sorted(plans, key=lambda p: p.since, reverse=True):
        extra = sum(sizes.get(h, 0) for h in plan.closure - used)
        if total + extra <= budget:
            fit.append(plan)
            used |= plan.closure
            total += extra
        else:
            over.append(plan)
    return fit, over


def _path_info(store: Store, hashes: set[str]) \
        -> tuple[dict[str, str], dict[str, int], dict[str, tuple[str, ...]]]:
    """Store path, NarSize and references of each hash part the index knows."""
    paths: dict[str, str] = {}
    sizes: dict[str, int] = {}
    refs: dict[str, tuple[str, ...]] = {}
    for h in hashes:
        info = store.narinfo_row(h)
        if info is None:
            continue
        nar = store.nar_row(info.nar_file)
        paths[h], refs[h], sizes[h] = info.store_path, info.refs, nar.nar_size if nar else 0
    return paths, sizes, refs


def _filesystem_bytes(path: os.PathLike[str] | str) -> int:
    """Size of the filesystem holding `path`: the node's /nix when the roots live there."""
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize
