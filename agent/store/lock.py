"""One agent per store and per socket.

A second agent on the same store would delete the first one's in-flight temporary files in its
crash recovery, and one on the same socket path would unlink the live agent's socket. Each agent
therefore holds an exclusive flock(2) on `<store>/.lock` and on `<socket>.lock` for its whole
lifetime, taken before it touches either. The kernel releases a flock when its holder dies,
kill -9 included, so a crashed agent never blocks the next one; the holder's pid is written into
the file only to name it in the refusal.
"""

import contextlib
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from agent.config import ConfigError


class AlreadyRunning(ConfigError):
    """Another live agent holds the store or the socket (exit code 2, like any bad setting)."""


@dataclass
class InstanceLocks:
    fds: list[int]

    def release(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)  # closing the descriptor drops its flock
        self.fds.clear()


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid = os.pread(fd, 32, 0).decode().strip()
        if pid.isdigit():
            return f"pid {pid}"
    return "another process"


def _lock(path: Path, what: str) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise ConfigError(f"{what}: cannot create its lock {path}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise AlreadyRunning(f"{what} is in use by another agent ({holder}, lock {path}); "
                             "stop it first or give this one its own") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def acquire(store: Path, socket: Path) -> InstanceLocks:
    """Lock the store and the socket path for this process, or raise AlreadyRunning."""
    locks = InstanceLocks([])
    try:
        locks.fds.append(_lock(store / ".lock", f"the store {store}"))
        locks.fds.append(_lock(socket.with_name(socket.name + ".lock"), f"the socket {socket}"))
    except BaseException:
        locks.release()
        raise
    return locks
