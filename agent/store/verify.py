"""Re-hash committed NARs against what their narinfos promise; find orphans; repair.

One check serves both `flox-node-cache verify` and the agent's rate-limited background scrub.
"""

import functools
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent import metrics
from agent.nix.nar import listing_file
from agent.nix.storepath import is_hash_part
from agent.nix.verify import NarVerifier, VerificationError
from agent.store import access
from agent.store.index import NarRow
from agent.store.layout import Layout, is_nar_file
from agent.store.rebuild import corruption
from agent.store.store import Store

READ = 1 << 20


def check_nar(path: Path, nar: NarRow, throttle: Callable[[int], None] | None = None,
              on_listing: Callable[[bytes], None] | None = None) -> str | None:
    """None when the file matches its hashes and sizes; otherwise what is wrong. With
    `on_listing`, the NAR's listing is built on the way and handed over when the file is good
    (stores written before listings existed get theirs from the scrub)."""
    verifier = NarVerifier(nar.expected(), listing=on_listing is not None)
    try:
        with access.open_binary(path) as f:
            while chunk := f.read(READ):
                verifier.update(chunk)
                if throttle:
                    throttle(len(chunk))
        verifier.finish()
    except FileNotFoundError:
        return "missing"
    except VerificationError as e:
        return f"{e.reason}: {e}"
    listing = verifier.listing()
    if on_listing is not None and listing is not None:
        on_listing(listing_file(listing))
    return None


@dataclass(frozen=True)
class Problem:
    kind: str    # damaged | missing | orphan
    file: str
    detail: str


@dataclass
class Report:
    checked: int = 0
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {"checked": self.checked, "bytes": self.bytes,
                "problems": [p.__dict__ for p in self.problems], "ok": not self.problems}


def verify_store(root: Path, *, repair: bool = False, progress: bool = False) -> Report:
    """Raises sqlite3.DatabaseError when the index itself is corrupt (the agent rebuilds it)."""
    problem = corruption(Layout(root).index)
    if problem is not None:
        raise sqlite3.DatabaseError(problem)
    store = Store(root, recover_on_open=False)
    try:
        return _verify(store, repair, progress)
    finally:
        store.close()


def _verify(store: Store, repair: bool, progress: bool) -> Report:
    from rich.progress import Progress

    report = Report()
    nars = store.committed_nars()
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("verifying", total=sum(n.file_size or 0 for n in nars))
        for nar in nars:
            problem = check_nar(store.layout.root / nar.file, nar)
            report.checked += 1
            report.bytes += nar.file_size or 0
            bar.advance(task, nar.file_size or 0)
            if problem:
                kind = "missing" if problem == "missing" else "damaged"
                report.problems.append(Problem(kind, nar.file, problem))
                if repair:
                    store.remove_nar(nar.file)
    for problem in _orphans(store):
        report.problems.append(problem)
        if repair:
            (store.layout.root / problem.file).unlink(missing_ok=True)
    if repair:
        store.update_gauges()
    return report


def _orphans(store: Store) -> list[Problem]:
    """Files no committed index entry accounts for (never served: the index decides)."""
    out = []
    for path in sorted(store.layout.nar_dir.iterdir()):
        name = f"nar/{path.name}"
        row = store.nar_row(name) if is_nar_file(name) else None
        if not row or not row.committed:
            out.append(Problem("orphan", name, "NAR file not in the index"))
    for path in sorted(store.layout.root.glob("*.narinfo")):
        hash_part = path.name.removesuffix(".narinfo")
        info = store.narinfo_row(hash_part) if is_hash_part(hash_part) else None
        if not info or not info.committed:
            out.append(Problem("orphan", path.name, "narinfo not in the index"))
    return out


class Scrubber:
    """Background re-hash of the store at a bounded rate; damaged entries are removed so the
    next request fetches them again."""

    def __init__(self, store: Store, rate: int) -> None:
        self.store = store
        self.rate = rate
        self._window_start = time.monotonic()
        self._window_bytes = 0

    def _throttle(self, n: int) -> None:
        metrics.SCRUBBED_BYTES.inc(n)
        self._window_bytes += n
        expected = self._window_bytes / self.rate
        elapsed = time.monotonic() - self._window_start
        if expected > elapsed:
            time.sleep(expected - elapsed)

    def scrub_once(self, busy: Callable[[], set[str]]) -> list[Problem]:
        """One pass over every committed NAR (runs in a worker thread)."""
        found = []
        self._window_start, self._window_bytes = time.monotonic(), 0
        for nar in self.store.committed_nars():
            if nar.file in busy():
                continue
            save = None if self.store.has_listing(nar.nar_hash) else \
                functools.partial(self.store.save_listing, nar.nar_hash)
            problem = check_nar(self.store.layout.root / nar.file, nar, self._throttle, save)
            if problem and nar.file not in busy():
                metrics.VERIFY_FAILURES.labels("scrub").inc()
                self.store.remove_nar(nar.file)
                found.append(Problem("damaged", nar.file, problem))
        return found
