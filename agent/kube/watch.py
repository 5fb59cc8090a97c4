"""One list+watch loop for every resource the agent follows (an informer without a cache).

List gives the full state and a resourceVersion; the watch continues from it with bookmarks
on, so a dropped stream resumes from the last resourceVersion seen and no event is lost. Lists
ask for resourceVersion=0 (the API server's watch cache, no quorum read: a slightly old state is
fine, the watch brings it up to date). When that cached state turns out older than the
server's history (the watch from it, or a page, is 410), the next list is a paginated quorum
read. 410 Gone on a later watch (history compacted) means the gap cannot be replayed: relist
and let the handler diff the full state against what it knew.

Errors, 410s and streams that close at once back off exponentially with jitter (as client-go's
reflector does), at least as long as a 429/503's Retry-After says. The server sends a bookmark
about every minute, so a stream silent for `read_timeout` (90-120 s) is dead: it is dropped and
resumed. Every list has a timeout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

import aiohttp

from agent.kube.health import WatcherHealth
from agent.metrics import KUBE_WATCH_RESTARTS

log = logging.getLogger(__name__)

Obj = dict[str, Any]
ListFn = Callable[..., Awaitable[Any]]  # a generated `list_*` API method


class WatchHandler(Protocol):
    async def resync(self, objects: list[Obj]) -> None:
        """The complete current state (after the first list and after every relist)."""

    async def event(self, type_: str, obj: Obj) -> None:
        """One ADDED, MODIFIED or DELETED event."""


@dataclass
class WatchOptions:
    timeout_seconds: int = 300  # server-side end of a watch; we then resume from the last RV
    read_timeout: float = 100.0  # no byte (not even a bookmark) for this long: the stream is dead
    request_timeout: float = 60.0  # a list (one page)
    page_size: int = 500
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    min_stream_seconds: float = 1.0  # a stream ending sooner without events backs off


class Gone(Exception):
    """410: the resourceVersion is older than the server's history."""


class ApiStatusError(Exception):
    def __init__(self, status: int, body: str, retry_after: float = 0.0) -> None:
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status, self.retry_after = status, retry_after


@dataclass
class Backoff:
    base: float
    cap: float
    attempt: int = 0

    def next_delay(self) -> float:
        """Full-ish jitter: uniform in [d/2, d] for d = base * 2^attempt, capped."""
        delay = min(self.cap, self.base * 2 ** self.attempt)
        self.attempt += 1
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.attempt = 0


@dataclass
class ListWatch:
    resource: str  # label for metrics and logs
    list_fn: ListFn
    handler: WatchHandler
    params: dict[str, Any] = field(default_factory=dict)  # selectors etc.
    options: WatchOptions = field(default_factory=WatchOptions)
    health: WatcherHealth | None = None
    rv: str | None = None
    quorum: bool = False  # the next list must not come from the cache (it was too old)

    def __post_init__(self) -> None:
        self.health = self.health or WatcherHealth(self.resource)

    async def run(self) -> NoReturn:
        backoff = Backoff(self.options.backoff_base, self.options.backoff_cap)
        while True:
            reason, wait = await self._cycle(backoff)
            KUBE_WATCH_RESTARTS.labels(resource=self.resource, reason=reason).inc()
            if wait is not None:
                await asyncio.sleep(max(wait, backoff.next_delay()))

    async def _cycle(self, backoff: Backoff) -> tuple[str, float | None]:
        """List if needed, then watch once; returns (restart reason, at least how long to
        wait before the next cycle, or None to go on at once)."""
        assert self.health is not None
        listing = self.rv is None
        try:
            if listing:
                await self._relist()
            started = time.monotonic()
            events = await self._watch_once()
        except asyncio.CancelledError:
            raise
        except Gone:
            log.info("resourceVersion expired, relisting",
                     extra={"fields": {"resource": self.resource}})
            self.quorum = listing  # a cached list was older than the history: read etcd
            self.rv = None
            return "expired", 0.0
        except (TimeoutError, aiohttp.ServerTimeoutError) as e:
            self.health.failed(f"timeout: {str(e) or 'no data'}")
            log.warning("watch timed out", extra={"fields": {"resource": self.resource}})
            return "timeout", 0.0
        except Exception as e:
            self.health.failed(str(e))
            log.warning("watch failed: %s", e, extra={"fields": {"resource": self.resource}})
            return "error", getattr(e, "retry_after", 0.0)
        self.health.watched()
        if events == 0 and time.monotonic() - started < self.options.min_stream_seconds:
            return "closed", 0.0
        backoff.reset()
        return "closed", None

    async def _relist(self) -> None:
        items, rv = await self._list()
        assert self.health is not None
        self.health.listed()
        await self._call(self.handler.resync(items))
        self.rv = rv

    async def _list(self) -> tuple[list[Obj], str]:
        items: list[Obj] = []
        cont: str | None = None
        cached, self.quorum = not self.quorum, False
        while True:
            kw = dict(self.params, limit=self.options.page_size)
            if cont:
                kw["_continue"] = cont
            elif cached:
                kw["resource_version"] = "0"
            resp = await self.list_fn(
                **kw, _preload_content=False,
                _request_timeout=aiohttp.ClientTimeout(total=self.options.request_timeout))
            body = await _read_json(resp)
            items.extend(body.get("items") or [])
            cont = body.get("metadata", {}).get("continue")
            if not cont:
                return items, str(body["metadata"]["resourceVersion"])

    async def _watch_once(self) -> int:
        """Stream events until the server ends the watch; returns how many arrived."""
        timeout = self.options.timeout_seconds
        resp = await self.list_fn(
            **self.params, watch=True, resource_version=self.rv, allow_watch_bookmarks=True,
            timeout_seconds=timeout, _preload_content=False,
            # the server sends bookmarks about every minute: silence this long means dead
            _request_timeout=aiohttp.ClientTimeout(sock_connect=self.options.request_timeout,
                                                   sock_read=self.options.read_timeout))
        count = 0
        try:
            if resp.status != 200:
                await _read_json(resp)  # raises Gone / ApiStatusError
            async for line in _lines(resp.content):
                count += await self._on_line(line)
        finally:
            resp.release()
        return count

    async def _on_line(self, line: bytes) -> int:
        event = json.loads(line)
        type_, obj = event.get("type"), event.get("object") or {}
        if type_ == "ERROR":
            details = obj.get("details") or {}
            _raise_status(int(obj.get("code") or 500), json.dumps(obj),
                          float(details.get("retryAfterSeconds") or 0))
        assert self.health is not None
        self.health.watched()  # an event or a bookmark: the stream is alive
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if type_ == "BOOKMARK":
            self.rv = rv or self.rv
            return 0
        await self._call(self.handler.event(type_, obj))
        self.rv = rv or self.rv
        return 1

    async def _call(self, coro: Awaitable[None]) -> None:
        """A handler bug must not stop the watch (nor replay the event forever)."""
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("handler failed", extra={"fields": {"resource": self.resource}})


async def _lines(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """Newline-delimited lines of any length (readline() caps a line at 128 KiB)."""
    buf = bytearray()
    async for chunk in content.iter_any():
        buf.extend(chunk)
        while (i := buf.find(b"\n")) >= 0:
            line = bytes(buf[:i]).strip()
            del buf[:i + 1]
            if line:
                yield line
    if buf.strip():
        yield bytes(buf).strip()


async def _read_json(resp: Any) -> Obj:
    try:
        raw = await resp.read()
    finally:
        resp.release()
    if resp.status != 200:
        _raise_status(resp.status, raw.decode(errors="replace"),
                      retry_after(resp.headers.get("Retry-After")))
    return json.loads(raw)


def retry_after(header: str | None) -> float:
    """Seconds of a Retry-After header (0 when absent or not a number of seconds)."""
    try:
        return max(0.0, float(header or 0))
    except ValueError:
        return 0.0


def _raise_status(status: int, body: str, wait: float = 0.0) -> NoReturn:
    if status == 410:
        raise Gone(body)
    raise ApiStatusError(status, body, wait)
