"""The store's front door: the files on disk, the index, the commit protocol and the worker pool.

Nothing outside `agent/store/` touches the index: every question about what the store holds
and every change to it is a verb here (or of `Pins`, its pin and environment bookkeeping).
"""

import asyncio
import functools
import logging
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from agent import metrics
from agent.nix.hashes import Hash
from agent.nix.narinfo import NarInfo, file_fields
from agent.store.commit import clear_temp_files, new_temp, publish, recover, write_atomic
from agent.store.index import Index, NarInfoRow, NarRow, PathFields
from agent.store.layout import Layout, nar_file_name
from agent.store.openfiles import OpenFiles
from agent.store.pins import Pins
from agent.store.rebuild import open_index
from agent.store.space import Space, out_of_space, overhead_bytes
from agent.store.transfer import StoreFull

log = logging.getLogger(__name__)
T = TypeVar("T")
# Disk reads, hashing and decompression of NARs run here, off the event loop.
IO_WORKERS = 16
# NARs known but not in the index (evicted or lost with their source, or never recorded on a
# full disk), remembered so a client holding their narinfo still gets the bytes.
UNCACHED_ENTRIES = 10_000


class Store:
    def __init__(self, root: Path, priority: int = 10, *, recover_on_open: bool = True) -> None:
        """Open (creating) a store. The agent recovers from an unclean stop on open (and
        rebuilds a corrupt index); tools that run beside a live agent (`verify`) must not, as
        the agent's temporary files are live."""
        self.layout = Layout(root)
        self.layout.create()
        self.space = Space(self.layout)
        self.read_only = False
        if recover_on_open:  # a download cut short may be what filled the disk
            clear_temp_files(self.layout)
        self._index = self._open_index(heal=recover_on_open)
        self.pins = Pins(self._index)
        self.priority = priority
        self._pool = ThreadPoolExecutor(max_workers=IO_WORKERS, thread_name_prefix="fnc-io")
        self._uncached: OrderedDict[str, NarRow] = OrderedDict()
        self._open_files = OpenFiles()
        # Only the process that recovered the store owns its temporary files.
        self._owns_temp_files = recover_on_open
        if recover_on_open and not self.read_only:
            try:
                recover(self.layout, self._index)
                self._write_cache_info()
            except (OSError, sqlite3.OperationalError) as e:
                if not out_of_space(e):
                    raise
                # The agent still serves what it has; recovery is finished at the next start.
                log.warning("store recovery postponed: disk full", extra={"fields": {
                    "error": str(e)}})
                self.set_disk_full(True)
        self._overhead = overhead_bytes(self.layout)
        self.update_gauges()

    def _write_cache_info(self) -> None:
        """For `file://` readers (the agent serves it from memory); written only if changed."""
        path, text = self.layout.cache_info, self.cache_info()
        if not path.exists() or path.read_text() != text:
            write_atomic(self.layout, path, text.encode())

    def _open_index(self, heal: bool) -> Index:
        """SQLite needs room for its -shm and -wal files: on a full disk the reserve is given
        up; without one, the index is opened read-only (hits are served, nothing is
        recorded) until the agent is restarted with room."""
        for attempt in range(2):
            try:
                return open_index(self.layout, heal=heal)
            except sqlite3.OperationalError as e:
                if not out_of_space(e):
                    raise
                self.set_disk_full(True)
                if attempt or not self.space.release_reserve():
                    break
        log.error("no room on the disk to open the index: serving what the store holds, "
                  "read-only, until restarted with free space")
        self.read_only = True
        return Index(self.layout.index, read_only=True)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._open_files.close()
        self._index.close()
        if self._owns_temp_files:
            for leftover in self.layout.tmp.iterdir():
                leftover.unlink(missing_ok=True)

    async def run_io(self, fn: Callable[..., T], *args: object) -> T:
        """Run blocking file work (reads, hashing, decompression, fsync) on the store's pool."""
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, functools.partial(fn, *args))

    def cache_info(self) -> str:
        return f"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: {self.priority}\n"

    # --- reading ---------------------------------------------------------------------------

    def narinfo_row(self, hash_part: str) -> NarInfoRow | None:
        """The narinfo known for a hash part, committed or still waiting for its NAR."""
        return self._index.narinfo_row(hash_part)

    def nar_row(self, file: str) -> NarRow | None:
        return self._index.nar_row(file)

    def uncached_nar(self, file: str) -> NarRow | None:
        """A NAR the store does not hold but a client may hold a narinfo for: evicted, lost or
        never recorded (a full disk). It has its source, so it can be streamed again."""
        return self._uncached.get(file)

    def nar_file_path(self, file: str) -> str:
        return self.layout.nar_file_path(file)

    def open_nar(self, file: str) -> tuple[int, int]:
        """(a descriptor of a committed NAR's file, which the caller closes, its size), from
        the files kept open (store/openfiles.py). Raises OSError when the file is gone."""
        return self._open_files.open(self.layout.nar_file_path(file))

    def nar_present(self, file: str) -> bool:
        return self.layout.nar_path(file).exists()

    def lose_nar(self, file: str) -> None:
        """A committed NAR whose file is gone (deleted by hand or by another process): forget
        it, so the next request for its paths is a miss that fetches them again."""
        log.warning("nar file missing: forgotten, fetched again on demand", extra={"fields": {
            "file": file}})
        try:
            self.remove_nar(file)
        except sqlite3.OperationalError as e:  # still remembered for clients, retried later
            if not out_of_space(e):
                raise

    def committed_nars(self) -> list[NarRow]:
        return self._index.committed_nars()

    def touch_narinfo(self, hash_part: str) -> None:
        """Record a use for LRU eviction (batched: a hit must not cost a write)."""
        self._index.touch(hash_part=hash_part)

    def touch_nar(self, file: str) -> None:
        self._index.touch(nar_file=file)

    async def flush_access(self) -> None:
        """Write the uses recorded since the last flush, in a worker thread: the write waits for
        the index's lock, which a commit or an eviction pass may hold for a while."""
        taken = self._index.take_access()
        if taken is None:
            return
        try:
            await self.run_io(self._index.write_access, taken)
        except BaseException as e:  # kept for the next flush (again, if cancelled mid-write)
            self._index.restore_access(taken)
            if not (isinstance(e, sqlite3.OperationalError) and out_of_space(e)):
                raise
            self.set_disk_full(True)

    def present(self, hashes: Iterable[str]) -> set[str]:
        """The hash parts among `hashes` whose narinfo and NAR are committed."""
        return self._index.present(hashes)

    def closure_bytes(self, hashes: Iterable[str]) -> tuple[int, int]:
        """(bytes of the distinct NAR files, bytes of those committed) for these paths."""
        return self._index.closure_bytes(hashes)

    # --- writing ---------------------------------------------------------------------------

    def remember(self, info: NarInfo, source: str) -> NarInfoRow:
        """Record a verified upstream narinfo; it is served with our own NAR URL.

        When a NAR with the same NarHash is already committed (another narinfo, another
        upstream, another compression), the narinfo points at it: one copy per NAR. The file
        fields are not covered by signatures, so serving ours keeps upstream Sig lines valid.
        """
        existing = self._index.committed_nar_with_hash(info.nar_hash)
        path = PathFields(info.hash_part, info.store_path.path(), info.render_path_fields(),
                          tuple(r.hash_part for r in info.references),
                          committed=existing is not None)
        if existing is None:
            name_hash = info.file_hash if info.file_hash and info.file_hash.algo == "sha256" \
                else info.nar_hash
            # Without a FileHash upstream, the file fields are measured at commit.
            nar = NarRow(nar_file_name(name_hash, info.compression), info.nar_hash,
                         info.nar_size, info.compression, info.file_hash, info.file_size,
                         source, info.url, committed=False)
        try:
            self._index.put_pending(existing or nar, path)
        except sqlite3.OperationalError as e:
            if not out_of_space(e):
                raise
            return self._unrecorded(existing or nar, path)
        row = self._index.narinfo_row(info.hash_part)
        assert row is not None
        if row.committed:
            self._write_narinfo(row)
        return row

    def _unrecorded(self, nar: NarRow, path: PathFields) -> NarInfoRow:
        """A narinfo the index has no room for: served (not cached); its NAR, if not here, is
        remembered in memory so a client can still fetch it through this store."""
        self.set_disk_full(True)
        if not nar.committed:
            self._remember_uncached(nar)
        fields = file_fields(nar.file, nar.compression, nar.file_hash, nar.file_size)
        return NarInfoRow(path.hash, path.store_path, nar.file,
                          f"StorePath: {path.store_path}\n{fields}{path.text}", path.refs,
                          nar.committed)

    def _remember_uncached(self, nar: NarRow) -> None:
        if nar.source is None or nar.source_url is None:
            return
        self._uncached[nar.file] = nar
        self._uncached.move_to_end(nar.file)
        while len(self._uncached) > UNCACHED_ENTRIES:
            self._uncached.popitem(last=False)

    def _write_narinfo(self, row: NarInfoRow) -> None:
        """Write a committed narinfo's file (for `file://` readers; the agent serves the
        index). On a full disk it is written at the next start's recovery."""
        try:
            write_atomic(self.layout, self.layout.narinfo(row.hash), row.text.encode())
        except OSError as e:
            if not out_of_space(e):
                raise
            self.set_disk_full(True)

    def new_temp(self) -> tuple[int, Path]:
        return new_temp(self.layout)

    def commit_nar(self, tmp: Path, file: str, file_hash: Hash, file_size: int,
                   listing: bytes | None = None) -> None:
        """Publish a verified NAR (its listing first, if known), then every narinfo that
        waits for it."""
        row = self._index.nar_row(file) if listing is not None else None
        if row is not None and listing is not None:
            try:
                self.save_listing(row.nar_hash, listing)
            except OSError as e:  # the scrub builds it later
                if not out_of_space(e):
                    raise
                self.set_disk_full(True)
        publish(tmp, self.layout.nar_path(file))
        try:
            self._index.mark_nar_committed(file, file_size, file_hash)
        except sqlite3.OperationalError as e:
            self._unlink_nar(file)  # not vouched for: it must not stay
            if not out_of_space(e):
                raise
            self.set_disk_full(True, file_size)
            raise StoreFull("no room in the index to record the NAR") from None
        self._uncached.pop(file, None)
        for info in self._index.mark_narinfos_committed(file):
            self._write_narinfo(info)
        self.update_gauges()

    def replace_encoding(self, old: NarRow, tmp: Path, file: str, compression: str,
                         file_hash: Hash, file_size: int) -> None:
        """Publish a verified re-encoding of a committed NAR and repoint its narinfos.

        Only URL, Compression, FileHash and FileSize change, which signatures do not cover.
        The new row keeps the original's source: if the file is ever lost, the original is
        fetched again and re-encoded (byte-identically, as zstd is deterministic)."""
        publish(tmp, self.layout.nar_path(file))
        new = NarRow(file, old.nar_hash, old.nar_size, compression, file_hash, file_size,
                     old.source, old.source_url, committed=True)
        for info in self._index.replace_nar(old.file, new):
            if info.committed:
                self._write_narinfo(info)
        self.update_gauges()

    def drop_replaced(self, older_than: float) -> int:
        """Delete old encodings whose grace period is over; returns how many."""
        old = self._index.replaced_before(time.time() - older_than)
        for file in old:
            self.remove_nar(file)
        return len(old)

    def forget_stale_pending(self, older_than: float) -> int:
        """Drop upstream narinfos whose NAR nobody fetched for `older_than` seconds."""
        return self._index.forget_stale_pending(older_than)

    def discard_pending(self, file: str) -> None:
        """Forget an upstream narinfo whose NAR failed verification: the next ask refetches."""
        self._index.forget_pending_nar(file)

    def remove_nar(self, file: str) -> int:
        """Delete a committed NAR and its narinfos (narinfos first: never one without a NAR),
        and its listing once no encoding of the NAR is left; returns the bytes freed."""
        return self.remove_nars([file])

    def remove_nars(self, files: list[str]) -> int:
        """remove_nar for several NARs. Their sources are remembered, for clients that hold
        one of their narinfos. On a full disk, where even the index's delete has no room, the
        files go first (a narinfo naming a missing file is answered as a miss)."""
        rows = [row for row in map(self._index.nar_row, files) if row is not None]
        for row in rows:
            self._remember_uncached(row)
        try:
            hashes = self._index.remove_nars(files)
        except sqlite3.OperationalError as e:
            if not out_of_space(e):
                raise
            self.set_disk_full(True)
            for file in files:
                self._unlink_entry(file, [i.hash for i in self._index.narinfos_for_nar(file)])
            hashes = self._index.remove_nars(files)
        for hash_part in hashes:
            self.layout.narinfo(hash_part).unlink(missing_ok=True)
        for file in files:
            self._unlink_nar(file)
        for row in rows:
            if not self._index.has_nar_hash(row.nar_hash):
                self.layout.listing(row.nar_hash).unlink(missing_ok=True)
        return sum(row.file_size or 0 for row in rows)

    def _unlink_entry(self, file: str, narinfos: list[str]) -> None:
        for hash_part in narinfos:
            self.layout.narinfo(hash_part).unlink(missing_ok=True)
        self._unlink_nar(file)

    def _unlink_nar(self, file: str) -> None:
        path = self.layout.nar_file_path(file)
        Path(path).unlink(missing_ok=True)
        self._open_files.forget(path)  # its space is freed now, not when it leaves the cache

    def read_listing(self, hash_part: str) -> bytes | None:
        """The `.ls` listing of a committed store path, if the store has one (blocking)."""
        info = self._index.narinfo_row(hash_part)
        nar = self._index.nar_row(info.nar_file) if info and info.committed else None
        try:
            return self.layout.listing(nar.nar_hash).read_bytes() if nar else None
        except FileNotFoundError:
            return None

    def has_listing(self, nar_hash: Hash) -> bool:
        return self.layout.listing(nar_hash).exists()

    def save_listing(self, nar_hash: Hash, listing: bytes) -> None:
        write_atomic(self.layout, self.layout.listing(nar_hash), listing)

    def eviction_candidates(self) -> list[NarRow]:
        """Committed NARs no pin protects, least recently used first."""
        return self._index.eviction_candidates()

    # --- accounting ------------------------------------------------------------------------

    def used_bytes(self) -> int:
        """Everything the store writes: NAR files (old encodings in their grace period too),
        the index and its WAL, temporary files, narinfos and listings. The small reserve is
        not counted: it is there to be given back when the disk is full."""
        return self._index.used_bytes() + sum(
            n for kind, n in self._overhead.items() if kind != "reserve")

    def usage(self) -> dict[str, object]:
        """used_bytes, by kind; originals kept while clients may still read them."""
        total = self._index.used_bytes()
        grace, since = self._index.replaced_bytes()
        return {"nars": total - grace, "originals_in_grace": grace,
                "originals_replaced_since": since, **self._overhead}

    def measure_overhead(self) -> None:
        """Re-measure what the store writes besides NAR files (blocking: a walk)."""
        self._overhead = overhead_bytes(self.layout)

    def counts(self) -> dict[str, int]:
        """Committed entries by kind (nar, narinfo); raises if the index is unusable."""
        return self._index.counts()

    @property
    def disk_full(self) -> bool:
        return self.space.disk_full

    def filesystem_bytes(self) -> int:
        return self.space.total_bytes()

    def free_bytes(self) -> int:
        return self.space.free_bytes()

    def set_disk_full(self, full: bool, wanted: int = 0) -> None:
        self.space.set_full(full, wanted)

    def check_disk_recovered(self) -> None:
        """Clear the disk-full state once there is room again (a commit also clears it)."""
        self.space.check_recovered()

    def update_gauges(self) -> None:
        metrics.STORE_BYTES.set(self.used_bytes())
        for kind, n in self._index.counts().items():
            metrics.STORE_ENTRIES.labels(kind).set(n)
        metrics.STORE_PINNED.set(self._index.pinned_bytes())
