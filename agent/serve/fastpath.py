"""Cache hits answered where the connection reads them, before aiohttp.

A node's Nix asks for a narinfo and a NAR per store path of a closure, hundreds per pod start,
and a hit needs only a lookup in memory or a sendfile; aiohttp's request and response machinery
costs more than either. serve/listeners.py offers each read that begins a request to
`Hits.answer` first: a read that is exactly one plain `GET`/`HEAD /<hash>.narinfo` or
`GET /nar/<file>` over HTTP/1.1, for a narinfo or a committed NAR this store holds, is answered
here, with the headers, request id, metrics and savings the aiohttp routes give it
(serve/cache.py); a NAR's first bytes go out in the same callback (`NarSend.start`). Anything
else (another path, a miss, a NAR being fetched or whose file is gone, a Range, a body, a
partial read, pipelined requests, HTTP/1.0, `Connection: close`, an unusual header) returns None
and goes to aiohttp byte for byte, as if this did not exist: declining is always correct.
"""

import asyncio
import email.utils
import logging
import os
import re
import socket
import time

from agent.logs import new_request_id
from agent.nix.storepath import is_hash_part
from agent.readthrough import NarHandle, ReadThrough
from agent.serve.observe import Answers
from agent.serve.sendfile import ClientStalled, FileSender, send_ready
from agent.store.layout import is_nar_file

log = logging.getLogger(__name__)

MAX_HEAD = 8190  # aiohttp's own limit on a request line or header
_SUFFIX = b".narinfo"
_NARINFO_TARGET_LEN = 1 + 32 + len(_SUFFIX)
_NAR_PREFIX = b"/nar/"
# One plain request: its line, then header lines with a token for a name, no space before the
# colon and printable ASCII values (no obs-fold, controls or non-ASCII), then the blank line
# and nothing after it (a partial read, pipelining and bare LFs do not match). One regex in C:
# parsing the lines in Python cost as much as the rest of a narinfo hit.
_PLAIN = re.compile(rb"(GET|HEAD) (/[!-~]*) HTTP/1\.1\r\n"
                    rb"((?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e]*\r\n)*)\r\n")
# The header lines that decide: those whose presence means the request is not a plain one (a
# body, an upgrade, an expected 100-continue, part of a file), Connection, X-Request-Id.
_NOTED = re.compile(rb"^(content-length|transfer-encoding|upgrade|expect|range|if-range"
                    rb"|connection|x-request-id):[ \t]*([^\r]*?)[ \t]*\r\n",
                    re.IGNORECASE | re.MULTILINE)


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


def _plain_request(data: bytes) -> tuple[bytes, bytes, bytes] | None:
    """`data` as one plain GET or HEAD request with no body: (method, target, the client's
    X-Request-Id or b""); None for anything else."""
    plain = _PLAIN.fullmatch(data) if len(data) <= MAX_HEAD else None
    if plain is None:
        return None
    request_id = b""
    for name, value in _NOTED.findall(data, plain.start(3), plain.end(3)):
        name = name.lower()
        if name == b"x-request-id":
            request_id = request_id or value  # the first, as aiohttp's headers.get
        elif name != b"connection" or value.lower() != b"keep-alive":
            return None
    return plain[1], plain[2], request_id


class NarSend:
    """A committed NAR to send on a connection, its file open and its handle held (in use,
    access) from `Hits.answer` until `finish`, which records the answer (savings, metrics).
    `start` sends what the socket takes at once, all of most NARs; `run` sends the rest."""

    def __init__(self, hits: "Hits", handle: NarHandle, fd: int, size: int, request_id: bytes,
                 start: float) -> None:
        self._hits, self._handle, self._fd, self._size = hits, handle, fd, size
        self._request_id, self._start = request_id, start
        self._head = hits.head(b"application/x-nix-nar", self._size, request_id,
                               b"Accept-Ranges: bytes\r\n")
        self._sent = 0  # body bytes out
        handle.acquire()

    def start(self, out: socket.socket) -> bool:
        """Send what `out` takes now (the connection's buffer is empty); True when the whole
        response is out and finished."""
        try:
            self._head, self._sent = send_ready(out, self._head, self._fd, 0, self._size)
        except (OSError, EOFError) as e:
            self.finish(e)
            raise
        if self._head or self._sent < self._size:
            return False
        self.finish()
        return True

    async def run(self, transport: asyncio.Transport, out: socket.socket) -> None:
        """Send the rest on `out`, then finish; on a failure the connection is reset."""
        try:
            await self._hits.sender.send_body(transport, self._fd, self._sent,
                                              self._size - self._sent, out, self._head)
        except (OSError, ClientStalled, EOFError) as e:
            self.finish(e)
            return
        self._sent = self._size
        self.finish()

    def finish(self, error: BaseException | None = None) -> None:
        """Record the answer (500 after `error`, or when the send never completed), close the
        file and release the handle; once."""
        if self._fd < 0:
            return
        os.close(self._fd)
        self._fd = -1
        handle = self._handle
        complete = error is None and self._sent == self._size
        handle.served = self._sent if complete else 0
        handle.release()
        if error is not None:
            log.info("local nar send aborted", extra={"fields": {
                "file": handle.row.file, "error": str(error)}})
        self._hits.answers.record("nar", "GET", 200 if complete else 500, self._start,
                                  "/" + handle.row.file, self._request_id)


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
        method, target, request_id = request
        if len(target) == _NARINFO_TARGET_LEN and target.endswith(_SUFFIX):
            return self._narinfo(method, target, request_id, start)
        if target.startswith(_NAR_PREFIX) and method == b"GET":
            return self._nar(target[1:].decode(), request_id, start)
        return None

    def _nar(self, file: str, request_id: bytes, start: float) -> NarSend | None:
        handle = self._readthrough.local_nar(file) if is_nar_file(file) else None
        if handle is None:
            return None  # not committed here: aiohttp's route reads it through
        try:
            fd, size = handle.open()  # the open is the check: no stat before it
        except OSError:
            return None  # lost: aiohttp's route forgets it and fetches it again
        return NarSend(self, handle, fd, size, request_id or new_request_id().encode(), start)

    def _narinfo(self, method: bytes, target: bytes, request_id: bytes, start: float) \
            -> bytes | None:
        hash_part = target[1:33].decode()
        row = self._readthrough.local_narinfo(hash_part) if is_hash_part(hash_part) else None
        if row is None:
            return None  # a miss reads through to the sources, in aiohttp
        body = row.text.encode()
        request_id = request_id or new_request_id().encode()
        head = self.head(b"text/x-nix-narinfo", len(body), request_id)
        verb = method.decode()
        self.answers.record("narinfo", verb, 200, start, target.decode(), request_id)
        return head if verb == "HEAD" else head + body

    def head(self, content_type: bytes, length: int, request_id: bytes,
             extra: bytes = b"") -> bytes:
        return (b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s"
                b"Date: %s\r\nX-Request-Id: %s\r\n\r\n"
                % (content_type, length, extra, self._date(), request_id))
