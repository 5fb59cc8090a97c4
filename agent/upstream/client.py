"""One aiohttp session per upstream cache, with per-upstream timeouts and a circuit breaker.

404, 403 and 410 mean "not here". Anything else that is not a 200 (5xx, timeouts, resets, an
open circuit) is an UpstreamError, which the cache answers as 503 and never as 404: a wrong 404
would poison the Nix client's negative cache for an hour.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import aiohttp

from agent import metrics
from agent.nix.narinfo import MAX_NARINFO_BYTES

log = logging.getLogger(__name__)
NOT_HERE = {404, 403, 410}
CHUNK = 256 * 1024
CONNECTIONS_PER_UPSTREAM = 64  # also counted in the agent's file-descriptor budget


async def _read_limited(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body up to `limit` bytes (read() alone returns only what is buffered)."""
    parts: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await resp.content.read(limit - size)
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


class UpstreamError(Exception):
    def __init__(self, upstream: str, reason: str, message: str) -> None:
        super().__init__(f"{upstream}: {message}")
        self.upstream = upstream
        self.reason = reason


@dataclass
class Timeouts:
    connect: float = 5.0
    read: float = 30.0      # longest silence inside a response body
    narinfo: float = 10.0   # whole narinfo request
    min_rate: float = 8192  # bytes/s a NAR body must sustain after `read` seconds


class CircuitBreaker:
    """Opens after `failures` consecutive errors; lets one trial through after `cooldown`."""

    def __init__(self, name: str, failures: int, cooldown: float) -> None:
        self.name, self.failures, self.cooldown = name, failures, cooldown
        self._consecutive = 0
        self._open_until = 0.0
        metrics.CIRCUIT_OPEN.labels(name).set(0)

    @property
    def is_open(self) -> bool:
        return time.monotonic() < self._open_until

    def success(self) -> None:
        self._consecutive = 0
        self._open_until = 0.0
        metrics.CIRCUIT_OPEN.labels(self.name).set(0)

    def failure(self) -> None:
        self._consecutive += 1
        if self._consecutive >= self.failures:
            self._open_until = time.monotonic() + self.cooldown
            metrics.CIRCUIT_OPEN.labels(self.name).set(1)
            log.warning("upstream circuit opened", extra={"fields": {
                "upstream": self.name, "cooldown_s": self.cooldown}})


class Upstream:
    """A remote binary cache: a `readthrough.Source`. Used as an async context manager, which
    owns its HTTP session."""

    kind = "upstream"

    def __init__(self, url: str, timeouts: Timeouts, circuit_failures: int = 3,
                 circuit_cooldown: float = 30.0) -> None:
        self.url = url.rstrip("/") + "/"
        self.name = urlsplit(url).netloc or url
        self.timeouts = timeouts
        self.breaker = CircuitBreaker(self.name, circuit_failures, circuit_cooldown)
        self._session: aiohttp.ClientSession | None = None
        self._throughput = 0.0

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=CONNECTIONS_PER_UPSTREAM, ttl_dns_cache=300,
                                         enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False,
            headers={"User-Agent": "flox-node-cache"},
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeouts.connect,
                                          sock_read=self.timeouts.read))

    async def close(self) -> None:
        if self._session:
            await self._session.close()

    async def __aenter__(self) -> "Upstream":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _check_circuit(self, kind: str) -> None:
        if self.breaker.is_open:
            metrics.UPSTREAM_ERRORS.labels(self.name, "circuit_open").inc()
            raise UpstreamError(self.name, "circuit_open", "circuit open after repeated errors")

    def _failed(self, kind: str, reason: str, message: str) -> UpstreamError:
        """Count a failed request (its status, if any, was counted already) and trip the breaker."""
        self.breaker.failure()
        metrics.UPSTREAM_ERRORS.labels(self.name, reason).inc()
        return UpstreamError(self.name, reason, message)

    async def get_narinfo(self, hash_part: str) -> str | None:
        """The narinfo text, or None when this upstream does not have the path."""
        assert self._session is not None
        self._check_circuit("narinfo")
        start = time.monotonic()
        try:
            async with asyncio.timeout(self.timeouts.narinfo):
                async with self._session.get(self.url + f"{hash_part}.narinfo") as resp:
                    metrics.UPSTREAM_REQUESTS.labels(self.name, "narinfo", resp.status).inc()
                    if resp.status in NOT_HERE:
                        self.breaker.success()
                        return None
                    if resp.status != 200:
                        raise self._failed("narinfo", "status", f"HTTP {resp.status}")
                    body = await _read_limited(resp, MAX_NARINFO_BYTES + 1)
        except TimeoutError:
            raise self._failed("narinfo", "timeout", "narinfo request timed out") from None
        except aiohttp.ClientError as e:
            raise self._failed("narinfo", "connection", f"{type(e).__name__}: {e}") from None
        finally:
            metrics.UPSTREAM_DURATION.labels(self.name, "narinfo").observe(
                time.monotonic() - start)
        self.breaker.success()
        metrics.UPSTREAM_BYTES.labels(self.name).inc(len(body))
        if len(body) > MAX_NARINFO_BYTES:
            raise self._malformed("narinfo larger than 1 MiB")
        try:
            return body.decode()
        except UnicodeDecodeError:
            raise self._malformed("narinfo is not UTF-8") from None

    def _malformed(self, message: str) -> UpstreamError:
        # Unusable data, not a fault of the connection: no breaker trip, but counted as a
        # verification failure like any other malformed narinfo.
        metrics.VERIFY_FAILURES.labels("malformed").inc()
        metrics.UPSTREAM_ERRORS.labels(self.name, "malformed").inc()
        return UpstreamError(self.name, "malformed", message)

    @asynccontextmanager
    async def nar(self, url: str) -> AsyncIterator[AsyncIterator[bytes]]:
        """Stream a NAR file: `async with up.nar(url) as chunks: async for c in chunks: ...`."""
        assert self._session is not None
        self._check_circuit("nar")
        full = urljoin(self.url, url)
        try:
            resp = await self._session.get(full)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise self._failed("nar", "connection", f"{type(e).__name__}: {e}") from None
        metrics.UPSTREAM_REQUESTS.labels(self.name, "nar", resp.status).inc()
        try:
            if resp.status != 200:
                reason = "not_found" if resp.status in NOT_HERE else "status"
                raise self._failed("nar", reason, f"HTTP {resp.status} for {url}")
            yield self._body(resp)
        finally:
            resp.release()

    async def _body(self, resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        start = time.monotonic()
        received = 0
        try:
            while True:
                chunk = await resp.content.read(CHUNK)
                if not chunk:
                    break
                received += len(chunk)
                metrics.UPSTREAM_BYTES.labels(self.name).inc(len(chunk))
                elapsed = time.monotonic() - start
                if elapsed > self.timeouts.read and received / elapsed < self.timeouts.min_rate:
                    raise self._failed("nar", "slow", f"body slower than "
                                       f"{self.timeouts.min_rate:.0f} B/s")
                yield chunk
        except TimeoutError:
            raise self._failed("nar", "timeout", "NAR body stalled") from None
        except aiohttp.ClientPayloadError as e:
            raise self._failed("nar", "truncated", f"NAR body broken: {e}") from None
        except aiohttp.ClientError as e:
            raise self._failed("nar", "connection", f"{type(e).__name__}: {e}") from None
        elapsed = time.monotonic() - start
        metrics.UPSTREAM_DURATION.labels(self.name, "nar").observe(elapsed)
        self.breaker.success()
        if received > 1 << 20 and elapsed > 0:
            rate = received / elapsed
            self._throughput = rate if not self._throughput else 0.8 * self._throughput + 0.2 * rate
            metrics.UPSTREAM_THROUGHPUT.labels(self.name).set(self._throughput)

    @property
    def throughput(self) -> float:
        return self._throughput
