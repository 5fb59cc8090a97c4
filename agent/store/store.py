"""The store facade: the layout on disk, the index, and the commit protocol together."""

import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

from agent import metrics
from agent.nix.hashes import Hash
from agent.nix.narinfo import NarInfo
from agent.nix.narinfo import parse as parse_narinfo
from agent.store.commit import new_temp, publish, recover, write_atomic
from agent.store.index import Index, NarInfoRow, NarRow
from agent.store.layout import Layout, nar_file_name

log = logging.getLogger(__name__)


class Store:
    def __init__(self, root: Path, priority: int = 10, *, recover_on_open: bool = True) -> None:
        """Open (creating) a store. The agent recovers from an unclean stop on open; tools that
        run beside a live agent (`verify`) must not, as the agent's temporary files are live."""
        self.layout = Layout(root)
        self.layout.create()
        self.index = Index(self.layout.index)
        self.priority = priority
        self.disk_full = False
        if recover_on_open:
            write_atomic(self.layout, self.layout.cache_info, self.cache_info().encode())
            recover(self.layout, self.index)
        self.update_gauges()

    def close(self) -> None:
        self.index.close()

    def cache_info(self) -> str:
        return f"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: {self.priority}\n"

    # --- reading ---------------------------------------------------------------------------

    def narinfo(self, hash_part: str) -> NarInfoRow | None:
        return self.index.narinfo(hash_part)

    def nar(self, file: str) -> NarRow | None:
        return self.index.nar(file)

    def nar_path(self, file: str) -> Path:
        return self.layout.nar(file)

    # --- writing ---------------------------------------------------------------------------

    def remember(self, info: NarInfo, upstream: str) -> NarInfoRow:
        """Record an upstream narinfo; it is served with our own NAR URL.

        When a NAR with the same NarHash is already committed (another narinfo, another
        upstream, another compression), the narinfo points at it: one copy per NAR. The file
        fields are not covered by signatures, so rewriting them keeps upstream Sig lines valid.
        """
        existing = self.index.committed_nar_with_hash(str(info.nar_hash))
        if existing and existing.file_hash and existing.file_size is not None:
            served = info.with_file(existing.file, existing.compression,
                                    Hash.parse(existing.file_hash), existing.file_size)
            row = _narinfo_row(served, existing.file, committed=True)
            self.index.put_pending(existing, row)
            write_atomic(self.layout, self.layout.narinfo(info.hash_part), row.text.encode())
            return row
        name_hash = info.file_hash if info.file_hash and info.file_hash.algo == "sha256" \
            else info.nar_hash
        file = nar_file_name(name_hash, info.compression)
        # Without a FileHash upstream, the file fields are filled in when the NAR is committed.
        served = replace(info, url=file)
        nar = NarRow(file, str(info.nar_hash), info.nar_size, info.compression,
                     str(info.file_hash) if info.file_hash else None, info.file_size, upstream,
                     info.url, committed=False)
        row = _narinfo_row(served, file, committed=False)
        self.index.put_pending(nar, row)
        return row

    def new_temp(self) -> tuple[int, Path]:
        return new_temp(self.layout)

    def commit_nar(self, tmp: Path, file: str, file_hash: Hash, file_size: int) -> None:
        """Publish a verified NAR and then every narinfo that waits for it."""
        publish(tmp, self.layout.nar(file))
        self.index.mark_nar_committed(file, file_size, str(file_hash))
        for info in self.index.narinfos_for_nar(file):
            if info.committed:
                continue
            served = parse_narinfo(info.text)
            if served.file_hash is None or served.file_size is None:
                served = served.with_file(file, served.compression, file_hash, file_size)
                info = _narinfo_row(served, file, committed=False)
                self.index.put_pending(self.index.nar(file), info)  # type: ignore[arg-type]
            write_atomic(self.layout, self.layout.narinfo(info.hash), info.text.encode())
            self.index.mark_narinfo_committed(info.hash)
        self.update_gauges()

    def replace_encoding(self, old: NarRow, tmp: Path, file: str, compression: str,
                         file_hash: Hash, file_size: int) -> None:
        """Publish a verified re-encoding of a committed NAR and repoint its narinfos.

        Only URL, Compression, FileHash and FileSize change, which signatures do not cover."""
        publish(tmp, self.layout.nar(file))
        new = NarRow(file, old.nar_hash, old.nar_size, compression, str(file_hash), file_size,
                     None, None, committed=True)
        infos = []
        for info in self.index.narinfos_for_nar(old.file):
            served = parse_narinfo(info.text).with_file(file, compression, file_hash, file_size)
            infos.append(_narinfo_row(served, file, committed=info.committed))
        self.index.replace_nar(old.file, new, infos)
        for info in infos:
            if info.committed:
                write_atomic(self.layout, self.layout.narinfo(info.hash), info.text.encode())
        self.update_gauges()

    def drop_replaced(self, older_than: float) -> int:
        """Delete old encodings whose grace period is over; returns how many."""
        old = self.index.replaced_before(time.time() - older_than)
        for file in old:
            self.remove_nar(file)
        return len(old)

    def discard_pending(self, file: str) -> None:
        """Forget an upstream narinfo whose NAR failed verification: the next ask refetches."""
        self.index.forget_pending_nar(file)

    def remove_nar(self, file: str) -> int:
        """Delete a committed NAR and its narinfos (narinfos first: never one without a NAR)."""
        row = self.index.nar(file)
        for hash_part in self.index.remove_nar(file):
            self.layout.narinfo(hash_part).unlink(missing_ok=True)
        self.layout.nar(file).unlink(missing_ok=True)
        return (row.file_size or 0) if row else 0

    # --- accounting ------------------------------------------------------------------------

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
        metrics.STORE_BYTES.set(self.index.used_bytes())
        for kind, n in self.index.counts().items():
            metrics.STORE_ENTRIES.labels(kind).set(n)
        metrics.STORE_PINNED.set(self.index.pinned_bytes())


def _narinfo_row(info: NarInfo, file: str, committed: bool) -> NarInfoRow:
    return NarInfoRow(info.hash_part, info.store_path.path(), file, info.render(),
                      tuple(r.hash_part for r in info.references), committed)
