"""Cache hits answered where the connection reads them, before aiohttp.

A node's Nix asks for a narinfo and a NAR per store path of a closure, hundreds per pod start,
and a hit needs only a lookup in memory or a sendfile; aiohttp's request and response machinery
costs more than either. serve/listeners.py offers each read that begins a request to
`Hits.answer` first: a read that is exactly one plain `GET`/`HEAD /<hash>.narinfo` or
`GET /nar/<file>` over HTTP/1.1, for a narinfo or a committed NAR this store holds, is answered
here, with the headers, request id, metrics and savings the aiohttp routes give it
(serve/cache.py). Anything else (another path, a miss, a NAR being fetched, a Range, a body, a
partial read, pipelined requests, HTTP/1.0, `Connection: close`, an unusual header) returns None
and goes to aiohttp byte for byte, as if this did not exist: declining is always correct.
"""

import asyncio
import email.utils
import logging
import os
import re
import time
from dataclasses import dataclass

from agent.logs import new_request_id
from agent.nix.storepath import is_hash_part
from agent.readthrough import NarHandle, ReadThrough
from agent.serve.observe import Answers
from agent.serve.sendfile import ClientStalled, FileSender
from agent.store import access
from agent.store.layout import is_nar_file

log = logging.getLogger(__name__)

MAX_HEAD = 8190  # aiohttp's own limit on a request line or header
_SUFFIX = b".narinfo"
_NARINFO_TARGET_LEN = 1 + 32 + len(_SUFFIX)
_NAR_PREFIX = b"/nar/"
# Headers whose presence means the request is not a plain one (a body, an upgrade, an expected
# 100-continue, part of a file): aiohttp answers those.
_DECLINE = frozenset({b"content-length", b"transfer-encoding", b"upgrade", b"expect",
                      b"range", b"if-range"})
_UNSAFE = re.compile(rb"[^\t\x20-\x7e]")  # controls and non-ASCII in a header value
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
        if _UNSAFE.search(value):
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


@dataclass(frozen=True)
class _Request:
    method: bytes
    target: bytes
    request_id: bytes  # the client's X-Request-Id, b"" without one


def _plain_request(data: bytes) -> _Request | None:
    """`data` as one plain GET or HEAD request with no body, or None."""
    if len(data) > MAX_HEAD or data.find(b"\r\n\r\n") != len(data) - 4:
        return None  # partial, pipelined or too long
    request_line, *lines = data[:-4].split(b"\r\n")
    parts = request_line.split(b" ")
    if len(parts) != 3:
        return None
    method, target, version = parts
    if method not in (b"GET", b"HEAD") or version != b"HTTP/1.1" or target[:1] != b"/":
        return None
    request_id = _plain_headers(lines)
    return None if request_id is None else _Request(method, target, request_id)


class NarSend:
    """A committed NAR to send on a connection: `run` writes the response and holds the NAR's
    handle (in use, access, savings) until the last byte is out."""

    def __init__(self, hits: "Hits", handle: NarHandle, request_id: bytes, start: float) \
            -> None:
        self._hits, self._handle, self._request_id, self._start = hits, handle, request_id, start

    async def run(self, transport: asyncio.Transport) -> None:
        handle, hits = self._handle, self._hits
        assert handle.path is not None
        async with handle:
            fd = access.open_fd(handle.path)
            try:
                size = os.fstat(fd).st_size
                head = hits.head(b"application/x-nix-nar", size, self._request_id,
                                 b"Accept-Ranges: bytes\r\n")
                await hits.sender.send_body(transport, fd, 0, size, head)
                handle.served = size
            except (OSError, ClientStalled, EOFError) as e:
                log.info("local nar send aborted", extra={"fields": {
                    "file": handle.row.file, "error": str(e)}})
                hits.answers.record("nar", "GET", 500, self._start, "/" + handle.row.file,
                                     self._request_id)
                return
            finally:
                os.close(fd)
        hits.answers.record("nar", "GET", 200, self._start, "/" + handle.row.file,
                                 self._request_id)


class Hits:
    """Answers the narinfo and committed-NAR hits of one listener (`listener` names it in
    metrics)."""

    def __init__(self, readthrough: ReadThrough, sender: FileSender, listener: str) -> None:
        self._readthrough = readthrough
        self.sender = sender
        self.answers = Answers(listener)
        self._date = _Date()

    def answer(self, data: bytes) -> bytes | NarSend | None:
        """For one plain request held here: the whole response of a narinfo, or the NarSend of
        a NAR; None to let aiohttp answer it."""
        start = time.monotonic()
        request = _plain_request(data)
        if request is None:
            return None
        target = request.target
        if len(target) == _NARINFO_TARGET_LEN and target.endswith(_SUFFIX):
            return self._narinfo(request, start)
        if target.startswith(_NAR_PREFIX) and request.method == b"GET":
            file = target[1:].decode("ascii", "replace")
            handle = self._readthrough.local_nar(file) if is_nar_file(file) else None
            if handle is not None:
                return NarSend(self, handle, request.request_id or new_request_id().encode(),
                               start)
        return None

    def _narinfo(self, request: _Request, start: float) -> bytes | None:
        hash_part = request.target[1:33].decode("ascii", "replace")
        row = self._readthrough.local_narinfo(hash_part) if is_hash_part(hash_part) else None
        if row is None:
            return None  # a miss reads through to the sources, in aiohttp
        body = row.text.encode()
        request_id = request.request_id or new_request_id().encode()
        head = self.head(b"text/x-nix-narinfo", len(body), request_id)
        verb = request.method.decode()
        self.answers.record("narinfo", verb, 200, start, request.target.decode(), request_id)
        return head if verb == "HEAD" else head + body

    def head(self, content_type: bytes, length: int, request_id: bytes,
             extra: bytes = b"") -> bytes:
        return (b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s"
                b"Date: %s\r\nX-Request-Id: %s\r\n\r\n"
                % (content_type, length, extra, self._date(), request_id))
