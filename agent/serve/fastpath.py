"""Narinfo hits answered where the connection reads them, before aiohttp.

A node's Nix asks for a narinfo per store path of a closure, hundreds per pod start, and the
answer is already in memory; aiohttp's request and response machinery costs several times the
lookup. serve/listeners.py hands each read that begins a request to `NarinfoHits.answer` first:
a read that is exactly one `GET` or `HEAD /<hash>.narinfo HTTP/1.1` with plain headers, for a
narinfo this store holds, is answered here, with the headers, request id and metrics the aiohttp
route gives it (serve/cache.py). Anything else (another path, a miss, a body, a partial read,
pipelined requests, HTTP/1.0, `Connection: close`, an unusual header) returns None and goes to
aiohttp byte for byte, as if this did not exist: declining is always correct.
"""

import email.utils
import logging
import time
from collections.abc import Callable

from agent import metrics
from agent.logs import new_request_id
from agent.nix.storepath import is_hash_part
from agent.store.index import NarInfoRow

log = logging.getLogger(__name__)

MAX_HEAD = 8190  # aiohttp's own limit on a request line or header
_SUFFIX = b".narinfo"
_TARGET_LEN = 1 + 32 + len(_SUFFIX)
# Headers whose presence means the request is not a plain one (a body, an upgrade, an expected
# 100-continue): aiohttp answers those.
_DECLINE = frozenset({b"content-length", b"transfer-encoding", b"upgrade", b"expect"})
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789"
                   b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def _plain_headers(lines: list[bytes]) -> bytes | None:
    """The request's X-Request-Id (b"" without one) when every header line is plain and none
    asks for aiohttp; None otherwise."""
    request_id = b""
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not name or not _TOKEN.issuperset(name):
            return None  # obs-fold, a space before the colon, no name
        value = value.strip(b" \t")
        if not value.isascii() or any(c < 0x20 or c == 0x7F for c in value):
            return None
        name = name.lower()
        if name in _DECLINE:
            return None
        if name == b"connection" and value.lower() != b"keep-alive":
            return None
        if name == b"x-request-id":
            request_id = value
    return request_id


class _Date:
    """The Date header's value, formatted once a second."""

    def __init__(self) -> None:
        self._second = 0
        self._value = b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = email.utils.formatdate(now, usegmt=True).encode()
        return self._value


class NarinfoHits:
    """Answers committed narinfo requests of one listener (`listener` names it in metrics)."""

    def __init__(self, lookup: Callable[[str], NarInfoRow | None], listener: str) -> None:
        self._lookup = lookup
        self._listener = listener
        self._date = _Date()
        self._counters = {m: metrics.HTTP_REQUESTS.labels(listener, "narinfo", m, "200")
                          for m in ("GET", "HEAD")}
        self._timer = metrics.HTTP_DURATION.labels("narinfo")

    def answer(self, data: bytes) -> bytes | None:
        """The whole response to `data` when it is one plain narinfo request for a narinfo
        held here; None to let aiohttp answer it."""
        start = time.monotonic()
        if len(data) > MAX_HEAD or data.find(b"\r\n\r\n") != len(data) - 4:
            return None  # partial, pipelined or too long
        request_line, *lines = data[:-4].split(b"\r\n")
        parts = request_line.split(b" ")
        if len(parts) != 3:
            return None
        method, target, version = parts
        if method not in (b"GET", b"HEAD") or version != b"HTTP/1.1" \
                or len(target) != _TARGET_LEN or not target.endswith(_SUFFIX) \
                or target[:1] != b"/":
            return None
        hash_part = target[1:33].decode("ascii", "replace")
        if not is_hash_part(hash_part):
            return None
        request_id = _plain_headers(lines)
        if request_id is None:
            return None
        row = self._lookup(hash_part)
        if row is None:
            return None  # a miss reads through to the sources, in aiohttp
        body = row.text.encode()
        request_id = request_id or new_request_id().encode()
        head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/x-nix-narinfo\r\n"
                b"Content-Length: %d\r\nDate: %s\r\nX-Request-Id: %s\r\n\r\n"
                % (len(body), self._date(), request_id))
        verb = method.decode()
        self._counters[verb].inc()
        elapsed = time.monotonic() - start
        self._timer.observe(elapsed)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request", extra={"fields": {
                "listener": self._listener, "method": verb, "path": target.decode(),
                "status": 200, "ms": round(elapsed * 1000, 2), "request_id": request_id.decode()}})
        return head if verb == "HEAD" else head + body
