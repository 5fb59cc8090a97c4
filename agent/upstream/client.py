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
from prometheus_client import Counter, Gauge, Histogram

from agent import metrics

log = logging.getLogger(__name__)
NOT_HERE = {404, 403, 410}
MAX_NARINFO = 1 << 20
CHUNK = 256 * 1024


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
    """Opens after `failures` consecutive errors; lets one trial through after `cooldown`.
    `gauge` is the metric family whose `name` series shows the state (upstreams by default)."""

    def __init__(self, name: str, failures: int, cooldown: float,
                 gauge: Gauge = metrics.CIRCUIT_OPEN) -> None:
        self.name, self.failures, self.cooldown = name, failures, cooldown
        self._consecutive = 0
        self._open_until = 0.0
        self._gauge = gauge.labels(name)
        self._gauge.set(0)

    @property
    def is_open(self) -> bool:
        return time.monotonic() < self._open_until

    def success(self) -> None:
        self._consecutive = 0
        self._open_until = 0.0
        self._gauge.set(0)

    def failure(self) -> None:
        self._consecutive += 1
        if self._consecutive >= self.failures:
            self.trip()

    def trip(self) -> None:
        """Open now, whatever the count (a source that sent bad data)."""
        self._open_until = time.monotonic() + self.cooldown
        self._gauge.set(1)
        log.warning("circuit opened", extra={"fields": {
            "source": self.name, "cooldown_s": self.cooldown}})


def new_session(timeouts: Timeouts, limit: int = 64,
                headers: dict[str, str] | None = None) -> aiohttp.ClientSession:
    """A client session with the connect and body-silence timeouts (no total: NARs are big)."""
    connector = aiohttp.TCPConnector(limit=limit, ttl_dns_cache=300, enable_cleanup_closed=True)
    return aiohttp.ClientSession(
        connector=connector, auto_decompress=False,
        headers={"User-Agent": "flox-node-cache", **(headers or {})},
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeouts.connect,
                                      sock_read=timeouts.read))


@dataclass(frozen=True)
class SourceMetrics:
    """The metric families a source reports to (upstreams and peers have their own)."""
    requests: Counter
    errors: Counter
    duration: Histogram
    received: Counter
    circuit: Gauge
    throughput: Gauge | None = None


UPSTREAM_METRICS = SourceMetrics(metrics.UPSTREAM_REQUESTS, metrics.UPSTREAM_ERRORS,
                                 metrics.UPSTREAM_DURATION, metrics.UPSTREAM_BYTES,
                                 metrics.CIRCUIT_OPEN, metrics.UPSTREAM_THROUGHPUT)


class Upstream:
    kind = "upstream"  # the `source` label of lookups and served bytes
    stream_unverified = True  # clients may read a NAR before the whole file is verified

    def __init__(self, url: str, timeouts: Timeouts, circuit_failures: int = 3,
                 circuit_cooldown: float = 30.0, source_metrics: SourceMetrics = UPSTREAM_METRICS
                 ) -> None:
        self.url = url.rstrip("/") + "/"
        self.name = urlsplit(url).netloc or url
        self.timeouts = timeouts
        self.m = source_metrics
        self.breaker = CircuitBreaker(self.name, circuit_failures, circuit_cooldown,
                                      source_metrics.circuit)
        self._session: aiohttp.ClientSession | None = None
        self._throughput = 0.0

    async def start(self) -> None:
        self._session = new_session(self.timeouts)

    async def close(self) -> None:
        if self._session:
            await self._session.close()

    def _headers(self) -> dict[str, str]:
        """Headers of every request (a peer adds its token)."""
        return {}

    def _absent(self, resp: aiohttp.ClientResponse) -> bool:
        """Whether a narinfo response means "not here" rather than an error."""
        return resp.status in NOT_HERE

    def _check_circuit(self, kind: str) -> None:
        if self.breaker.is_open:
            self.m.errors.labels(self.name, "circuit_open").inc()
            raise UpstreamError(self.name, "circuit_open", "circuit open after repeated errors")

    def _status_error(self, resp: aiohttp.ClientResponse, kind: str,
                      message: str) -> UpstreamError:
        """An unexpected status: a failure of this source."""
        reason = "not_found" if kind == "nar" and resp.status in NOT_HERE else "status"
        return self._failed(kind, reason, message)

    def _failed(self, kind: str, reason: str, message: str) -> UpstreamError:
        """Count a failed request (its status, if any, was counted already) and trip the breaker."""
        self.breaker.failure()
        self.m.errors.labels(self.name, reason).inc()
        return UpstreamError(self.name, reason, message)

    async def get_narinfo(self, hash_part: str,
                          headers: dict[str, str] | None = None) -> str | None:
        """The narinfo text, or None when this upstream does not have the path."""
        assert self._session is not None
        self._check_circuit("narinfo")
        start = time.monotonic()
        try:
            async with asyncio.timeout(self.timeouts.narinfo):
                async with self._session.get(self.url + f"{hash_part}.narinfo",
                                             headers={**self._headers(), **(headers or {})}
                                             ) as resp:
                    self.m.requests.labels(self.name, "narinfo", resp.status).inc()
                    if self._absent(resp):
                        self.breaker.success()
                        return None
                    if resp.status != 200:
                        raise self._status_error(resp, "narinfo", f"HTTP {resp.status}")
                    body = await _read_limited(resp, MAX_NARINFO + 1)
        except TimeoutError:
            raise self._failed("narinfo", "timeout", "narinfo request timed out") from None
        except aiohttp.ClientError as e:
            raise self._failed("narinfo", "connection", f"{type(e).__name__}: {e}") from None
        finally:
            self.m.duration.labels(self.name, "narinfo").observe(time.monotonic() - start)
        self.breaker.success()
        self.m.received.labels(self.name).inc(len(body))
        if len(body) > MAX_NARINFO:
            raise self._malformed("narinfo larger than 1 MiB")
        try:
            return body.decode()
        except UnicodeDecodeError:
            raise self._malformed("narinfo is not UTF-8") from None

    def _malformed(self, message: str) -> UpstreamError:
        # Unusable data, not a fault of the connection: no breaker trip, but counted as a
        # verification failure like any other malformed narinfo.
        metrics.VERIFY_FAILURES.labels("malformed").inc()
        self.m.errors.labels(self.name, "malformed").inc()
        return UpstreamError(self.name, "malformed", message)

    @asynccontextmanager
    async def nar(self, url: str, offset: int = 0,
                  headers: dict[str, str] | None = None) -> AsyncIterator[AsyncIterator[bytes]]:
        """Stream a NAR file: `async with up.nar(url) as chunks: async for c in chunks: ...`.
        With `offset`, the bytes from there on (a Range request; a 200 is skipped into)."""
        assert self._session is not None
        self._check_circuit("nar")
        full = urljoin(self.url, url)
        sent = {**self._headers(), **(headers or {})}
        if offset:
            sent["Range"] = f"bytes={offset}-"
        try:
            resp = await self._session.get(full, headers=sent)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise self._failed("nar", "connection", f"{type(e).__name__}: {e}") from None
        self.m.requests.labels(self.name, "nar", resp.status).inc()
        try:
            if resp.status not in ((200, 206) if offset else (200,)):
                raise self._status_error(resp, "nar", f"HTTP {resp.status} for {url}")
            yield self._body(resp, skip=offset if resp.status == 200 else 0)
        finally:
            resp.release()

    async def _body(self, resp: aiohttp.ClientResponse, skip: int = 0) -> AsyncIterator[bytes]:
        start = time.monotonic()
        received = 0
        try:
            while True:
                chunk = await resp.content.read(CHUNK)
                if not chunk:
                    break
                received += len(chunk)
                self.m.received.labels(self.name).inc(len(chunk))
                elapsed = time.monotonic() - start
                if elapsed > self.timeouts.read and received / elapsed < self.timeouts.min_rate:
                    raise self._failed("nar", "slow", f"body slower than "
                                       f"{self.timeouts.min_rate:.0f} B/s")
                if skip:
                    chunk, skip = chunk[skip:], max(0, skip - len(chunk))
                    if not chunk:
                        continue
                yield chunk
        except TimeoutError:
            raise self._failed("nar", "timeout", "NAR body stalled") from None
        except aiohttp.ClientPayloadError as e:
            raise self._failed("nar", "truncated", f"NAR body broken: {e}") from None
        except aiohttp.ClientError as e:
            raise self._failed("nar", "connection", f"{type(e).__name__}: {e}") from None
        elapsed = time.monotonic() - start
        self.m.duration.labels(self.name, "nar").observe(elapsed)
        self.breaker.success()
        if received > 1 << 20 and elapsed > 0:
            rate = received / elapsed
            self._throughput = rate if not self._throughput else 0.8 * self._throughput + 0.2 * rate
            if self.m.throughput is not None:
                self.m.throughput.labels(self.name).set(self._throughput)

    @property
    def throughput(self) -> float:
        return self._throughput

    def rejected(self, url: str, reason: str) -> str | None:
        """The caller refused what this source sent for `url` (a narinfo or NAR URL); returns
        a narinfo hash to look up again from the other sources, if worth it. An upstream's
        data is refused and counted by the caller; nothing more to do here."""
        return None
