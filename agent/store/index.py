"""SQLite index of the store: entries, sizes, last access, references, pins, environments.

The index is the only place that decides what is committed. A NAR row (`nars`) exists once per
file, however many narinfos point to it, so its size is counted once. A row with committed=0 is
known from an upstream narinfo but not on disk yet (the NAR will be fetched on first request).
"""

import contextlib
import functools
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from agent.nix.hashes import Hash
from agent.nix.narinfo import file_fields
from agent.nix.verify import Expected

CACHE_ENTRIES = 50_000  # ~25 MB of narinfo text at most
SCHEMA = """
CREATE TABLE IF NOT EXISTS nars (
    file TEXT PRIMARY KEY,          -- nar/<hash>.nar<ext>, relative to the store root
    nar_hash TEXT NOT NULL,
    nar_size INTEGER NOT NULL,
    compression TEXT NOT NULL,
    file_hash TEXT,
    file_size INTEGER,
    upstream TEXT,                  -- where to fetch it while not committed
    upstream_url TEXT,
    committed INTEGER NOT NULL DEFAULT 0,
    last_access REAL NOT NULL,
    replaced_by TEXT,               -- re-encoded as this file; kept a while for old narinfos
    replaced_at REAL
);
CREATE INDEX IF NOT EXISTS nars_by_hash ON nars (nar_hash, committed);
CREATE TABLE IF NOT EXISTS narinfos (
    hash TEXT PRIMARY KEY,          -- store path hash part
    store_path TEXT NOT NULL,
    nar_file TEXT NOT NULL REFERENCES nars (file),
    text TEXT NOT NULL,             -- the narinfo without its file fields (from `nars`)
    refs TEXT NOT NULL,             -- space-separated hash parts of References
    committed INTEGER NOT NULL DEFAULT 0,
    last_access REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS narinfos_by_nar ON narinfos (nar_file);
CREATE TABLE IF NOT EXISTS pins (
    holder TEXT NOT NULL,           -- who keeps these paths: "env:owner/env", "pod:...", ...
    hash TEXT NOT NULL,
    PRIMARY KEY (holder, hash)
);
CREATE INDEX IF NOT EXISTS pins_by_hash ON pins (hash);
CREATE TABLE IF NOT EXISTS environments (
    ref TEXT PRIMARY KEY,           -- owner/env[:N], lockfile:<sha>, paths:<sha>
    generation INTEGER,
    system TEXT,
    closure TEXT NOT NULL,          -- JSON list of hash parts
    closure_bytes INTEGER NOT NULL,
    updated REAL NOT NULL,
    walked INTEGER NOT NULL DEFAULT 0  -- 1: closure is the whole walked closure, not its roots
);
"""


@dataclass(frozen=True)
class NarRow:
    file: str
    nar_hash: Hash
    nar_size: int
    compression: str
    file_hash: Hash | None
    file_size: int | None
    source: str | None      # the URL of the source that serves it, while not committed
    source_url: str | None  # its URL there
    committed: bool

    def expected(self) -> Expected:
        return Expected(self.compression, self.nar_hash, self.nar_size, self.file_hash,
                        self.file_size)


@dataclass(frozen=True)
class NarInfoRow:
    hash: str
    store_path: str
    nar_file: str
    text: str               # as served: the NAR's file fields, then the path's own fields
    refs: tuple[str, ...]
    committed: bool


@dataclass(frozen=True)
class EnvironmentRow:
    ref: str
    generation: int | None
    system: str | None
    closure: tuple[str, ...]
    closure_bytes: int
    updated: float
    walked: bool  # closure is the whole closure (a finished walk), not only its roots


@dataclass(frozen=True)
class Access:
    """Last uses not yet written: NAR file or narinfo hash part -> time."""

    nars: dict[str, float]
    narinfos: dict[str, float]


def _locked(method):  # type: ignore[no-untyped-def]
    """Serialise access: the event loop and the commit worker threads share one connection."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        with self._lock:
            return method(self, *args, **kwargs)
    return wrapper


class Index:
    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        """read_only: a last resort when a full disk leaves no room for SQLite's -shm file;
        the main file is read as it is (what only its WAL holds is not seen) and every write
        fails as if the disk were full."""
        self.path = path
        self._lock = threading.RLock()
        if read_only:
            self.db = sqlite3.connect(f"{path.resolve().as_uri()}?immutable=1", uri=True,
                                      isolation_level=None, check_same_thread=False)
        else:
            self.db = sqlite3.connect(path, isolation_level=None, timeout=30,
                                      check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=OFF")
            self.db.executescript(SCHEMA)
            _migrate(self.db)
        # A store opened read-only before its migration to version 2 has no walked column.
        columns = {r[1] for r in self.db.execute("PRAGMA table_info(environments)")}
        self._walked = "walked" if "walked" in columns else "0"
        # Committed narinfos by hash and committed NARs by file: a hit is served without a
        # query (a NAR row costs ~40 us to read and parse). Every method that rewrites or
        # removes a committed row drops its entry.
        self._cache: dict[str, NarInfoRow] = {}
        self._nar_cache: dict[str, NarRow] = {}
        self._data_version = self.db.execute("PRAGMA data_version").fetchone()[0]
        self._next_check = 0.0
        # Last-access updates are batched: a hit must not cost a write transaction.
        self._touched_nars: dict[str, float] = {}
        self._touched_narinfos: dict[str, float] = {}
        self._writing: Access | None = None  # taken, not yet written: still counts

    @_locked
    def close(self) -> None:
        taken = self.take_access()
        if taken is not None:
            with contextlib.suppress(sqlite3.OperationalError):  # a full disk: the times are lost
                self.write_access(taken)
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
                self.db.execute("COMMIT")
            except BaseException:
                # Also after a failed COMMIT (a full disk), which leaves the transaction open.
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise

    # --- narinfos and NARs -----------------------------------------------------------------

    def narinfo_row(self, hash_part: str) -> NarInfoRow | None:
        if time.monotonic() > self._next_check:
            self._drop_cache_if_changed_elsewhere()
        cached = self._cache.get(hash_part)
        return cached if cached is not None else self._narinfo(hash_part)

    def _drop_cache_if_changed_elsewhere(self) -> None:
        """Another process (`flox-node-cache verify --repair`) may have removed entries: SQLite's
        data_version changes only for commits of other connections. Checked once a second, by
        the hit path: when a worker thread holds the index (a commit, an eviction pass), the
        check waits for the next hit rather than hold the event loop."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            self._next_check = time.monotonic() + 1.0
            version = self.db.execute("PRAGMA data_version").fetchone()[0]
            if version != self._data_version:
                self._data_version = version
                self._cache.clear()
                self._nar_cache.clear()
        finally:
            self._lock.release()

    @_locked
    def _narinfo(self, hash_part: str) -> NarInfoRow | None:
        row = self.db.execute(f"{_NARINFO_SELECT} WHERE i.hash = ?", (hash_part,)).fetchone()
        if not row:
            return None
        info = _narinfo_row(row)
        if info.committed:
            if len(self._cache) >= CACHE_ENTRIES:
                self._cache.clear()
            self._cache[hash_part] = info
        return info

    def _uncache(self, hashes: Iterable[str]) -> None:
        for h in hashes:
            self._cache.pop(h, None)

    def nar_row(self, file: str) -> NarRow | None:
        if time.monotonic() > self._next_check:
            self._drop_cache_if_changed_elsewhere()
        cached = self._nar_cache.get(file)
        return cached if cached is not None else self._nar(file)

    @_locked
    def _nar(self, file: str) -> NarRow | None:
        row = self.db.execute(f"SELECT {_NAR_COLS} FROM nars WHERE file = ?", (file,)).fetchone()
        if not row:
            return None
        nar = _nar_row(row)
        if nar.committed:
            if len(self._nar_cache) >= CACHE_ENTRIES:
                self._nar_cache.clear()
            self._nar_cache[file] = nar
        return nar

    @_locked
    def committed_nar_with_hash(self, nar_hash: Hash) -> NarRow | None:
        row = self.db.execute(f"SELECT {_NAR_COLS} FROM nars WHERE nar_hash = ? AND committed = 1 "
                              "ORDER BY replaced_by IS NULL DESC", (str(nar_hash),)).fetchone()
        return _nar_row(row) if row else None

    @_locked
    def has_nar_hash(self, nar_hash: Hash) -> bool:
        """Whether any committed NAR file (in any encoding) holds this NAR."""
        return self.db.execute("SELECT 1 FROM nars WHERE nar_hash = ? AND committed = 1",
                               (str(nar_hash),)).fetchone() is not None

    @_locked
    def replace_nar(self, old: str, new: NarRow) -> list[NarInfoRow]:
        """Point every narinfo of `old` at the re-encoded `new`; keep `old` for a grace period.
        Returns the repointed narinfos."""
        now = time.time()
        with self.transaction() as db:
            db.execute(f"INSERT OR REPLACE INTO nars ({_NAR_COLS}, last_access) "
                       "VALUES (?,?,?,?,?,?,?,?,?,?)", (*_nar_values(new), now))
            db.execute("UPDATE narinfos SET nar_file = ? WHERE nar_file = ?", (new.file, old))
            db.execute("UPDATE nars SET replaced_by = ?, replaced_at = ? WHERE file = ?",
                       (new.file, now, old))
        self._nar_cache.pop(new.file, None)
        infos = self.narinfos_for_nar(new.file)
        self._uncache(i.hash for i in infos)
        return infos

    @_locked
    def replaced_before(self, cutoff: float) -> list[str]:
        return [r[0] for r in self.db.execute(
            "SELECT file FROM nars WHERE replaced_by IS NOT NULL AND replaced_at < ?", (cutoff,))]

    @_locked
    def put_pending(self, nar: NarRow, info: "PathFields") -> None:
        """Remember an upstream narinfo whose NAR is not on disk yet (or points at a committed
        NAR: it is then committed by the caller once its file is written)."""
        now = time.time()
        with self.transaction() as db:
            db.execute(
                f"INSERT INTO nars ({_NAR_COLS}, last_access) VALUES (?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT (file) DO UPDATE SET upstream = excluded.upstream, "
                "upstream_url = excluded.upstream_url WHERE committed = 0",
                (*_nar_values(nar), now))
            db.execute(
                "INSERT INTO narinfos (hash, store_path, nar_file, text, refs, committed, "
                "last_access) VALUES (?,?,?,?,?,?,?) ON CONFLICT (hash) DO UPDATE SET "
                "store_path = excluded.store_path, nar_file = excluded.nar_file, "
                "text = excluded.text, refs = excluded.refs, committed = excluded.committed "
                "WHERE narinfos.committed = 0",
                (info.hash, info.store_path, nar.file, info.text, " ".join(info.refs),
                 int(info.committed), now))

    @_locked
    def mark_nar_committed(self, file: str, file_size: int, file_hash: Hash | None = None) \
            -> None:
        """file_hash: the measured hash, for NARs whose upstream narinfo had no FileHash."""
        self._nar_cache.pop(file, None)
        self.db.execute("UPDATE nars SET committed = 1, file_size = ?, "
                        "file_hash = COALESCE(file_hash, ?), last_access = ? WHERE file = ?",
                        (file_size, str(file_hash) if file_hash else None, time.time(), file))

    @_locked
    def mark_narinfos_committed(self, nar_file: str) -> list[NarInfoRow]:
        """Every narinfo of a committed NAR becomes visible; returns them."""
        self.db.execute("UPDATE narinfos SET committed = 1 WHERE nar_file = ?", (nar_file,))
        return self.narinfos_for_nar(nar_file)

    @_locked
    def mark_narinfo_committed(self, hash_part: str) -> None:
        self.db.execute("UPDATE narinfos SET committed = 1 WHERE hash = ?", (hash_part,))

    @_locked
    def forget_narinfo(self, hash_part: str) -> None:
        self._uncache([hash_part])
        self.db.execute("DELETE FROM narinfos WHERE hash = ?", (hash_part,))

    @_locked
    def forget_pending_nar(self, file: str) -> list[str]:
        """Drop an uncommitted NAR and the narinfos pointing at it; returns their hashes."""
        with self.transaction() as db:
            hashes = [r[0] for r in db.execute(
                "SELECT hash FROM narinfos WHERE nar_file = ? AND committed = 0", (file,))]
            db.execute("DELETE FROM narinfos WHERE nar_file = ? AND committed = 0", (file,))
            db.execute("DELETE FROM nars WHERE file = ? AND committed = 0", (file,))
        return hashes

    @_locked
    def forget_stale_pending(self, older_than: float) -> int:
        """Drop upstream narinfos whose NAR nobody fetched for a long time (clients query many
        paths they already have)."""
        cutoff = time.time() - older_than
        with self.transaction() as db:
            n = db.execute("DELETE FROM narinfos WHERE committed = 0 AND last_access < ?",
                           (cutoff,)).rowcount
            db.execute("DELETE FROM nars WHERE committed = 0 AND last_access < ? AND NOT EXISTS "
                       "(SELECT 1 FROM narinfos i WHERE i.nar_file = nars.file)", (cutoff,))
        return n

    @_locked
    def narinfos_for_nar(self, file: str) -> list[NarInfoRow]:
        rows = self.db.execute(f"{_NARINFO_SELECT} WHERE i.nar_file = ?", (file,))
        return [_narinfo_row(r) for r in rows]

    @_locked
    def committed_narinfos(self) -> list[NarInfoRow]:
        rows = self.db.execute(f"{_NARINFO_SELECT} WHERE i.committed = 1")
        return [_narinfo_row(r) for r in rows]

    @_locked
    def committed_nars(self) -> list[NarRow]:
        rows = self.db.execute(f"SELECT {_NAR_COLS} FROM nars WHERE committed = 1")
        return [_nar_row(r) for r in rows]

    @_locked
    def remove_nar(self, file: str) -> list[str]:
        """Remove a NAR and every narinfo that points to it; returns the narinfo hashes."""
        return self.remove_nars([file])

    @_locked
    def remove_nars(self, files: Iterable[str]) -> list[str]:
        """remove_nar for several NARs, in one transaction."""
        hashes: list[str] = []
        with self.transaction() as db:
            for file in files:
                hashes += [r[0] for r in db.execute(
                    "SELECT hash FROM narinfos WHERE nar_file = ?", (file,))]
                db.execute("DELETE FROM narinfos WHERE nar_file = ?", (file,))
                db.execute("DELETE FROM nars WHERE file = ?", (file,))
                self._nar_cache.pop(file, None)
        self._uncache(hashes)
        return hashes

    # --- access times ----------------------------------------------------------------------

    def touch(self, hash_part: str | None = None, nar_file: str | None = None) -> None:
        now = time.time()
        if hash_part:
            self._touched_narinfos[hash_part] = now
        if nar_file:
            self._touched_nars[nar_file] = now

    def take_access(self) -> Access | None:
        """The uses recorded since the last take, to write with `write_access` (in the thread
        of the caller of `touch`, the event loop: only it changes the batches)."""
        if not (self._touched_nars or self._touched_narinfos):
            return None
        taken = self._writing = Access(self._touched_nars, self._touched_narinfos)
        self._touched_nars, self._touched_narinfos = {}, {}
        return taken

    def restore_access(self, taken: Access) -> None:
        """Give back uses that could not be written (a full disk), to be written next time;
        uses recorded since win."""
        self._touched_nars = {**taken.nars, **self._touched_nars}
        self._touched_narinfos = {**taken.narinfos, **self._touched_narinfos}
        self._writing = None

    @_locked
    def write_access(self, taken: Access) -> None:
        with self.transaction() as db:
            db.executemany("UPDATE nars SET last_access = ? WHERE file = ?",
                           [(t, f) for f, t in taken.nars.items()])
            db.executemany("UPDATE narinfos SET last_access = ? WHERE hash = ?",
                           [(t, h) for h, t in taken.narinfos.items()])
        self._writing = None

    def _unwritten(self) -> Access:
        """Uses not yet in the index: those being written, then newer ones. (Copies, each one
        step under the GIL: the event loop adds uses meanwhile.)"""
        nars, narinfos = dict(self._touched_nars), dict(self._touched_narinfos)
        if (writing := self._writing) is not None:
            nars, narinfos = {**writing.nars, **nars}, {**writing.narinfos, **narinfos}
        return Access(nars, narinfos)

    # --- totals ----------------------------------------------------------------------------

    @_locked
    def used_bytes(self) -> int:
        return self.db.execute("SELECT COALESCE(SUM(file_size), 0) FROM nars "
                               "WHERE committed = 1").fetchone()[0]

    @_locked
    def replaced_bytes(self) -> tuple[int, float | None]:
        """Bytes of old encodings kept for their grace period, and when the oldest was
        replaced (None if there is none)."""
        return self.db.execute("SELECT COALESCE(SUM(file_size), 0), MIN(replaced_at) FROM nars "
                               "WHERE committed = 1 AND replaced_by IS NOT NULL").fetchone()

    @_locked
    def counts(self) -> dict[str, int]:
        nars = self.db.execute("SELECT COUNT(*) FROM nars WHERE committed = 1").fetchone()[0]
        infos = self.db.execute("SELECT COUNT(*) FROM narinfos WHERE committed = 1").fetchone()[0]
        return {"nar": nars, "narinfo": infos}

    @_locked
    def present(self, hashes: Iterable[str]) -> set[str]:
        """The hashes among `hashes` whose narinfo and NAR are committed."""
        wanted = list(hashes)
        found: set[str] = set()
        for i in range(0, len(wanted), 500):
            part = wanted[i:i + 500]
            found.update(r[0] for r in self.db.execute(
                f"SELECT hash FROM narinfos WHERE committed = 1 AND hash IN "
                f"({','.join('?' * len(part))})", part))
        return found

    @_locked
    def closure_bytes(self, hashes: Iterable[str]) -> tuple[int, int]:
        """(bytes of the distinct NAR files, bytes of those committed) for these paths."""
        wanted = list(hashes)
        files: dict[str, tuple[int, bool]] = {}
        for i in range(0, len(wanted), 500):
            part = wanted[i:i + 500]
            for file, size, committed in self.db.execute(
                    "SELECT n.file, COALESCE(n.file_size, n.nar_size), n.committed FROM narinfos i "
                    f"JOIN nars n ON n.file = i.nar_file WHERE i.hash IN "
                    f"({','.join('?' * len(part))})", part):
                files[file] = (size, bool(committed))
        total = sum(s for s, _ in files.values())
        return total, sum(s for s, c in files.values() if c)

    # --- pins ------------------------------------------------------------------------------

    @_locked
    def pin(self, holder: str, hashes: Iterable[str]) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM pins WHERE holder = ?", (holder,))
            db.executemany("INSERT OR IGNORE INTO pins (holder, hash) VALUES (?, ?)",
                           [(holder, h) for h in hashes])

    @_locked
    def pin_add(self, holder: str, hashes: Iterable[str]) -> None:
        self.db.executemany("INSERT OR IGNORE INTO pins (holder, hash) VALUES (?, ?)",
                            [(holder, h) for h in hashes])

    @_locked
    def holders_of(self, hashes: Iterable[str]) -> set[str]:
        wanted = list(hashes)
        return {r[0] for r in self.db.execute(
            f"SELECT DISTINCT holder FROM pins WHERE hash IN ({','.join('?' * len(wanted))})",
            wanted)}

    @_locked
    def unpin(self, holder: str) -> bool:
        return self.db.execute("DELETE FROM pins WHERE holder = ?", (holder,)).rowcount > 0

    @_locked
    def pin_holders(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT holder, COUNT(*) FROM pins GROUP BY holder"))

    @_locked
    def pinned_bytes(self) -> int:
        return self.db.execute(
            "SELECT COALESCE(SUM(file_size), 0) FROM nars WHERE committed = 1 AND file IN "
            "(SELECT i.nar_file FROM narinfos i JOIN pins p ON p.hash = i.hash)").fetchone()[0]

    # --- environments ----------------------------------------------------------------------

    @_locked
    def save_environment(self, env: EnvironmentRow) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO environments (ref, generation, system, closure, "
            "closure_bytes, updated, walked) VALUES (?,?,?,?,?,?,?)",
            (env.ref, env.generation, env.system, json.dumps(list(env.closure)),
             env.closure_bytes, env.updated, int(env.walked)))

    @_locked
    def environments(self) -> list[EnvironmentRow]:
        return [EnvironmentRow(r[0], r[1], r[2], tuple(json.loads(r[3])), r[4], r[5], bool(r[6]))
                for r in self.db.execute("SELECT ref, generation, system, closure, closure_bytes, "
                                         f"updated, {self._walked} FROM environments "
                                         "ORDER BY ref")]

    # --- eviction --------------------------------------------------------------------------

    @_locked
    def eviction_candidates(self) -> list[NarRow]:
        """Committed NARs, least recently used first, that no pinned narinfo points to.

        Uses not yet flushed count too, so eviction never needs a write before it can
        delete (on a full disk that write would fail)."""
        rows = self.db.execute(
            f"SELECT {_NAR_COLS}, MAX(n.last_access, COALESCE((SELECT MAX(i.last_access) "
            "FROM narinfos i WHERE i.nar_file = n.file), 0)) FROM nars n WHERE committed = 1 "
            "AND NOT EXISTS (SELECT 1 FROM narinfos i JOIN pins p ON p.hash = i.hash "
            "WHERE i.nar_file = n.file)").fetchall()
        unwritten = self._unwritten()
        recent = unwritten.nars
        for hash_part, t in unwritten.narinfos.items():
            info = self._cache.get(hash_part) or self._narinfo(hash_part)
            if info is not None:
                recent[info.nar_file] = max(t, recent.get(info.nar_file, 0.0))
        rows.sort(key=lambda r: max(r[-1], recent.get(r[0], 0.0)))
        return [_nar_row(r) for r in rows]


@dataclass(frozen=True)
class PathFields:
    """What a narinfo says about its store path (everything but the file fields), as stored."""

    hash: str
    store_path: str
    text: str
    refs: tuple[str, ...]
    committed: bool


# A narinfo as served: the file fields of its NAR, then the path's own fields.
_NARINFO_SELECT = (
    "SELECT i.hash, i.store_path, i.nar_file, i.text, i.refs, i.committed, n.compression, "
    "n.file_hash, n.file_size FROM narinfos i JOIN nars n ON n.file = i.nar_file")


def _narinfo_row(r: tuple) -> NarInfoRow:
    fields = file_fields(r[2], r[6], Hash.parse(r[7]) if r[7] else None, r[8])
    return NarInfoRow(r[0], r[1], r[2], f"StorePath: {r[1]}\n{fields}{r[3]}",
                      tuple(r[4].split()), bool(r[5]))


def _migrate(db: sqlite3.Connection) -> None:
    """Version 1 keeps a narinfo's file fields only in its NAR's row: re-encoding and commits
    never rewrite narinfo text. Version 2 records whether an environment's closure was walked
    (environments of older stores read as not walked: a restart walks them once more)."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version < 1:
        _migrate_to_1(db)
    if version < 2:
        columns = {r[1] for r in db.execute("PRAGMA table_info(environments)")}
        if "walked" not in columns:
            db.execute("ALTER TABLE environments ADD COLUMN walked INTEGER NOT NULL DEFAULT 0")
        db.execute("PRAGMA user_version = 2")


def _migrate_to_1(db: sqlite3.Connection) -> None:
    drop = ("StorePath:", "URL:", "Compression:", "FileHash:", "FileSize:")
    rows = db.execute("SELECT hash, text FROM narinfos").fetchall()
    db.execute("BEGIN IMMEDIATE")
    db.executemany("UPDATE narinfos SET text = ? WHERE hash = ?", [
        ("".join(line for line in text.splitlines(keepends=True) if not line.startswith(drop)), h)
        for h, text in rows])
    db.execute("PRAGMA user_version = 1")
    db.execute("COMMIT")


_NAR_COLS = ("file, nar_hash, nar_size, compression, file_hash, file_size, upstream, "
             "upstream_url, committed")


def _nar_row(r: tuple) -> NarRow:
    return NarRow(r[0], Hash.parse(r[1]), r[2], r[3], Hash.parse(r[4]) if r[4] else None, r[5],
                  r[6], r[7], bool(r[8]))


def _nar_values(n: NarRow) -> tuple:
    return (n.file, str(n.nar_hash), n.nar_size, n.compression,
            str(n.file_hash) if n.file_hash else None, n.file_size, n.source, n.source_url,
            int(n.committed))
