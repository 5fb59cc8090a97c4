"""The store's disk space: the disk-full state, a small reserve, and what the store occupies.

A full disk must not stop the agent. SQLite needs a little room to open a WAL database (its
`-shm` and `-wal` files) and to delete rows, so the store keeps a small reserve file that it
gives up the moment a write fails for lack of space, and takes back once there is room again.
"""

import errno
import logging
import os
import sqlite3
from pathlib import Path

from agent import metrics
from agent.store.layout import Layout

log = logging.getLogger(__name__)
RESERVE_MAX = 8 << 20
RESERVE_NAME = ".reserve"
# Free space that clears the disk-full state, at most (a tenth of a small filesystem).
HEADROOM = 64 << 20
_SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_FULL = 8, 10, 13


def out_of_space(e: BaseException) -> bool:
    """Whether a failed write failed for lack of space (a full disk or quota)."""
    if isinstance(e, sqlite3.OperationalError):
        # Opening a WAL database on a full disk fails with an I/O error (its -shm file); an
        # index opened read-only for that reason refuses writes.
        return getattr(e, "sqlite_errorcode", 0) & 0xFF in (_SQLITE_FULL, _SQLITE_IOERR,
                                                             _SQLITE_READONLY)
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


class Space:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.disk_full = False
        self._wanted = 0  # bytes of the write that failed: the disk is full until they fit

    @property
    def reserve(self) -> Path:
        return self.layout.root / RESERVE_NAME

    def total_bytes(self) -> int:
        st = os.statvfs(self.layout.root)
        return st.f_blocks * st.f_frsize

    def free_bytes(self) -> int:
        st = os.statvfs(self.layout.root)
        return st.f_bavail * st.f_frsize

    def reserve_size(self) -> int:
        return min(RESERVE_MAX, self.total_bytes() // 32)

    def set_full(self, full: bool, wanted: int = 0) -> None:
        """Record a write that failed for lack of space (`wanted`: its size, if known), or one
        that succeeded. A failure also gives up the reserve, so the index can still be
        written (evictions, narinfos)."""
        if full:
            self._wanted = max(self._wanted, wanted)
            self.release_reserve()
        else:
            self._wanted = 0
        if full != self.disk_full:
            log.warning("store disk full" if full else "store disk writable again",
                        extra={"fields": {"free_bytes": self.free_bytes()}})
        self.disk_full = full
        metrics.STORE_DISK_FULL.set(int(full))

    def check_recovered(self) -> None:
        """Clear the disk-full state once what failed would fit (with some headroom); take the
        reserve back once there is room for it twice over."""
        free = self.free_bytes()
        if self.disk_full and free > self._wanted + min(HEADROOM, self.total_bytes() // 10):
            self.set_full(False)
        if not self.disk_full and free > 2 * self.reserve_size():
            self.take_reserve()

    def release_reserve(self) -> bool:
        """Free the reserve; False when there was none."""
        try:
            self.reserve.unlink()
        except FileNotFoundError:
            return False
        log.warning("store reserve released to make room", extra={"fields": {
            "bytes": self.reserve_size()}})
        return True

    def take_reserve(self) -> None:
        size = self.reserve_size()
        try:
            if self.reserve.exists() and self.reserve.stat().st_size == size:
                return
            with open(self.reserve, "wb") as f:
                os.posix_fallocate(f.fileno(), 0, size)  # real blocks, not a sparse file
        except OSError as e:  # best effort: a filesystem without fallocate has none
            self.reserve.unlink(missing_ok=True)
            log.debug("no reserve", extra={"fields": {"error": str(e)}})


def overhead_bytes(layout: Layout) -> dict[str, int]:
    """Disk used by what the store writes besides its NAR files, by kind (blocking: a walk
    of the store without nar/)."""
    out = {"index": 0, "temporary": 0, "metadata": 0, "reserve": 0}
    for entry in os.scandir(layout.root):
        if entry.name == layout.nar_dir.name:
            continue
        kind = "index" if entry.name.startswith(layout.index.name) else \
            "temporary" if entry.name == layout.tmp.name else \
            "reserve" if entry.name == RESERVE_NAME else "metadata"
        out[kind] += _disk_usage(Path(entry.path))
    return out


def _disk_usage(path: Path) -> int:
    try:
        if not path.is_dir() or path.is_symlink():
            return path.lstat().st_blocks * 512
        return sum(_disk_usage(Path(e.path)) for e in os.scandir(path))
    except FileNotFoundError:  # removed while we looked
        return 0
