"""Reads the agent does not see: the node's Nix reading committed entries straight from the store.

On a node the store directory is a `file://` substituter ahead of the agent's HTTP URL, so a
warm pod start never reaches the agent. What the agent would lose by not seeing those reads it
keeps from the filesystem: an inotify watch (IN_OPEN) on the store root (narinfos) and on
`nar/` turns every open by someone else into an access for LRU (`Store.touch_*`), a hit
(`flox_node_cache_direct_reads_total`) and a last-open time; eviction keeps files opened within
the grace period (`recently_opened`), and a narinfo's open protects its NAR too, which Nix
opens only after the narinfo (and after the path's references are valid).

Assumption: the reader opens the files on the same filesystem through the same directory (a
hostPath is the host's directory itself, so the host's nix-daemon's opens reach our watch).
inotify does not say who opened a file, so the agent's own opens (sendfile, scrub, re-encode)
go through `open_fd`/`open_binary`, which announce them first; the watcher discounts one
announced open per event of that name. Both are counted exactly; when the agent and the node
open the same file at once, which of the two events is whose does not matter. Opens by another
process of ours (`flox-node-cache verify` beside the agent) count as direct reads.

inotify via ctypes (inotify_init1 / inotify_add_watch, the fd in the event loop's add_reader):
about the size of a wrapper library's glue, and nothing to install. Without inotify (e.g.
fs.inotify.max_user_watches or max_user_instances exhausted) the agent logs it and tracks
nothing: direct reads are then neither counted nor protected beyond LRU.
"""

import asyncio
import ctypes
import errno
import logging
import os
import re
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from agent import metrics
from agent.nix.nix32 import ALPHABET

if TYPE_CHECKING:  # the store opens its files through open_fd
    from agent.store.store import Store

log = logging.getLogger(__name__)

IN_OPEN = 0x00000020
IN_Q_OVERFLOW = 0x00004000
IN_ISDIR = 0x40000000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then `len` bytes of NUL-padded name
_READ_SIZE = 64 << 10
_NARINFO = re.compile(f"([{ALPHABET}]{{32}})\\.narinfo")
# An announced own open whose event never came (a lost event queue) is forgotten after this.
OWN_OPEN_TTL = 30.0
PENDING_NAMES = 4096


class OwnOpens:
    """Opens of store files this process announces, so the watcher does not count them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, list[float]] = {}  # file name -> announce times
        self.watchers = 0  # nothing is recorded while no watcher consumes it

    def announce(self, path: os.PathLike | str) -> str | None:
        if not self.watchers:
            return None
        name = os.path.basename(path)
        now = time.monotonic()
        with self._lock:
            if len(self._pending) >= PENDING_NAMES:  # events lost (queue overflow): forget
                self._pending = {n: ts for n, ts in self._pending.items()
                                 if ts[-1] > now - OWN_OPEN_TTL}
            self._pending.setdefault(name, []).append(now)
        return name

    def withdraw(self, name: str | None) -> None:
        """The announced open failed: no event will come."""
        if name is not None:
            self.consume(name)

    def consume(self, name: str) -> bool:
        """Consume one announced open of `name` (True), or say there was none."""
        with self._lock:
            times = self._pending.get(name)
            if not times:
                return False
            fresh = [t for t in times if t > time.monotonic() - OWN_OPEN_TTL]
            taken = bool(fresh)
            if len(fresh) > 1:
                self._pending[name] = fresh[1:]
            else:
                del self._pending[name]
            return taken


OWN_OPENS = OwnOpens()


def open_fd(path: os.PathLike | str) -> int:
    """os.open(path, O_RDONLY) of a store file, announced as the agent's own."""
    name = OWN_OPENS.announce(path)
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        OWN_OPENS.withdraw(name)
        raise


def open_binary(path: os.PathLike | str) -> BinaryIO:
    """open(path, "rb") of a store file, announced as the agent's own."""
    return os.fdopen(open_fd(path), "rb")


class _Inotify:
    """The few inotify calls we need, straight from libc."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise _os_error("inotify_init1")
        self.fd = fd

    def add_watch(self, path: Path, mask: int) -> int:
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), ctypes.c_uint32(mask))
        if wd < 0:
            raise _os_error(f"inotify_add_watch {path}")
        return wd

    def read(self) -> list[tuple[int, int, str]]:
        """Pending events as (wd, mask, name); [] when there are none."""
        try:
            data = os.read(self.fd, _READ_SIZE)
        except BlockingIOError:
            return []
        events, at = [], 0
        while at + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, at)
            at += _EVENT.size
            name = data[at:at + length].rstrip(b"\0").decode(errors="replace")
            at += length
            events.append((wd, mask, name))
        return events

    def close(self) -> None:
        os.close(self.fd)


def _os_error(call: str) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{call}: {os.strerror(code)}")


class DirectReads:
    """Watches the store for opens by others; `recently_opened` is what eviction must keep."""

    def __init__(self, store: "Store", grace: float,
                 on_nar_read: Callable[[int], None] = lambda nbytes: None) -> None:
        self.store = store
        self.grace = grace
        self._on_nar_read = on_nar_read
        self._inotify: _Inotify | None = None
        self._dirs: dict[int, str] = {}  # wd -> "" (root) or "nar/"
        self._lock = threading.Lock()  # eviction asks from a worker thread
        self._last_open: dict[str, float] = {}  # NAR file -> monotonic time of last open

    def start(self) -> bool:
        """Start watching (in the running loop); False, logged, when inotify is unavailable."""
        layout = self.store.layout
        try:
            inotify = _Inotify()
        except OSError as e:
            return self._unavailable(e)
        try:
            self._dirs = {inotify.add_watch(layout.root, IN_OPEN): "",
                          inotify.add_watch(layout.nar_dir, IN_OPEN): "nar/"}
        except OSError as e:
            inotify.close()
            return self._unavailable(e)
        asyncio.get_running_loop().add_reader(inotify.fd, self._on_readable)
        self._inotify = inotify
        OWN_OPENS.watchers += 1
        metrics.DIRECT_READS_TRACKED.set(1)
        return True

    def close(self) -> None:
        if self._inotify is None:
            return
        asyncio.get_running_loop().remove_reader(self._inotify.fd)
        self._inotify.close()
        self._inotify = None
        OWN_OPENS.watchers -= 1
        metrics.DIRECT_READS_TRACKED.set(0)

    def _unavailable(self, error: OSError) -> bool:
        metrics.DIRECT_READS_TRACKED.set(0)
        hint = " (raise fs.inotify.max_user_watches / max_user_instances)" \
            if error.errno in (errno.ENOSPC, errno.EMFILE) else ""
        log.warning("direct reads of the store are not tracked: eviction may remove a file "
                    "the node's Nix has just read" + hint, extra={"fields": {
                        "error": str(error)}})
        return False

    def recently_opened(self) -> set[str]:
        """NAR files opened by others (directly, or through their narinfo) within the grace."""
        since = time.monotonic() - self.grace
        with self._lock:
            self._last_open = {f: t for f, t in self._last_open.items() if t > since}
            return set(self._last_open)

    def _on_readable(self) -> None:
        assert self._inotify is not None
        for wd, mask, name in self._inotify.read():
            if mask & IN_Q_OVERFLOW:
                log.warning("inotify queue overflowed: some direct reads were not counted")
            elif mask & IN_OPEN and not mask & IN_ISDIR and name:
                try:
                    self._opened(self._dirs.get(wd), name)
                except Exception as e:  # the index unusable: the store's health says so
                    log.warning("direct read not recorded", extra={"fields": {
                        "file": name, "error": str(e)}})

    def _opened(self, directory: str | None, name: str) -> None:
        if directory == "nar/":
            if not OWN_OPENS.consume(name):
                self._nar_opened("nar/" + name)
        elif directory == "" and (match := _NARINFO.fullmatch(name)):
            self._narinfo_opened(match.group(1))

    def _nar_opened(self, file: str) -> None:
        row = self.store.nar_row(file)
        if row is None or not row.committed:
            return
        self._remember(file)
        self.store.touch_nar(file)
        metrics.DIRECT_READS.labels("nar").inc()
        size = row.file_size or 0
        metrics.DIRECT_READ_BYTES.inc(size)
        self._on_nar_read(size)

    def _narinfo_opened(self, hash_part: str) -> None:
        row = self.store.narinfo_row(hash_part)
        if row is None or not row.committed:
            return
        self._remember(row.nar_file)  # Nix opens the NAR next, once the references are valid
        self.store.touch_narinfo(hash_part)
        metrics.DIRECT_READS.labels("narinfo").inc()

    def _remember(self, file: str) -> None:
        with self._lock:
            self._last_open[file] = time.monotonic()
