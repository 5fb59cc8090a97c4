"""Committed NAR files kept open between requests, as nginx's open_file_cache.

A pod start asks for each NAR of its closure once per node, but a rollout, a peer and the
node's daemon ask for the same few hundred again and again. Opening one per request costs the
open and close, and an inotify event that the direct-read watcher (store/access.py) must read
and discount: together as much as the rest of answering the request. Here the last
`capacity` files served stay open; each request gets its own duplicate of the descriptor (a
send reads with explicit offsets, so duplicates share nothing that matters) and closes it.

A kept descriptor must never outlive its file's place in the store: the store forgets it when
it deletes the file (so the disk space is freed at once), and a file deleted or replaced behind
the store's back is noticed by its link count, then opened afresh.
"""

import os
import resource
import threading
from collections import OrderedDict

from agent.store import access

# Descriptors kept open: this many, or an eighth of a lower open-file limit. The listeners leave
# them out of their connection caps (serve/listeners.py).
MAX_OPEN_FILES = 256


def open_files_budget(open_file_limit: int) -> int:
    return min(MAX_OPEN_FILES, open_file_limit // 8)


class OpenFiles:
    """Open descriptors of the store's recently sent files; thread-safe (the store deletes
    files from its worker threads)."""

    def __init__(self, capacity: int | None = None) -> None:
        self._capacity = capacity if capacity is not None else open_files_budget(
            resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        self._fds: OrderedDict[str, int] = OrderedDict()  # path -> descriptor, oldest first
        self._lock = threading.Lock()

    def open(self, path: str) -> tuple[int, int]:
        """(a descriptor of `path` the caller closes, the file's size). Raises OSError when
        the file is gone."""
        with self._lock:
            fd = self._fds.get(path)
            if fd is not None:
                self._fds.move_to_end(path)
                mine = os.dup(fd)
                stat = os.fstat(mine)
                if stat.st_nlink:
                    return mine, stat.st_size
                os.close(mine)  # deleted or replaced behind the store's back
                self._drop(path)
            fd = access.open_fd(path)
            try:
                stat = os.fstat(fd)
                mine = os.dup(fd)
            except OSError:
                os.close(fd)
                raise
            self._fds[path] = fd
            if len(self._fds) > self._capacity:
                os.close(self._fds.popitem(last=False)[1])
            return mine, stat.st_size

    def forget(self, path: str) -> None:
        """The store deletes `path`: close its kept descriptor."""
        with self._lock:
            self._drop(path)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def _drop(self, path: str) -> None:
        fd = self._fds.pop(path, None)
        if fd is not None:
            os.close(fd)
