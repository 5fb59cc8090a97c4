"""A corrupt index is moved aside and rebuilt from the store's own files, never fatal.

At start `PRAGMA quick_check` looks at the index. A corrupt one (truncated, flipped bytes, a
clobbered header) is renamed `.index.sqlite.corrupt-<time>` and a new index is built from the
store's narinfo files: each NAR file is re-verified against its narinfo before the entry is
vouched for; narinfos without a good NAR, NAR files no narinfo names, and listings of NARs
not kept are removed. Pins and environments lived only in the index: they are lost, and their
holders (pods, prewarms, the Kubernetes watchers) pin again as they resync.

A marker file makes the rebuild resumable: an agent stopped half-way (a probe's patience
running out on a large store) continues where it was on its next start.
"""

import functools
import logging
import sqlite3
import time
from pathlib import Path

from agent import metrics
from agent.nix.narinfo import NarInfo, NarInfoError
from agent.nix.narinfo import parse as parse_narinfo
from agent.store.commit import write_atomic
from agent.store.index import Index, NarRow, PathFields
from agent.store.layout import Layout, is_nar_file

log = logging.getLogger(__name__)
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26


def open_index(layout: Layout, *, heal: bool) -> Index:
    """The store's index; with `heal` (the agent, not tools beside it), a corrupt index is
    replaced by one rebuilt from the store's files."""
    marker = layout.root / ".index-rebuild"
    if heal and not marker.exists():
        problem = corruption(layout.index)
        if problem is not None:
            aside = _move_aside(layout.index)
            log.error("index corrupt: moved aside, rebuilding it from the store's files; pins "
                      "and environments are lost until their holders pin again", extra={
                          "fields": {"problem": problem, "moved_to": str(aside)}})
            marker.touch()
    index = Index(layout.index)
    if heal and marker.exists():
        stats = rebuild(layout, index)
        marker.unlink()
        metrics.INDEX_REBUILDS.inc()
        log.warning("index rebuilt", extra={"fields": stats})
    return index


def corruption(path: Path) -> str | None:
    """What is wrong with the SQLite file at `path`, None if nothing (or no file). Errors other
    than corruption (a full disk) are raised."""
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(path, isolation_level=None)
        try:
            rows = db.execute("PRAGMA quick_check").fetchall()
        finally:
            db.close()
    except sqlite3.DatabaseError as e:
        if getattr(e, "sqlite_errorcode", 0) & 0xFF not in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
            raise
        return str(e)
    return None if rows == [("ok",)] else "; ".join(str(r[0]) for r in rows[:5])


def _move_aside(path: Path) -> Path:
    """Keep the corrupt index for a post-mortem (only the latest: each counts against the
    budget)."""
    for older in path.parent.glob(f"{path.name}.corrupt-*"):
        older.unlink()
    aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    for suffix in ("-wal", "-shm"):  # never replayed into the new index
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    path.rename(aside)
    return aside


def rebuild(layout: Layout, index: Index) -> dict[str, int]:
    """Vouch for every narinfo whose NAR file verifies; remove what is not vouched for."""
    from agent.store.verify import check_nar  # verify builds on the store, which builds on this

    stats = {"paths": 0, "nars": 0, "removed": 0}
    good: dict[str, NarRow | None] = {}
    for path in sorted(layout.root.glob("*.narinfo")):
        hash_part = path.name.removesuffix(".narinfo")
        if index.narinfo_row(hash_part) is not None:
            continue  # vouched for before an interruption
        info = _read_narinfo(path, hash_part)
        if info is not None and info.url not in good:
            nar = _row(layout, info)
            listing = layout.listing(info.nar_hash)
            save = None if listing.exists() else functools.partial(write_atomic, layout, listing)
            good[info.url] = nar if nar and check_nar(layout.root / nar.file, nar,
                                                       on_listing=save) is None else None
            stats["nars"] += good[info.url] is not None
        nar = good.get(info.url) if info else None
        if info is None or nar is None:
            path.unlink()
            stats["removed"] += 1
            continue
        # A committed NAR and a committed narinfo, in one transaction.
        index.put_pending(nar, PathFields(hash_part, info.store_path.path(),
                                          info.render_path_fields(),
                                          tuple(r.hash_part for r in info.references), True))
        stats["paths"] += 1
    stats["removed"] += _remove_unvouched(layout, index)
    return stats


def _read_narinfo(path: Path, hash_part: str) -> NarInfo | None:
    try:
        info = parse_narinfo(path.read_text())
    except (NarInfoError, UnicodeDecodeError, OSError):
        return None
    ok = info.hash_part == hash_part and is_nar_file(info.url)
    return info if ok else None


def _row(layout: Layout, info: NarInfo) -> NarRow | None:
    try:
        size = (layout.root / info.url).stat().st_size
    except FileNotFoundError:
        return None
    return NarRow(info.url, info.nar_hash, info.nar_size, info.compression, info.file_hash,
                  size if info.file_size is None else info.file_size, None, None, committed=True)


def _remove_unvouched(layout: Layout, index: Index) -> int:
    removed = 0
    for path in layout.nar_dir.iterdir():
        row = index.nar_row(f"nar/{path.name}")
        if row is None or not row.committed:
            path.unlink()
            removed += 1
    kept = {row.nar_hash.nix32 for row in index.committed_nars()}
    for path in layout.listing_dir.iterdir():
        if path.name.removesuffix(".ls") not in kept:
            path.unlink()
            removed += 1
    return removed
