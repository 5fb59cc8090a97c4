"""Atomic commits and crash recovery.

A NAR is written to `.tmp/` on the store's filesystem, verified, fsync'd and renamed into `nar/`;
only then is its narinfo written the same way, so a narinfo is never visible before its NAR.
After a crash, `recover` removes temporary files and anything the index does not vouch for.
"""

import logging
import os
import tempfile
from pathlib import Path

from agent.store.index import Index
from agent.store.layout import Layout, is_nar_file

log = logging.getLogger(__name__)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_temp(layout: Layout, suffix: str = "") -> tuple[int, Path]:
    """An exclusive temporary file on the store's filesystem: (fd, path)."""
    fd, name = tempfile.mkstemp(dir=layout.tmp, prefix="part-", suffix=suffix)
    return fd, Path(name)


def publish(tmp: Path, dest: Path) -> None:
    """fsync a finished temporary file and rename it into place, durably."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)
    fsync_dir(dest.parent)


def write_atomic(layout: Layout, dest: Path, data: bytes) -> None:
    fd, tmp = new_temp(layout)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        publish(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def clear_temp_files(layout: Layout) -> int:
    """Delete what an unclean stop left in `.tmp/`; returns how many."""
    leftovers = list(layout.tmp.iterdir())
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)
    if leftovers:
        log.info("temporary files removed", extra={"fields": {"files": len(leftovers)}})
    return len(leftovers)


def recover(layout: Layout, index: Index) -> dict[str, int]:
    """Bring disk and index back into agreement after an unclean stop."""
    stats = {"temp_files": clear_temp_files(layout), "adopted": 0, "orphans": 0, "dangling": 0}

    # NAR files: a file renamed into nar/ was verified before the rename, so a pending row
    # with the same size is adopted; a file the index does not know is an orphan.
    for path in layout.nar_dir.iterdir():
        name = f"nar/{path.name}"
        row = index.nar_row(name) if is_nar_file(name) else None
        size = path.stat().st_size
        if row and not row.committed and (row.file_size in (None, size)):
            index.mark_nar_committed(name, size)
            stats["adopted"] += 1
        elif not row or not row.committed:
            path.unlink()
            stats["orphans"] += 1
    for row in index.committed_nars():
        if not (layout.root / row.file).exists():
            index.remove_nar(row.file)
            stats["dangling"] += 1
    listed = {row.nar_hash.nix32 for row in index.committed_nars()}
    for path in layout.listing_dir.iterdir():
        if path.name.removesuffix(".ls") not in listed:
            path.unlink()
            stats["orphans"] += 1

    # narinfo files: visible only when their NAR is committed.
    for path in layout.root.glob("*.narinfo"):
        info = index.narinfo_row(path.name.removesuffix(".narinfo"))
        nar = index.nar_row(info.nar_file) if info else None
        if info and nar and nar.committed:
            if not info.committed:
                index.mark_narinfo_committed(info.hash)
                stats["adopted"] += 1
        else:
            path.unlink()
            stats["orphans"] += 1
    for info in index.committed_narinfos():
        path = layout.narinfo(info.hash)
        if path.exists() and path.read_text() != info.text:
            # A crash while narinfos were being repointed at a re-encoded NAR.
            write_atomic(layout, path, info.text.encode())
            stats["adopted"] += 1
        elif not path.exists():
            nar = index.nar_row(info.nar_file)
            if nar and nar.committed:
                write_atomic(layout, layout.narinfo(info.hash), info.text.encode())
            else:
                index.forget_narinfo(info.hash)
            stats["dangling"] += 1
    if any(stats.values()):
        log.info("store recovered", extra={"fields": stats})
    return stats
