"""Zero-copy responses for committed NAR files, with Range support.

uvloop does not implement `loop.sendfile`, so aiohttp's FileResponse falls back to reading
chunks into Python and writing them through the event loop: two copies per byte and buffers per
client. Here the headers go out through aiohttp, then a worker thread runs `os.sendfile` from the
file to the connection's socket, waiting for the socket to drain with poll(2) on its own: the
event loop never sees those bytes. The transport's own buffer is empty before the thread starts
and nothing else writes to the connection until it ends (HTTP/1.1 answers one request at a time);
the thread uses its own duplicate of the socket descriptor (see below).
"""

import asyncio
import contextlib
import os
import select
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiohttp import web

# One thread per transfer in progress; a transfer spends its time blocked in the kernel.
SENDFILE_THREADS = 128
MAX_STEP = 16 << 20
SEND_BUFFER = 4 << 20


class ClientStalled(Exception):
    pass


def _byte_range(request: web.Request, size: int) -> tuple[int, int] | None:
    """(start, end exclusive) of a single satisfiable Range, None for the whole file.

    Raises HTTPRequestRangeNotSatisfiable for a range outside the file."""
    if "Range" not in request.headers:
        return None
    try:
        rng = request.http_range
    except ValueError:
        return None  # a malformed or multi-range header: answer with the whole file
    start, stop = rng.start, rng.stop
    if start is None and stop is None:
        return None
    if start is not None and start < 0:  # suffix: bytes=-N
        start, stop = max(0, size + start), size
    start = start or 0
    stop = size if stop is None else min(stop, size)
    if start >= size or start >= stop:
        raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
    return start, stop


def _widen_send_buffer(sock_fd: int) -> None:
    """Fewer wake-ups per NAR on a Unix socket, whose default send buffer is small. (TCP tunes
    its own buffers; setting SO_SNDBUF there would switch that off.)"""
    with contextlib.suppress(OSError):
        s = socket.socket(fileno=os.dup(sock_fd))
        try:
            if s.family == socket.AF_UNIX and \
                    s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < SEND_BUFFER:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        finally:
            s.close()


def _sendfile_all(sock_fd: int, file_fd: int, offset: int, count: int, timeout: float) -> int:
    """Blocking loop of os.sendfile on a non-blocking socket (runs in a worker thread)."""
    poller = select.poll()
    poller.register(sock_fd, select.POLLOUT)
    sent = 0
    while sent < count:
        try:
            n = os.sendfile(sock_fd, file_fd, offset + sent, min(count - sent, MAX_STEP))
        except BlockingIOError:
            n = -1
        if n == 0:
            raise EOFError("the file is shorter than its size")
        if n > 0:
            sent += n
            continue
        if not poller.poll(timeout * 1000):
            raise ClientStalled(f"client did not read for {timeout:.0f}s")
    return sent


class FileSender:
    """Sends committed files zero-copy; owns the threads that do it (`close` stops them)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=SENDFILE_THREADS,
                                        thread_name_prefix="fnc-sendfile")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def send(self, request: web.Request, path: Path, content_type: str, *,
                   stall_timeout: float = 60.0) -> tuple[web.StreamResponse, int]:
        """Send `path` (honouring Range); returns the response and the body bytes sent."""
        loop = asyncio.get_running_loop()
        fd = await loop.run_in_executor(self._pool, os.open, path, os.O_RDONLY)
        try:
            return await self._send_open(request, fd, content_type, stall_timeout)
        finally:
            os.close(fd)

    async def _send_open(self, request: web.Request, fd: int, content_type: str,
                         stall_timeout: float) -> tuple[web.StreamResponse, int]:
        size = os.fstat(fd).st_size
        span = _byte_range(request, size)
        start, stop = span or (0, size)
        resp = web.StreamResponse(status=206 if span else 200, headers={
            "Content-Type": content_type, "Accept-Ranges": "bytes",
            "Content-Length": str(stop - start)})
        if span:
            resp.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
        await resp.prepare(request)
        if request.method == "HEAD" or stop == start:
            return resp, 0
        transport = request.transport
        sock = transport.get_extra_info("socket") if transport else None
        if transport is None or sock is None:
            raise ConnectionResetError("client went away")
        while transport.get_write_buffer_size():  # headers still queued in the transport
            await asyncio.sleep(0.001)
        # The thread writes to a duplicate of the socket: if the client goes away and the
        # transport closes its descriptor, the number may be reused by a new connection at
        # once, and bytes must never land there.
        sock_fd = os.dup(sock.fileno())
        try:
            _widen_send_buffer(sock_fd)
            sent = await asyncio.get_running_loop().run_in_executor(
                self._pool, _sendfile_all, sock_fd, fd, start, stop - start, stall_timeout)
        except (OSError, ClientStalled, EOFError):
            transport.abort()  # a half-sent body must not look complete
            raise
        finally:
            os.close(sock_fd)
        await resp.write_eof()
        return resp, sent
