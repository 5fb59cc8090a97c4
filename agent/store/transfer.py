"""One NAR download into the store: verified as it arrives, readable by any number of clients.

A Transfer writes into a temporary file of the store while it hashes and decompresses the bytes;
every client reads that file at its own pace (bounded memory, no slow-reader stalls). The newest
chunk is held back from clients until the whole file is verified, so no client ever receives a
complete NAR that failed verification: on a mismatch their streams raise. The Transfer talks to
the store only through the narrow `TransferStore` port.
"""

import asyncio
import contextlib
import errno
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from agent import metrics
from agent.nix.hashes import Hash
from agent.nix.nar import listing_file
from agent.nix.verify import Expected, NarVerifier, VerificationError

log = logging.getLogger(__name__)
T = TypeVar("T")
# Opens the NAR's bytes at its source (an upstream or the peers), as an async iterator.
NarOpener = Callable[[], AbstractAsyncContextManager[AsyncIterator[bytes]]]
# Told why the source's bytes failed verification, once they are discarded.
OnRejected = Callable[[str], Awaitable[None]]


class StoreFull(Exception):
    """The store cannot hold the NAR (disk full or an I/O error)."""


class SourceFailed(Exception):
    """The source failed mid-transfer (raised by the opener's iterator as its own error)."""


class TransferStore(Protocol):
    """What a Transfer needs of the store."""

    def new_temp(self) -> tuple[int, Path]: ...
    def commit_nar(self, tmp: Path, file: str, file_hash: Hash, file_size: int,
                   listing: bytes | None) -> None: ...
    def discard_pending(self, file: str) -> None: ...
    def set_disk_full(self, full: bool, wanted: int = 0) -> None: ...
    def run_io(self, fn: Callable[..., T], *args: object) -> Awaitable[T]: ...


@contextlib.asynccontextmanager
async def turn_taken(turn: asyncio.Semaphore | None) -> AsyncIterator[None]:
    """Hold one of the `turn`s (None: no limit), counted as waiting until it is free."""
    if turn is None:
        yield
        return
    with metrics.UPSTREAM_DOWNLOADS_WAITING.track_inprogress():
        await turn.acquire()
    try:
        yield
    finally:
        turn.release()


class Transfer:
    def __init__(self, store: TransferStore, file: str, expected: Expected, opener: NarOpener,
                 source: str, on_committed: Callable[[str], None], *,
                 verified_only: bool = False, on_rejected: OnRejected | None = None,
                 turn: asyncio.Semaphore | None = None,
                 stream_turn: asyncio.Semaphore | None = None) -> None:
        """`verified_only`: clients read nothing before the whole file is verified (a source
        not trusted to stream, a peer); `on_rejected` runs after a verification failure,
        before the clients are told; `turn`: held from opening the source to the commit;
        `stream_turn`: held by each client's own uncached stream once the store failed."""
        self.store = store
        self.file = file
        self.expected = expected
        self.size = expected.file_size
        self.source = source
        self._open = opener
        self._on_committed = on_committed
        self._verified_only = verified_only
        self._on_rejected = on_rejected
        self.written = 0      # bytes in the temporary file
        self.visible = 0      # bytes readers may send (the newest chunk waits for verification)
        self.received = 0
        self.done = False
        self.error: BaseException | None = None
        self.store_error: OSError | None = None  # the file could not be written: readers fall back
        self.uncached: StoreFull | None = None  # verified and served, but the store had no room
        self._changed = asyncio.Event()
        self._fd: int | None = None
        self._tmp: Path | None = None
        self._readers = 0
        self._turn = turn
        self._stream_turn = stream_turn
        self.task = asyncio.ensure_future(self._run())

    def _notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def _run(self) -> None:
        start = time.monotonic()
        fields = {"source": self.source, "file": self.file}
        try:
            async with turn_taken(self._turn):
                await self._download()
            self.visible = self.written
            log.info("nar fetched", extra={"fields": {
                **fields, "bytes": self.received, "cached": self.uncached is None,
                "seconds": round(time.monotonic() - start, 3)}})
        except VerificationError as e:
            self.error = e
            metrics.VERIFY_FAILURES.labels(e.reason).inc()
            self.store.discard_pending(self.file)
            log.warning("nar rejected", extra={"fields": {
                **fields, "reason": e.reason, "error": str(e)}})
            if self._on_rejected:
                await self._on_rejected(e.reason)
        except asyncio.CancelledError:
            self.error = SourceFailed("shutting down")
            raise
        except Exception as e:  # the source's errors, StoreFull
            self.error = e
            log.warning("nar fetch failed", extra={"fields": {**fields, "error": str(e)}})
        finally:
            self.done = True
            if self.error and self._tmp:
                self._tmp.unlink(missing_ok=True)
            self._release()
            self._notify()

    async def _download(self) -> None:
        """Fetch, verify and commit (or keep uncached when the store has no room)."""
        try:
            self._fd, self._tmp = self.store.new_temp()
        except OSError as e:
            self._store_failed(e)
            raise StoreFull(f"cannot create a temporary file: {e.strerror}") from None
        verifier = NarVerifier(self.expected, listing=True)
        async with self._open() as chunks:
            async for chunk in chunks:
                self.received += len(chunk)
                await self.store.run_io(self._absorb, verifier, chunk)
                if self.store_error:
                    raise StoreFull(f"store write failed: {self.store_error.strerror}")
                if not self._verified_only:
                    self.visible = self.written - len(chunk)
                self._notify()
        await self.store.run_io(verifier.finish)
        try:
            await self.store.run_io(self._commit, verifier)
        except StoreFull as e:  # verified, so every reader gets it; it is not kept
            self.uncached = e
        else:
            self._on_committed(self.file)

    def _absorb(self, verifier: NarVerifier, chunk: bytes) -> None:
        """Verify-as-you-go and append to the temporary file (in a worker thread)."""
        verifier.update(chunk)
        if self.store_error or self._fd is None:
            return
        try:
            view = memoryview(chunk)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            self.written += len(chunk)
        except OSError as e:
            self._store_failed(e)

    def _store_failed(self, e: OSError) -> None:
        self.store_error = e
        reason = "disk_full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "io_error"
        metrics.STORE_WRITE_ERRORS.labels(reason).inc()
        if reason == "disk_full":
            self.store.set_disk_full(True, self.size or 0)

    def _commit(self, verifier: NarVerifier) -> None:
        assert self._tmp is not None
        listing = verifier.listing()
        self.store.commit_nar(self._tmp, self.file, verifier.file_hash(), self.written,
                              listing_file(listing) if listing is not None else None)
        self._tmp = None
        self.store.set_disk_full(False)

    def _release(self) -> None:
        if self.done and self._readers == 0 and self._fd is not None:
            os.close(self._fd)
            self._fd = None

    async def wait(self) -> int:
        """Until the NAR is committed; returns the bytes received, raises why it failed."""
        await asyncio.shield(self.task)
        if self.error or self.uncached:
            raise self.error or self.uncached  # type: ignore[misc]
        return self.received

    async def pieces(self) -> AsyncIterator["Span | bytes"]:
        """The NAR for one client, as it arrives: spans of the file being written (the client
        sends them from the file, with no copy in memory), or, once the store failed to write
        it, bytes of the client's own uncached stream. Raises if the transfer fails."""
        pos = 0
        self._readers += 1  # the file's descriptor stays open for the spans handed out
        try:
            while True:
                if pos < self.visible and self._fd is not None:
                    span = Span(self._fd, pos, self.visible - pos)
                    pos = self.visible
                    yield span
                elif self.store_error is not None:
                    # The store cannot hold it: this client gets its own uncached stream
                    # (closed with this iteration, so that its turn goes back at once).
                    stream = passthrough(self.store, self.expected, self._open, skip=pos,
                                         on_rejected=self._on_rejected, turn=self._stream_turn)
                    async with contextlib.aclosing(stream):
                        async for data in stream:
                            yield data
                    return
                elif self.done:
                    if self.error:
                        raise self.error
                    return
                else:
                    await self._changed.wait()
        finally:
            self._readers -= 1
            self._release()


@dataclass(frozen=True)
class Span:
    """`count` verified bytes of a transfer's file from `offset`, readable at `fd` while the
    reader's iteration of `Transfer.pieces` is open."""

    fd: int
    offset: int
    count: int


async def passthrough(store: TransferStore, expected: Expected, opener: NarOpener,
                      skip: int = 0, on_rejected: OnRejected | None = None,
                      turn: asyncio.Semaphore | None = None) -> AsyncIterator[bytes]:
    """Stream a NAR from its source without caching, verified like any other transfer: the
    last chunk is held back until the whole file matched. `turn` is held throughout: each
    stream holds a decoder (and an encoder when re-encoding), so their number is bounded."""
    async with turn_taken(turn):
        verifier = NarVerifier(expected)
        pos = 0
        held = b""
        async with opener() as chunks:
            async for chunk in chunks:
                await store.run_io(verifier.update, chunk)
                out, held = held, chunk
                if pos + len(out) > skip:
                    yield out[max(0, skip - pos):]
                pos += len(out)
        try:
            await store.run_io(verifier.finish)
        except VerificationError as e:
            metrics.VERIFY_FAILURES.labels(e.reason).inc()
            if on_rejected:
                await on_rejected(e.reason)
            raise
        if pos + len(held) > skip:
            yield held[max(0, skip - pos):]
