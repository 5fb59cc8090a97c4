"""The SQLite index on its own: pending rows, the narinfo cache, stale pending cleanup."""

import sqlite3
import time
from dataclasses import replace
from pathlib import Path

import pytest

from agent.nix.hashes import Hash
from agent.store.index import Index, NarRow, PathFields
from tests.store.conftest import held_by_a_worker


def _rows(n: int, committed: bool = False) -> tuple[NarRow, PathFields]:
    h = str(n) * 32
    file = f"nar/{str(n) * 52}.nar.xz"
    nar = NarRow(file, Hash.parse(f"sha256:{'0' * 52}"), 100, "xz", None, 50, "http://up/",
                 "nar/x", False)
    info = PathFields(h, f"/nix/store/{h}-p{n}", "NarSize: 100\n", (), committed)
    return nar, info


def _two_committed(index: Index) -> None:
    """Entries 5 then 6, committed in that order (6 is the more recent)."""
    for n in (5, 6):
        nar, info = _rows(n)
        index.put_pending(nar, info)
        index.mark_nar_committed(nar.file, 50)
        index.mark_narinfo_committed(info.hash)
        time.sleep(0.01)


def test_stale_pending_rows_are_forgotten_and_committed_ones_kept(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite")
    for n in (1, 2):
        index.put_pending(*_rows(n))
    index.mark_nar_committed(_rows(2)[0].file, 50)
    index.mark_narinfo_committed(_rows(2)[1].hash)
    time.sleep(0.05)
    assert index.forget_stale_pending(0.01) == 1
    assert index.narinfo_row(_rows(1)[1].hash) is None
    assert index.nar_row(_rows(1)[0].file) is None
    assert index.narinfo_row(_rows(2)[1].hash) is not None


def test_the_narinfo_cache_never_serves_a_removed_entry(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite")
    nar, info = _rows(3)
    index.put_pending(nar, info)
    index.mark_nar_committed(nar.file, 50)
    index.mark_narinfo_committed(info.hash)
    assert index.narinfo_row(info.hash).committed  # now cached
    index.remove_nar(nar.file)
    assert index.narinfo_row(info.hash) is None


def test_the_nar_row_cache_never_serves_a_removed_or_changed_row(tmp_path: Path) -> None:
    """A committed NAR row is answered from memory; removing it, or another process's commit
    (`verify --repair` removes rows), is seen at once or within the second."""
    index = Index(tmp_path / "index.sqlite")
    nar, info = _rows(5)
    index.put_pending(nar, info)
    assert not index.nar_row(nar.file).committed  # pending rows are not cached
    index.mark_nar_committed(nar.file, 50)
    assert index.nar_row(nar.file).committed
    assert index.nar_row(nar.file) is index.nar_row(nar.file)  # from memory, no query
    index.remove_nar(nar.file)
    assert index.nar_row(nar.file) is None

    index.put_pending(nar, info)
    index.mark_nar_committed(nar.file, 50)
    assert index.nar_row(nar.file).committed  # cached again
    other = Index(tmp_path / "index.sqlite")
    other.remove_nar(nar.file)
    index._next_check = 0.0  # the once-a-second check is due
    assert index.nar_row(nar.file) is None


def test_a_served_narinfo_takes_its_file_fields_from_its_nar(tmp_path: Path) -> None:
    """Re-encoding changes only the NAR row: every narinfo of it is served with the new
    file fields, and the path's own lines unchanged."""
    index = Index(tmp_path / "index.sqlite")
    nar, info = _rows(4)
    index.put_pending(nar, info)
    measured, reencoded = Hash("sha256", b"\x01" * 32), Hash("sha256", b"\x05" * 32)
    index.mark_nar_committed(nar.file, 50, measured)
    index.mark_narinfo_committed(info.hash)
    assert index.narinfo_row(info.hash).text == (
        f"StorePath: {info.store_path}\nURL: {nar.file}\nCompression: xz\n"
        f"FileHash: {measured}\nFileSize: 50\nNarSize: 100\n")
    new = NarRow(f"nar/{reencoded.nix32}.nar.zst", nar.nar_hash, 100, "zstd", reencoded, 40,
                 None, None, True)
    [moved] = index.replace_nar(nar.file, new)
    assert index.narinfo_row(info.hash).text == moved.text == (
        f"StorePath: {info.store_path}\nURL: {new.file}\nCompression: zstd\n"
        f"FileHash: {reencoded}\nFileSize: 40\nNarSize: 100\n")


def test_an_index_of_version_0_keeps_only_path_fields_after_migration(tmp_path: Path) -> None:
    """Stores written by 0.1 kept the whole served narinfo text: it is served the same after
    the migration."""
    from agent.store.index import SCHEMA

    path = tmp_path / "index.sqlite"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA)
    file_hash, nar_hash = Hash("sha256", b"\x02" * 32), Hash("sha256", b"\x03" * 32)
    h, file = "7" * 32, f"nar/{file_hash.nix32}.nar.xz"
    old_text = (f"StorePath: /nix/store/{h}-p\nURL: {file}\nCompression: xz\n"
                f"FileHash: {file_hash}\nFileSize: 9\nNarHash: {nar_hash}\n"
                f"NarSize: 10\nReferences: \nSig: k:abc\n")
    db.execute("INSERT INTO nars (file, nar_hash, nar_size, compression, file_hash, file_size, "
               "committed, last_access) VALUES (?, ?, 10, 'xz', ?, 9, 1, 0)",
               (file, str(nar_hash), str(file_hash)))
    db.execute("INSERT INTO narinfos (hash, store_path, nar_file, text, refs, committed, "
               "last_access) VALUES (?, ?, ?, ?, '', 1, 0)", (h, f"/nix/store/{h}-p", file,
                                                             old_text))
    db.commit()
    db.close()
    assert Index(path).narinfo_row(h).text == old_text


def test_eviction_order_needs_no_write_and_counts_unflushed_uses(tmp_path: Path) -> None:
    """On a full disk the access-time flush fails: eviction must still find its candidates,
    in the order the uses (still in memory) say."""
    index = Index(tmp_path / "index.sqlite")
    _two_committed(index)
    assert index.narinfo_row(_rows(5)[1].hash) is not None
    index.touch(hash_part=_rows(5)[1].hash)  # the older entry was just used
    index.db.execute("PRAGMA query_only = ON")  # any write now fails, as on a full disk
    assert [n.file for n in index.eviction_candidates()] == [_rows(6)[0].file, _rows(5)[0].file]


def test_uses_on_their_way_to_the_disk_still_order_eviction(tmp_path: Path) -> None:
    """A flush takes the uses in the event loop and writes them in a worker thread: in
    between, and after a failed write, eviction still counts them."""
    index = Index(tmp_path / "index.sqlite")
    _two_committed(index)
    used = _rows(5)[1].hash
    index.touch(hash_part=used)
    taken = index.take_access()
    assert taken is not None and set(taken.narinfos) == {used}
    newest_first = [_rows(6)[0].file, _rows(5)[0].file]
    assert [n.file for n in index.eviction_candidates()] == newest_first
    index.db.execute("PRAGMA query_only = ON")  # the write fails, as on a full disk
    with pytest.raises(sqlite3.OperationalError):
        index.write_access(taken)
    index.restore_access(taken)
    assert [n.file for n in index.eviction_candidates()] == newest_first
    index.db.execute("PRAGMA query_only = OFF")
    time.sleep(0.01)
    index.touch(hash_part=used)  # used again before the next flush: the newer time wins
    again = index.take_access()
    assert again is not None and again.narinfos[used] > taken.narinfos[used]
    index.write_access(again)
    assert index.take_access() is None
    assert [n.file for n in index.eviction_candidates()] == newest_first  # now from the disk


def test_a_hit_never_waits_for_a_worker_holding_the_index(tmp_path: Path) -> None:
    """The hit path's once-a-second check for other processes' changes needs the index's
    lock: while a worker thread holds it (a commit, an eviction pass), a cached hit is answered
    without the check, which runs at a later hit."""
    index = Index(tmp_path / "index.sqlite")
    _two_committed(index)
    hash_part = _rows(5)[1].hash
    assert index.narinfo_row(hash_part) is not None  # cached
    with held_by_a_worker(index):
        index._next_check = 0.0  # the check is due
        start = time.monotonic()
        assert index.narinfo_row(hash_part) is not None
        assert time.monotonic() - start < 1.0
    index._next_check = 0.0
    index.narinfo_row(hash_part)
    assert index._next_check > time.monotonic()  # the lock was free: checked


def test_an_index_of_version_1_learns_which_closures_were_walked(tmp_path: Path) -> None:
    """Environments recorded before version 2 did not say whether their closure was walked:
    they read as not walked (a restart walks them once more), read-only as well."""
    from agent.store.index import SCHEMA

    path = tmp_path / "index.sqlite"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA.replace(
        ",\n    walked INTEGER NOT NULL DEFAULT 0  -- 1: closure is the whole walked closure, "
        "not its roots", ""))
    assert "walked" not in {r[1] for r in db.execute("PRAGMA table_info(environments)")}
    db.execute("INSERT INTO environments (ref, generation, system, closure, closure_bytes, "
               "updated) VALUES ('acme/web', 3, 'x86_64-linux', '[\"a\"]', 10, 0)")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    read_only = Index(path, read_only=True)
    assert [e.walked for e in read_only.environments()] == [False]
    read_only.db.close()
    index = Index(path)
    [env] = index.environments()
    assert (env.ref, env.closure, env.walked) == ("acme/web", ("a",), False)
    index.save_environment(replace(env, walked=True))
    assert [e.walked for e in Index(path).environments()] == [True]
