"""One list+watch loop for every resource the agent follows (an informer without a cache).

List (paginated) gives the full state and a resourceVersion; the watch continues from it with
bookmarks on, so a dropped stream resumes from the last resourceVersion seen and no event is
lost. 410 Gone (history compacted) means the gap cannot be replayed: relist and let the
handler diff the full state against what it knew. Errors back off exponentially with jitter;
a stream that closes immediately also backs off, so a misbehaving proxy cannot cause a busy
loop.
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
    page_size: int = 500
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    min_stream_seconds: float = 1.0  # a stream ending sooner without events backs off


class Gone(Exception):
    """410: the resourceVersion is older than the server's history."""


class ApiStatusError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status


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
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # set after the first resync
    rv: str | None = None

    async def run(self) -> NoReturn:
        backoff = Backoff(self.options.backoff_base, self.options.backoff_cap)
        while True:
            reason, pause = await self._cycle(backoff)
            KUBE_WATCH_RESTARTS.labels(resource=self.resource, reason=reason).inc()
            if pause:
                await asyncio.sleep(backoff.next_delay())

    async def _cycle(self, backoff: Backoff) -> tuple[str, bool]:
        """List if needed, then watch once; returns (restart reason, whether to back off)."""
        try:
            if self.rv is None:
                await self._relist()
            started = time.monotonic()
            events = await self._watch_once()
        except asyncio.CancelledError:
            raise
        except Gone:
            log.info("watch expired, relisting", extra={"fields": {"resource": self.resource}})
            self.rv = None
            return "expired", False
        except Exception as e:
            log.warning("watch failed: %s", e, extra={"fields": {"resource": self.resource}})
            return "error", True
        quick = events == 0 and time.monotonic() - started < self.options.min_stream_seconds
        if not quick:
            backoff.reset()
        return "closed", quick

    async def _relist(self) -> None:
        items, rv = await self._list()
        await self._call(self.handler.resync(items))
        self.rv = rv
        self.ready.set()

    async def _list(self) -> tuple[list[Obj], str]:
        items: list[Obj] = []
        cont: str | None = None
        while True:
            kw = dict(self.params, limit=self.options.page_size)
            if cont:
                kw["_continue"] = cont
            resp = await self.list_fn(**kw, _preload_content=False,
                                      _request_timeout=aiohttp.ClientTimeout(total=60))
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
            # guard against a half-open connection the server can no longer close
            _request_timeout=aiohttp.ClientTimeout(sock_connect=30, sock_read=timeout + 30))
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
            _raise_status(int(obj.get("code") or 500), json.dumps(obj))
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
        _raise_status(resp.status, raw.decode(errors="replace"))
    return json.loads(raw)


def _raise_status(status: int, body: str) -> NoReturn:
    if status == 410:
        raise Gone(body)
    raise ApiStatusError(status, body)
