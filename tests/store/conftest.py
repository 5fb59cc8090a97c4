"""Store test helpers: a real size-limited tmpfs for the disk-full tests and a way to fill it,
the index's lock held by another thread, and a NAR committed as a Transfer commits one."""

import contextlib
import hashlib
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.nix.hashes import Hash
from agent.nix.narinfo import NarInfo
from agent.store.index import Index, NarInfoRow
from agent.store.store import Store


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 3 MB tmpfs (the suite runs as root), unmounted after the test."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], check=True,
                       capture_output=True)
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        pytest.fail(f"cannot mount a tmpfs (the suite runs as root): {e}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(mnt: Path, name: str = "filler") -> Path:
    """Fill the filesystem at `mnt` to the last byte with a file that is not the store's."""
    path = mnt / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for size in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    assert os.statvfs(mnt).f_bavail == 0
    return path


@contextlib.contextmanager
def held_by_a_worker(index: Index) -> Iterator[None]:
    """The index's lock held by another thread (a transaction, as a commit or an eviction pass
    holds it) until the block ends."""
    holding, release = threading.Event(), threading.Event()

    def worker() -> None:
        with index.transaction():
            holding.set()
            release.wait(10)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        assert holding.wait(10)
        yield
    finally:
        release.set()
        thread.join()


def commit(store: Store, info: NarInfo, packed: bytes,
           listing: bytes | None = None) -> NarInfoRow:
    """Record `info` and commit `packed` as its NAR's file, as a Transfer does: its narinfo."""
    row = store.remember(info, "http://up/")
    fd, tmp = store.new_temp()
    with open(fd, "wb") as f:
        f.write(packed)
    store.commit_nar(tmp, row.nar_file, Hash("sha256", hashlib.sha256(packed).digest()),
                     len(packed), listing=listing)
    return row
