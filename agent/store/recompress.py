"""Re-encode ingested NARs to zstd (or store them uncompressed), so Nix clients unpack them fast.

Most upstream NARs are xz, which a Nix client decompresses several times slower than zstd. After
a NAR is committed, a background worker (off the event loop) re-encodes it, verifies the result
against the signed NarHash and NarSize, publishes it and repoints its narinfos. The upstream
Sig lines stay valid: they do not cover URL, Compression, FileHash or FileSize. The old file
stays servable for a grace period, for clients that fetched the old narinfo just before.
"""

import asyncio
import hashlib
import logging
import os
from dataclasses import replace

import zstandard

from agent import metrics
from agent.nix.compression import decoder
from agent.nix.hashes import Hash
from agent.nix.verify import NarVerifier, VerificationError
from agent.store import access
from agent.store.index import NarRow
from agent.store.layout import nar_file_name
from agent.store.store import Store

log = logging.getLogger(__name__)
READ = 1 << 20
# Encodings worth re-encoding, per target: zstd and none already unpack fast.
SOURCES = {"zstd": {"xz", "bzip2", "gzip"}, "none": {"xz", "bzip2", "gzip", "zstd"}}


class Recompressor:
    def __init__(self, store: Store, target: str, level: int, grace: float) -> None:
        """target: "zstd" (smaller) or "none" (uncompressed: no decoding at all on the client,
        at the cost of disk space)."""
        self.store = store
        self.target = target
        self.sources = SOURCES[target]
        self.level = level
        self.grace = grace
        self.queue: asyncio.Queue[str] = asyncio.Queue()

    def submit(self, file: str) -> None:
        row = self.store.nar_row(file)
        if row and row.compression in self.sources:
            self.queue.put_nowait(file)

    async def run(self) -> None:
        """Re-encode submitted NARs one at a time, until cancelled."""
        while True:
            file = await self.queue.get()
            try:
                await self.store.run_io(self.recompress, file)
            except Exception:
                log.exception("re-encoding failed", extra={"fields": {"file": file}})
                metrics.RECOMPRESSIONS.labels("error").inc()
            finally:
                self.queue.task_done()
            self.store.drop_replaced(self.grace)

    def recompress(self, file: str) -> None:
        old = self.store.nar_row(file)
        if old is None or not old.committed or old.compression not in self.sources:
            return
        fd, tmp = self.store.new_temp()
        try:
            file_hash, size = self._encode(self.store.nar_path(file), old.compression, fd)
            self._verify(tmp, old, file_hash, size)
            new_file = nar_file_name(file_hash, self.target)
            if self.store.nar_row(new_file) is None:
                self.store.replace_encoding(old, tmp, new_file, self.target, file_hash, size)
        except VerificationError as e:
            metrics.RECOMPRESSIONS.labels("rejected").inc()
            log.error("re-encoded NAR failed verification", extra={"fields": {
                "file": file, "error": str(e)}})
            return
        finally:
            tmp.unlink(missing_ok=True)
        metrics.RECOMPRESSIONS.labels("ok").inc()
        log.info("re-encoded", extra={"fields": {"file": file, "as": new_file,
                                                 "bytes_before": old.file_size, "bytes": size}})

    def _encode(self, source: os.PathLike, compression: str, fd: int) -> tuple[Hash, int]:
        dec = decoder(compression)
        digest = hashlib.sha256()
        with access.open_binary(source) as src, os.fdopen(fd, "wb") as out:
            hashing = _HashingWriter(out, digest)
            sink = hashing if self.target == "none" else \
                zstandard.ZstdCompressor(level=self.level).stream_writer(hashing, closefd=False)
            while chunk := src.read(READ):
                for data in dec.feed(chunk):
                    sink.write(data)
            for data in dec.finish():
                sink.write(data)
            if sink is not hashing:
                sink.flush(zstandard.FLUSH_FRAME)
                sink.close()
        return Hash("sha256", digest.digest()), hashing.size

    def _verify(self, tmp: os.PathLike, old: NarRow, file_hash: Hash, size: int) -> None:
        expected = replace(old.expected(), compression=self.target, file_hash=file_hash,
                           file_size=size)
        verifier = NarVerifier(expected)
        with open(tmp, "rb") as f:
            while chunk := f.read(READ):
                verifier.update(chunk)
        verifier.finish()


class _HashingWriter:
    """A file-like sink that hashes and counts what the zstd writer emits."""

    def __init__(self, out, digest) -> None:  # type: ignore[no-untyped-def]
        self.out, self.digest, self.size = out, digest, 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()
