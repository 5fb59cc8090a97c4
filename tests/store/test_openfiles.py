"""NAR files kept open between requests: one open per file however often it is sent, never a
deleted or replaced file's bytes, and a deleted file's space freed at once."""

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.nix.hashes import Hash
from agent.nix.narinfo import NarInfo
from agent.nix.storepath import StorePath
from agent.store import access, openfiles
from agent.store.openfiles import OpenFiles, open_files_budget
from agent.store.store import Store
from tests.store.conftest import commit


@pytest.fixture
def opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths `OpenFiles` opened on the filesystem, in order."""
    opened: list[str] = []
    open_fd = access.open_fd

    def counting(path: os.PathLike | str) -> int:
        opened.append(str(path))
        return open_fd(path)
    monkeypatch.setattr(access, "open_fd", counting)
    return opened


def _read(fd: int, size: int) -> bytes:
    try:
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


def _descriptors_of(path: Path) -> int:
    """This process's descriptors open on `path` (also once it is deleted)."""
    fds = Path("/proc/self/fd")
    links = [os.readlink(fd) for fd in fds.iterdir() if fd.is_symlink()]
    return sum(link in (str(path), f"{path} (deleted)") for link in links)


def test_a_file_is_opened_once_and_each_caller_gets_its_own_descriptor(
        tmp_path: Path, opens: list[str]) -> None:
    path = tmp_path / "a.nar"
    path.write_bytes(b"bytes of a")
    files = OpenFiles(4)
    try:
        first, size = files.open(str(path))
        second, _ = files.open(str(path))
        assert first != second and size == 10
        os.close(first)  # one caller's close leaves the other's and the kept one working
        assert _read(second, size) == b"bytes of a"
        assert _read(files.open(str(path))[0], size) == b"bytes of a"
        assert opens == [str(path)]
    finally:
        files.close()
    assert _descriptors_of(path) == 0


def test_the_least_recently_used_file_is_closed_past_the_capacity(
        tmp_path: Path, opens: list[str]) -> None:
    paths = [tmp_path / f"{n}.nar" for n in range(3)]
    for p in paths:
        p.write_bytes(p.name.encode())
    files = OpenFiles(2)
    try:
        for p in (paths[0], paths[1], paths[0], paths[2]):  # paths[1] is the oldest use
            os.close(files.open(str(p))[0])
        assert [_descriptors_of(p) for p in paths] == [1, 0, 1]
        os.close(files.open(str(paths[1]))[0])
        assert opens == [str(p) for p in (paths[0], paths[1], paths[2], paths[1])]
    finally:
        files.close()


def test_a_file_deleted_or_replaced_behind_its_back_is_never_read_from_the_old_descriptor(
        tmp_path: Path) -> None:
    path = tmp_path / "a.nar"
    path.write_bytes(b"old")
    files = OpenFiles(4)
    try:
        os.close(files.open(str(path))[0])
        replacement = tmp_path / "new"
        replacement.write_bytes(b"newer")
        replacement.rename(path)
        fd, size = files.open(str(path))
        assert _read(fd, size) == b"newer"

        path.unlink()
        with pytest.raises(FileNotFoundError):
            files.open(str(path))
        assert _descriptors_of(path) == 0
    finally:
        files.close()


def test_the_budget_is_a_share_of_a_low_open_file_limit() -> None:
    assert open_files_budget(1 << 20) == openfiles.MAX_OPEN_FILES
    assert open_files_budget(256) == 32


def _commit(store: Store, hash_part: str, packed: bytes) -> str:
    """Commit `packed` as an uncompressed NAR; its file."""
    info = NarInfo(store_path=StorePath(hash_part, "p"), url=f"nar/{hash_part}.nar",
                   compression="none", nar_hash=Hash("sha256", hashlib.sha256(packed).digest()),
                   nar_size=len(packed))
    return commit(store, info, packed).nar_file


@pytest.fixture
def small_store(tiny_tmpfs: Path) -> Iterator[Store]:
    store = Store(tiny_tmpfs / "store")
    yield store
    store.close()


def test_a_nar_the_store_removes_is_closed_and_its_space_freed_at_once(
        small_store: Store, tiny_tmpfs: Path) -> None:
    store = small_store
    file = _commit(store, "b" * 32, os.urandom(1 << 20))
    fd, size = store.open_nar(file)
    os.close(fd)  # sent: the store keeps it open
    path = Path(store.nar_file_path(file))
    assert _descriptors_of(path) == 1
    free = os.statvfs(tiny_tmpfs).f_bfree * os.statvfs(tiny_tmpfs).f_frsize

    assert store.remove_nar(file) == size
    assert _descriptors_of(path) == 0
    freed = os.statvfs(tiny_tmpfs).f_bfree * os.statvfs(tiny_tmpfs).f_frsize - free
    assert freed > size * 9 // 10  # (the index grew a little meanwhile)
    with pytest.raises(FileNotFoundError):
        store.open_nar(file)
