"""The store's front door: the files on disk, the index, the commit protocol and the worker pool.

Nothing outside `agent/store/` touches the index: every question about what the store holds
and every change to it is a verb here (or of `Pins`, its pin and environment bookkeeping).
"""

import asyncio
import functools
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from agent import metrics
from agent.nix.hashes import Hash
from agent.nix.narinfo import NarInfo
from agent.store.commit import new_temp, publish, recover, write_atomic
from agent.store.index import Index, NarInfoRow, NarRow, PathFields
from agent.store.layout import Layout, nar_file_name
from agent.store.pins import Pins

log = logging.getLogger(__name__)
T = TypeVar("T")
# Disk reads, hashing and decompression of NARs run here, off the event loop.
IO_WORKERS = 16


class Store:
    def __init__(self, root: Path, priority: int = 10, *, recover_on_open: bool = True) -> None:
        """Open (creating) a store. The agent recovers from an unclean stop on open; tools that
        run beside a live agent (`verify`) must not, as the agent's temporary files are live."""
        self.layout = Layout(root)
        self.layout.create()
        self._index = Index(self.layout.index)
        self.pins = Pins(self._index)
        self.priority = priority
        self.disk_full = False
        self._pool = ThreadPoolExecutor(max_workers=IO_WORKERS, thread_name_prefix="fnc-io")
        # Only the process that recovered the store owns its temporary files.
        self._owns_temp_files = recover_on_open
        if recover_on_open:
            write_atomic(self.layout, self.layout.cache_info, self.cache_info().encode())
            recover(self.layout, self._index)
        self.update_gauges()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
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

    def nar_path(self, file: str) -> Path:
        return self.layout.nar_path(file)

    def committed_nars(self) -> list[NarRow]:
        return self._index.committed_nars()

    def touch_narinfo(self, hash_part: str) -> None:
        """Record a use for LRU eviction (batched: a hit must not cost a write)."""
        self._index.touch(hash_part=hash_part)

    def touch_nar(self, file: str) -> None:
        self._index.touch(nar_file=file)

    def flush_access(self) -> None:
        self._index.flush_access()

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
        self._index.put_pending(existing or nar, path)
        row = self._index.narinfo_row(info.hash_part)
        assert row is not None
        if row.committed:
            write_atomic(self.layout, self.layout.narinfo(info.hash_part), row.text.encode())
        return row

    def new_temp(self) -> tuple[int, Path]:
        return new_temp(self.layout)

    def commit_nar(self, tmp: Path, file: str, file_hash: Hash, file_size: int,
                   listing: bytes | None = None) -> None:
        """Publish a verified NAR (its listing first, if known), then every narinfo that
        waits for it."""
        if listing is not None:
            row = self._index.nar_row(file)
            if row is not None:
                self.save_listing(row.nar_hash, listing)
        publish(tmp, self.layout.nar_path(file))
        self._index.mark_nar_committed(file, file_size, file_hash)
        for info in self._index.mark_narinfos_committed(file):
            write_atomic(self.layout, self.layout.narinfo(info.hash), info.text.encode())
        self.update_gauges()

    def replace_encoding(self, old: NarRow, tmp: Path, file: str, compression: str,
                         file_hash: Hash, file_size: int) -> None:
        """Publish a verified re-encoding of a committed NAR and repoint its narinfos.

        Only URL, Compression, FileHash and FileSize change, which signatures do not cover."""
        publish(tmp, self.layout.nar_path(file))
        new = NarRow(file, old.nar_hash, old.nar_size, compression, file_hash, file_size,
                     None, None, committed=True)
        for info in self._index.replace_nar(old.file, new):
            if info.committed:
                write_atomic(self.layout, self.layout.narinfo(info.hash), info.text.encode())
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
        and its listing once no encoding of the NAR is left."""
        row = self._index.nar_row(file)
        for hash_part in self._index.remove_nar(file):
            self.layout.narinfo(hash_part).unlink(missing_ok=True)
        self.layout.nar_path(file).unlink(missing_ok=True)
        if row is not None and not self._index.has_nar_hash(row.nar_hash):
            self.layout.listing(row.nar_hash).unlink(missing_ok=True)
        return (row.file_size or 0) if row else 0

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
        return self._index.used_bytes()

    def counts(self) -> dict[str, int]:
        """Committed entries by kind (nar, narinfo); raises if the index is unusable."""
        return self._index.counts()

    def filesystem_bytes(self) -> int:
        return shutil.disk_usage(self.layout.root).total

    def free_bytes(self) -> int:
        st = os.statvfs(self.layout.root)
        return st.f_bavail * st.f_frsize

    def set_disk_full(self, full: bool) -> None:
        if full != self.disk_full:
            log.warning("store disk full" if full else "store disk writable again")
        self.disk_full = full
        metrics.STORE_DISK_FULL.set(int(full))

    def check_disk_recovered(self, headroom: int = 64 << 20) -> None:
        """Clear the disk-full state once there is room again (a commit also clears it)."""
        if self.disk_full and self.free_bytes() > min(headroom, self.filesystem_bytes() // 10):
            self.set_disk_full(False)

    def update_gauges(self) -> None:
        metrics.STORE_BYTES.set(self._index.used_bytes())
        for kind, n in self._index.counts().items():
            metrics.STORE_ENTRIES.labels(kind).set(n)
        metrics.STORE_PINNED.set(self._index.pinned_bytes())
