"""One aiohttp session per upstream cache, with per-upstream timeouts and a circuit breaker.

404, 403 and 410 mean "not here". Anything else that is not a 200 with a narinfo of the path
asked for (5xx, timeouts, resets, an open circuit, an HTML page from a captive portal, a redirect
to another origin) is an UpstreamError, which the cache answers as 503 and never as 404: a wrong
404 would poison the Nix client's negative cache for an hour.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urljoin

import aiohttp
from prometheus_client import Counter, Gauge, Histogram
from yarl import URL

from agent import metrics
from agent.nix.narinfo import MAX_NARINFO_BYTES, NarInfo, NarInfoError, parse_for

log = logging.getLogger(__name__)
NOT_HERE = {404, 403, 410}
CHUNK = 256 * 1024
CONNECTIONS_PER_UPSTREAM = 64  # also counted in the agent's file-descriptor budget
REDIRECTS = {301, 302, 303, 307, 308}
MAX_REDIRECTS = 5
Origin = tuple[str, str, int | None]


def origin(url: str | URL) -> Origin:
    """scheme, host, port (the scheme's default when not written): what a redirect may keep."""
    u = URL(url) if isinstance(url, str) else url
    return (u.scheme.lower(), (u.host or "").lower(), u.port)


def display_name(url: str) -> str:
    """An upstream's identity in metrics, logs and /readyz: its full URL without a trailing
    slash or credentials (two caches on one host are two upstreams)."""
    return str(URL(url.rstrip("/")).with_user(None))


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


def new_session(timeouts: Timeouts, limit: int = CONNECTIONS_PER_UPSTREAM) \
        -> aiohttp.ClientSession:
    """A client session with the connect and body-silence timeouts (no total: NARs are big)."""
    connector = aiohttp.TCPConnector(limit=limit, ttl_dns_cache=300, enable_cleanup_closed=True)
    return aiohttp.ClientSession(
        connector=connector, auto_decompress=False, headers={"User-Agent": "flox-node-cache"},
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
    """A remote binary cache: a `readthrough.Source`. Used as an async context manager, which
    owns its HTTP session."""

    kind = "upstream"
    stream_unverified = True  # clients may read a NAR before the whole file is verified

    def __init__(self, url: str, timeouts: Timeouts, circuit_failures: int = 3,
                 circuit_cooldown: float = 30.0, redirect_origins: Iterable[str] = (),
                 source_metrics: SourceMetrics = UPSTREAM_METRICS) -> None:
        self.url = url.rstrip("/") + "/"
        self.name = display_name(url)
        # Redirects are followed only to these (a captive portal's login page is not a cache).
        self._origins = {origin(self.url), *map(origin, redirect_origins)}
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

    async def __aenter__(self) -> "Upstream":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def relays(self, hash_part: str) -> bool:
        """An upstream answers for itself: it never asks another agent to fetch."""
        return False

    def rejected(self, url: str, reason: str) -> str | None:
        """The caller refused what this source sent for `url` (a narinfo or NAR URL); returns
        a narinfo hash to look up again from the other sources, if worth it. An upstream's
        data is refused and counted by the caller; nothing more to do here."""
        return None

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

    async def _follow(self, url: str, kind: str,
                      headers: dict[str, str]) -> aiohttp.ClientResponse:
        """GET `url`, following at most MAX_REDIRECTS redirects, each to an allowed origin;
        the caller releases the response."""
        assert self._session is not None
        target = URL(url)
        for _ in range(MAX_REDIRECTS + 1):
            resp = await self._session.get(target, allow_redirects=False, headers=headers)
            self.m.requests.labels(self.name, kind, resp.status).inc()
            location = resp.headers.get("Location")
            if resp.status not in REDIRECTS or not location:
                return resp
            resp.release()
            try:
                target = resp.url.join(URL(location))
            except ValueError:
                raise self._failed(kind, "redirect", "redirect to an invalid URL") from None
            if origin(target) not in self._origins:
                # Only the origin is named: a redirect's query may hold a signed credential.
                raise self._failed(kind, "redirect", f"redirected to {target.origin()}, which "
                                   "is not this upstream's origin (allow it with "
                                   "--upstream-redirect-origin)")
        raise self._failed(kind, "redirect", f"more than {MAX_REDIRECTS} redirects")

    async def get_narinfo(self, hash_part: str,
                          headers: dict[str, str] | None = None) -> NarInfo | None:
        """The narinfo of the path, or None when this upstream does not have it."""
        assert self._session is not None
        self._check_circuit("narinfo")
        start = time.monotonic()
        sent = {**self._headers(), **(headers or {})}
        try:
            async with asyncio.timeout(self.timeouts.narinfo):
                async with await self._follow(self.url + f"{hash_part}.narinfo",
                                              "narinfo", sent) as resp:
                    if self._absent(resp):
                        self.breaker.success()
                        return None
                    if resp.status != 200:
                        raise self._status_error(resp, "narinfo", f"HTTP {resp.status}")
                    body = await _read_limited(resp, MAX_NARINFO_BYTES + 1)
        except TimeoutError:
            raise self._failed("narinfo", "timeout", "narinfo request timed out") from None
        except aiohttp.ClientError as e:
            raise self._failed("narinfo", "connection", f"{type(e).__name__}: {e}") from None
        finally:
            self.m.duration.labels(self.name, "narinfo").observe(time.monotonic() - start)
        self.m.received.labels(self.name).inc(len(body))
        info = self._narinfo(body, hash_part)
        self.breaker.success()
        return info

    def _narinfo(self, body: bytes, hash_part: str) -> NarInfo:
        """A 200 that is not a narinfo of the path (a captive portal's or a proxy's page) is
        an error of this upstream, like a 5xx: never "not here", which Nix would cache."""
        try:
            if len(body) > MAX_NARINFO_BYTES:
                raise NarInfoError("larger than 1 MiB")
            return parse_for(body.decode(), hash_part)
        except (NarInfoError, UnicodeDecodeError) as e:
            metrics.VERIFY_FAILURES.labels("malformed").inc()
            reason = "not UTF-8" if isinstance(e, UnicodeDecodeError) else str(e)
            raise self._failed("narinfo", "malformed",
                               f"answered 200 with something that is not a narinfo of "
                               f"{hash_part} ({reason})") from None

    @asynccontextmanager
    async def nar(self, url: str, offset: int = 0, headers: dict[str, str] | None = None, *,
                  relay: bool = True) -> AsyncIterator[AsyncIterator[bytes]]:
        """Stream a NAR file: `async with up.nar(url) as chunks: async for c in chunks: ...`.
        With `offset`, the bytes from there on (a Range request; a 200 is skipped into).
        `relay` concerns sources that may ask another agent; an upstream never does."""
        assert self._session is not None
        self._check_circuit("nar")
        full = urljoin(self.url, url)
        sent = {**self._headers(), **(headers or {})}
        if offset:
            sent["Range"] = f"bytes={offset}-"
        try:
            resp = await self._follow(full, "nar", sent)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise self._failed("nar", "connection", f"{type(e).__name__}: {e}") from None
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
