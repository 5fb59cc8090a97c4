"""Re-encode ingested NARs to zstd (or store them uncompressed), so Nix clients unpack them fast.

Most upstream NARs are xz, which a Nix client decompresses several times slower than zstd. After
a NAR is committed, a background worker (off the event loop) re-encodes it, verifies the result
against the signed NarHash and NarSize, publishes it and repoints its narinfos. A NAR that zstd
barely shrinks (model weights, archives that are compressed already) is stored uncompressed
instead: decoding it would cost every client more than the disk space is worth. The upstream
Sig lines stay valid: they do not cover URL, Compression, FileHash or FileSize. The old file
stays servable for a grace period, for clients that fetched the old narinfo just before.
"""

import asyncio
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace

import zstandard

from agent import metrics
from agent.nix.compression import decoder
from agent.nix.hashes import Hash
from agent.nix.verify import NarVerifier, VerificationError
from agent.store import access
from agent.store.index import NarRow
from agent.store.layout import nar_file_name
from agent.store.space import out_of_space
from agent.store.store import Store
from agent.store.transfer import NarOpener

log = logging.getLogger(__name__)
READ = 1 << 20
# Encodings worth re-encoding, per target: zstd and none already unpack fast.
SOURCES = {"zstd": {"xz", "bzip2", "gzip"}, "none": {"xz", "bzip2", "gzip", "zstd"}}
# zstd is kept when it saves at least this share of the NAR; below it, the client's decoding
# (about a fifth of a local file:// read of incompressible data) buys too little disk.
ZSTD_MIN_SAVING = 0.1


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
                self.store.drop_replaced(self.grace)
            except Exception as e:
                metrics.RECOMPRESSIONS.labels("error").inc()
                if out_of_space(e):  # the original stays; nothing is lost
                    self.store.set_disk_full(True)
                    log.warning("re-encoding skipped: disk full", extra={"fields": {
                        "file": file}})
                else:
                    log.exception("re-encoding failed", extra={"fields": {"file": file}})
            finally:
                self.queue.task_done()

    def recompress(self, file: str) -> None:
        old = self.store.nar_row(file)
        if old is None or not old.committed or old.compression not in self.sources:
            return
        source = self.store.nar_file_path(file)
        fd, tmp = self.store.new_temp()
        target = self.target
        try:
            file_hash, size = self._encode(source, old.compression, target, fd)
            if target == "zstd" and size > old.nar_size * (1 - ZSTD_MIN_SAVING):
                target = "none"
                file_hash, size = self._encode(source, old.compression, target,
                                               os.open(tmp, os.O_WRONLY | os.O_TRUNC))
            self._verify(tmp, old, target, file_hash, size)
            new_file = nar_file_name(file_hash, target)
            if self.store.nar_row(new_file) is None:
                self.store.replace_encoding(old, tmp, new_file, target, file_hash, size)
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

    def _encode(self, source: str, compression: str, target: str, fd: int) \
            -> tuple[Hash, int]:
        step = Transcoder(compression, target, self.level)
        digest = hashlib.sha256()
        size = 0
        with access.open_binary(source) as src, os.fdopen(fd, "wb") as out:
            chunk = src.read(READ)
            while True:
                for data in step.feed(chunk) if chunk else step.finish():
                    digest.update(data)
                    size += len(data)
                    out.write(data)
                if not chunk:
                    break
                chunk = src.read(READ)
        return Hash("sha256", digest.digest()), size

    def _verify(self, tmp: os.PathLike, old: NarRow, target: str, file_hash: Hash,
                size: int) -> None:
        expected = replace(old.expected(), compression=target, file_hash=file_hash,
                           file_size=size)
        verifier = NarVerifier(expected)
        with open(tmp, "rb") as f:
            while chunk := f.read(READ):
                verifier.update(chunk)
        verifier.finish()


class Transcoder:
    """Decode one encoding and encode another, a chunk at a time (bounded memory). The same
    code re-encodes a stored NAR and a refetched original, so both give the same bytes (zstd
    is deterministic for a level, whatever the chunking)."""

    def __init__(self, source: str, target: str, level: int) -> None:
        self._decoder = decoder(source)
        self._encoder = None if target == "none" else \
            zstandard.ZstdCompressor(level=level).compressobj()

    def _encode(self, parts: Iterator[bytes]) -> Iterator[bytes]:
        for part in parts:  # one bounded decoder step at a time
            data = part if self._encoder is None else self._encoder.compress(part)
            if data:
                yield data

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        return self._encode(self._decoder.feed(chunk))

    def finish(self) -> Iterator[bytes]:
        yield from self._encode(self._decoder.finish())
        if self._encoder is not None:
            yield self._encoder.flush()


# How each encoding starts: a source's bytes are recognised, whatever its narinfo said.
_MAGIC = {"xz": b"\xfd7zXZ\x00", "zstd": b"\x28\xb5\x2f\xfd", "bzip2": b"BZh",
          "gzip": b"\x1f\x8b", "none": b"\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1"}


def sniff(head: bytes) -> str | None:
    return next((name for name, magic in _MAGIC.items() if head.startswith(magic)), None)


def in_encoding(opener: NarOpener, target: str, level: int,
                run_io: Callable[..., Awaitable[bytes | None]]) -> NarOpener:
    """`opener`'s bytes in the `target` encoding: when the source holds the original of a
    re-encoded NAR (xz upstream, zstd here), it is re-encoded on the way, off the event loop.
    The caller verifies the result against the re-encoding's FileHash and NarHash."""

    @asynccontextmanager
    async def opened() -> AsyncIterator[AsyncIterator[bytes]]:
        async with opener() as chunks:
            yield _transcoded(chunks, target, level, run_io)
    return opened


async def _transcoded(chunks: AsyncIterator[bytes], target: str, level: int,
                      run_io: Callable[..., Awaitable[bytes | None]]) -> AsyncIterator[bytes]:
    first = b""
    async for first in chunks:
        if first:
            break
    source = sniff(first)
    if source is None or source == target or target not in SOURCES or source not in \
            SOURCES[target]:
        yield first
        async for chunk in chunks:
            yield chunk
        return
    step = Transcoder(source, target, level)
    async for data in _steps(step.feed(first), run_io):
        yield data
    async for chunk in chunks:
        async for data in _steps(step.feed(chunk), run_io):
            yield data
    async for data in _steps(step.finish(), run_io):
        yield data


async def _steps(parts: Iterator[bytes], run_io: Callable[..., Awaitable[bytes | None]]) \
        -> AsyncIterator[bytes]:
    """Each step of a (CPU-bound) transcoding generator, run off the event loop."""
    while (data := await run_io(next, parts, None)) is not None:
        yield data
