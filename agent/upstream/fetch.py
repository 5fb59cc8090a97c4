"""The read-through path: coalesced, verified, stream-through fetches of narinfos and NARs.

Any number of concurrent requests for one narinfo or NAR share a single upstream request. A NAR
download (a Transfer) writes into a temporary file of the store while it hashes and decompresses
the bytes; every client reads that file at its own pace (bounded memory, no slow-reader stalls).
The newest chunk is held back from clients until the whole file is verified, so no client ever
receives a complete NAR that failed verification: on a mismatch their connections are aborted.
Clients and prefetch use this same path.
"""

import asyncio
import contextlib
import errno
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from agent import metrics
from agent.nix.hashes import Hash
from agent.nix.narinfo import NarInfo, NarInfoError
from agent.nix.narinfo import parse as parse_narinfo
from agent.nix.signing import PublicKey, SecretKey, add_signature, verified_by
from agent.nix.verify import NarVerifier, VerificationError
from agent.store.index import NarInfoRow, NarRow
from agent.store.store import Store
from agent.store.verify import verify_info
from agent.upstream.client import CHUNK, Upstream, UpstreamError

log = logging.getLogger(__name__)
# Disk reads and CPU-heavy hashing/decompression run here, off the event loop.
IO_POOL = ThreadPoolExecutor(max_workers=16, thread_name_prefix="fnc-io")


class UpstreamUnavailable(Exception):
    """No upstream could answer (errors, not "not found"): clients get 503, not 404."""


class StoreFull(Exception):
    pass


@dataclass(frozen=True)
class Lookup:
    row: NarInfoRow | None
    source: str  # local | upstream | peer | coalesced | not_found


class Fetcher:
    def __init__(self, store: Store, upstreams: list[Upstream], keys: list[PublicKey], *,
                 require_signatures: bool = True, signing_key: SecretKey | None = None,
                 negative_ttl: float = 30.0) -> None:
        self.store = store
        self.upstreams = upstreams
        self.keys = keys
        self.require_signatures = require_signatures
        self.signing_key = signing_key
        self.negative_ttl = negative_ttl
        self._negative: dict[str, float] = {}
        self._narinfo_inflight: dict[str, asyncio.Future[tuple[NarInfoRow | None, str]]] = {}
        self.transfers: dict[str, Transfer] = {}
        # Called (on the event loop) with each NAR file committed; re-encoding listens.
        self.on_commit: list[Callable[[str], None]] = []

    # --- narinfo ---------------------------------------------------------------------------

    async def lookup(self, hash_part: str) -> Lookup:
        row = self.store.narinfo(hash_part)
        if row:
            self.store.index.touch(hash_part=hash_part)
            return Lookup(row, "local")
        if self._negative.get(hash_part, 0) > time.monotonic():
            return Lookup(None, "not_found")
        inflight = self._narinfo_inflight.get(hash_part)
        if inflight:
            metrics.COALESCED_WAITERS.inc()
            try:
                return Lookup((await asyncio.shield(inflight))[0], "coalesced")
            finally:
                metrics.COALESCED_WAITERS.dec()
        task = asyncio.ensure_future(self._fetch_narinfo(hash_part))
        self._narinfo_inflight[hash_part] = task
        task.add_done_callback(lambda _: self._narinfo_inflight.pop(hash_part, None))
        row, kind = await asyncio.shield(task)
        return Lookup(row, kind if row else "not_found")

    async def _fetch_narinfo(self, hash_part: str) -> tuple[NarInfoRow | None, str]:
        """The narinfo from the first source that has it, and that source's kind."""
        errors: list[UpstreamError] = []
        for up in self.upstreams:
            try:
                text = await up.get_narinfo(hash_part)
            except UpstreamError as e:
                errors.append(e)
                continue
            if text is None:
                continue
            info = self._accept(up, hash_part, text)
            if info is not None:
                log.info("narinfo fetched", extra={"fields": {
                    "upstream": up.name, "store_path": info.store_path.path(),
                    "nar_size": info.nar_size}})
                return self.store.remember(info, up.url), up.kind
        if errors:
            raise UpstreamUnavailable("; ".join(str(e) for e in errors))
        self._negative[hash_part] = time.monotonic() + self.negative_ttl
        if len(self._negative) > 100_000:
            now = time.monotonic()
            self._negative = {h: t for h, t in self._negative.items() if t > now}
        return None, "not_found"

    def _accept(self, up: Upstream, hash_part: str, text: str) -> NarInfo | None:
        """Parse and check an upstream narinfo; None (counted, logged) when it is not usable."""
        try:
            info = parse_narinfo(text)
            if info.hash_part != hash_part:
                raise NarInfoError(f"StorePath {info.store_path} does not match {hash_part}")
        except NarInfoError as e:
            return _rejected("malformed", up, hash_part, str(e))
        if self.require_signatures and verified_by(info, self.keys) is None:
            return _rejected("signature", up, hash_part, "no valid signature by a trusted key")
        if self.signing_key:
            info = add_signature(info, self.signing_key)
        return info

    # --- NAR -------------------------------------------------------------------------------

    def transfer(self, nar: NarRow) -> tuple["Transfer", bool]:
        """The download of this NAR in flight, started if needed: (transfer, joined)."""
        running = self.transfers.get(nar.file)
        if running and not running.done:  # a finished one failed: its NAR is not committed
            return running, True
        up = next((u for u in self.upstreams if u.url == nar.upstream), None)
        if up is None or nar.upstream_url is None:
            raise UpstreamUnavailable(f"no configured upstream serves {nar.file}")
        t = Transfer(self, nar, up)
        self.transfers[nar.file] = t
        t.task.add_done_callback(lambda _: self.transfers.pop(nar.file, None))
        return t, False

    async def ensure_nar(self, file: str) -> int:
        """Make a NAR present (prefetch); returns the bytes fetched from upstream (0 if local)."""
        nar = self.store.nar(file)
        if nar is None:
            raise UpstreamUnavailable(f"unknown NAR {file}")
        if nar.committed:
            return 0
        t, joined = self.transfer(nar)
        await asyncio.shield(t.task)
        if t.error:
            raise t.error
        return 0 if joined else t.received

    async def close(self) -> None:
        for t in list(self.transfers.values()):
            t.task.cancel()
        for t in list(self.transfers.values()):
            with contextlib.suppress(BaseException):  # shutting down; each already logged
                await t.task


def _rejected(reason: str, up: Upstream, hash_part: str, message: str) -> None:
    metrics.VERIFY_FAILURES.labels(reason).inc()
    up.rejected(f"{hash_part}.narinfo", reason)
    log.warning("upstream narinfo rejected", extra={"fields": {
        "upstream": up.name, "hash": hash_part, "reason": reason, "error": message}})
    return None


class Transfer:
    def __init__(self, fetcher: Fetcher, nar: NarRow, upstream: Upstream) -> None:
        self.fetcher = fetcher
        self.nar = nar
        self.upstream = upstream
        self.size = nar.file_size
        self.info = verify_info(nar)
        self.written = 0      # bytes in the temporary file
        self.visible = 0      # bytes readers may send (the newest chunk waits for verification)
        self.received = 0
        self.done = False
        self.error: BaseException | None = None
        self.store_error: OSError | None = None  # the file could not be written: readers fall back
        self._changed = asyncio.Event()
        self._fd: int | None = None
        self._tmp: Path | None = None
        self._readers = 0
        self.task = asyncio.ensure_future(self._run())

    def _notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        verifier = NarVerifier(self.info)
        start = time.monotonic()
        try:
            try:
                self._fd, self._tmp = self.fetcher.store.new_temp()
            except OSError as e:
                self._store_failed(e)
                raise StoreFull(f"cannot create a temporary file: {e.strerror}") from None
            async with self.upstream.nar(self.nar.upstream_url or "") as chunks:
                async for chunk in chunks:
                    self.received += len(chunk)
                    await loop.run_in_executor(IO_POOL, self._absorb, verifier, chunk)
                    if self.store_error:
                        raise StoreFull(f"store write failed: {self.store_error.strerror}")
                    if self.upstream.stream_unverified:
                        self.visible = self.written - len(chunk)
                    self._notify()
            await loop.run_in_executor(IO_POOL, verifier.finish)
            await loop.run_in_executor(IO_POOL, self._commit, verifier.file_hash())
            self.visible = self.written
            for callback in self.fetcher.on_commit:
                callback(self.nar.file)
            log.info("nar fetched", extra={"fields": {
                "upstream": self.upstream.name, "file": self.nar.file, "bytes": self.received,
                "seconds": round(time.monotonic() - start, 3)}})
        except VerificationError as e:
            self.error = e
            metrics.VERIFY_FAILURES.labels(e.reason).inc()
            again = self.upstream.rejected(self.nar.upstream_url or "", e.reason)
            self.fetcher.store.discard_pending(self.nar.file)
            if again:  # look it up elsewhere before the clients, who got nothing, retry
                with contextlib.suppress(Exception):
                    await self.fetcher.lookup(again)
            log.warning("nar rejected", extra={"fields": {
                "upstream": self.upstream.name, "file": self.nar.file, "reason": e.reason,
                "error": str(e)}})
        except (UpstreamError, StoreFull) as e:
            self.error = e
            log.warning("nar fetch failed", extra={"fields": {
                "upstream": self.upstream.name, "file": self.nar.file, "error": str(e)}})
        except BaseException as e:
            self.error = e if isinstance(e, Exception) else UpstreamUnavailable("shutting down")
            raise
        finally:
            self.done = True
            if self.error and self._tmp:
                self._tmp.unlink(missing_ok=True)
            self._release()
            self._notify()

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
            self.fetcher.store.set_disk_full(True)

    def _commit(self, file_hash: Hash) -> None:
        assert self._tmp is not None
        self.fetcher.store.commit_nar(self._tmp, self.nar.file, file_hash, self.written)
        self._tmp = None
        self.fetcher.store.set_disk_full(False)

    def _release(self) -> None:
        if self.done and self._readers == 0 and self._fd is not None:
            os.close(self._fd)
            self._fd = None

    async def stream(self) -> AsyncIterator[bytes]:
        """The NAR's bytes for one client, as they arrive; raises if the transfer fails."""
        loop = asyncio.get_running_loop()
        pos = 0
        self._readers += 1
        try:
            while True:
                if pos < self.visible and self._fd is not None:
                    n = min(self.visible - pos, CHUNK)
                    data = await loop.run_in_executor(IO_POOL, os.pread, self._fd, n, pos)
                    pos += len(data)
                    yield data
                elif self.store_error is not None:
                    # The store cannot hold it: this client gets its own uncached stream.
                    async for data in passthrough(self.upstream, self.nar, skip=pos):
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


async def passthrough(upstream: Upstream, nar: NarRow, skip: int = 0) -> AsyncIterator[bytes]:
    """Stream a NAR from upstream without caching, verified like any other transfer."""
    loop = asyncio.get_running_loop()
    verifier = NarVerifier(verify_info(nar))
    pos = 0
    held = b""
    async with upstream.nar(nar.upstream_url or "") as chunks:
        async for chunk in chunks:
            await loop.run_in_executor(IO_POOL, verifier.update, chunk)
            out, held = held, chunk
            if pos + len(out) > skip:
                yield out[max(0, skip - pos):]
            pos += len(out)
    try:
        await loop.run_in_executor(IO_POOL, verifier.finish)
    except VerificationError as e:
        metrics.VERIFY_FAILURES.labels(e.reason).inc()
        upstream.rejected(nar.upstream_url or "", e.reason)
        raise
    if pos + len(held) > skip:
        yield held[max(0, skip - pos):]
