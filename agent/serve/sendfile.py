"""Zero-copy responses for committed NAR files, with Range support.

uvloop does not implement `loop.sendfile`, so aiohttp's FileResponse falls back to reading
chunks into Python and writing them through the event loop: two copies per byte and buffers per
client. Here the headers go out first (through aiohttp; on the fast path held back with
MSG_MORE, so that they leave with the body's first bytes), then `os.sendfile` copies from the
file to the connection's non-blocking socket, in steps. As in nginx, a step runs in the event
loop itself when the file's pages are in memory (a probe that fails rather than wait for the
disk says so): a hand-off to a thread costs more CPU than such a copy. The fast path sends the
first step in the very callback that read the request (`send_ready`), so a NAR the socket's
buffer takes whole, most of them, needs no task and no wait. A step whose pages are
not in memory runs in a worker thread, so the event loop never waits for the disk. Between steps
the event loop waits (add_writer, no thread) for the client to read more, unless the socket took
a whole step (then the other connections get their turn first, as nginx's posted events): the
event loop never sees the bytes, and a client that stops reading holds no thread; after
`stall_timeout` seconds without progress its transfer is dropped. The transport's own buffer is
empty before sending starts and nothing else writes to the connection until it ends (HTTP/1.1
answers one request at a time); the sends use their own duplicate of the socket descriptor
(`duplicate`).
"""

import asyncio
import contextlib
import os
import select
import socket
import struct
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from agent import metrics

# Threads copy only while a client's socket has room; waiting for a client happens in the event
# loop, so clients that stop reading hold no thread.
SEND_THREADS = 32
MAX_STEP = 16 << 20
# A step in the event loop; between steps other connections get their turn. nginx's
# sendfile_max_chunk: at 1 MiB a NAR of the ml closure took 2.2 sendfiles (and as many probes and
# loop turns), at 2 MiB 1.6, as many as nginx.
LOOP_STEP = 2 << 20
# A client that keeps up makes room within this; the thread waits that long rather than hand
# back to the event loop on every drained buffer. Longer waits happen in the loop, threadless.
BRIEF_WAIT_MS = 20
SEND_BUFFER = 4 << 20
_PROBE = bytearray(1)  # written only by the event loop's thread


class ClientStalled(Exception):
    pass


def _stalled(timeout: float) -> ClientStalled:
    metrics.STALLED_SENDS.inc()
    return ClientStalled(f"client read nothing for {timeout:.0f}s")


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


def _widen_send_buffer(sock: socket.socket) -> None:
    """Fewer wake-ups per NAR on a Unix socket, whose default send buffer is small. (TCP tunes
    its own buffers; setting SO_SNDBUF there would switch that off.)"""
    if sock.family == socket.AF_UNIX:
        with contextlib.suppress(OSError):
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < SEND_BUFFER:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)


def _in_memory(fd: int, offset: int) -> bool:
    """Whether the page of `fd` holding `offset` is in the page cache: a one-byte read that
    fails instead of waiting for the disk. (Files are read whole when they are committed and
    evicted whole, so one page stands for a step; a wrong guess costs one step's disk read.)"""
    try:
        return os.preadv(fd, [_PROBE], offset, os.RWF_NOWAIT) == 1
    except OSError:  # EAGAIN: on disk; EOPNOTSUPP: a filesystem that cannot say
        return False


def _send_step(sock_fd: int, file_fd: int, offset: int, count: int) -> int:
    """One os.sendfile of at most LOOP_STEP bytes, as much as the socket takes right now."""
    try:
        n = os.sendfile(sock_fd, file_fd, offset, min(count, LOOP_STEP))
    except BlockingIOError:
        return 0
    if n == 0:
        raise EOFError("the file is shorter than its size")
    return n


def _send_available(sock_fd: int, file_fd: int, offset: int, count: int) -> int:
    """os.sendfile until `count` bytes are out or the client has not made room for BRIEF_WAIT_MS
    (a worker thread; the socket is non-blocking)."""
    poller = select.poll()
    poller.register(sock_fd, select.POLLOUT)
    sent = 0
    while sent < count:
        try:
            n = os.sendfile(sock_fd, file_fd, offset + sent, min(count - sent, MAX_STEP))
        except BlockingIOError:
            if poller.poll(BRIEF_WAIT_MS):
                continue
            break
        if n == 0:
            raise EOFError("the file is shorter than its size")
        sent += n
    return sent


class _Room:
    """Waits in the event loop, holding no thread, until a client has read some of what was
    sent to it (`wait`; ClientStalled after `timeout` seconds without that). The socket stays
    watched from the first wait until `stop`: uvloop closes its poll handle on every
    remove_writer, and a registration per wait cost about six epoll_ctl calls. Watched
    (level-triggered) while full, a socket wakes nothing until it has room; with room, only
    while its sender steps aside for one loop turn."""

    def __init__(self, sock_fd: int, timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._fd, self._timeout = sock_fd, timeout
        self._waiter: asyncio.Future[bool] | None = None
        self._watching = False

    def _answer(self, room: bool) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(room)

    async def wait(self) -> None:
        if not self._watching:
            self._loop.add_writer(self._fd, self._answer, True)
            self._watching = True
        self._waiter = self._loop.create_future()
        # A timer of its own rather than asyncio.wait_for: this runs once per step of a send.
        timer = self._loop.call_later(self._timeout, self._answer, False)
        try:
            if not await self._waiter:
                raise _stalled(self._timeout)
        finally:
            timer.cancel()
            self._waiter = None

    def stop(self) -> None:
        """Stop watching: before a worker thread sends (a socket with room would wake the loop
        on every turn meanwhile), and once the send is over, before its descriptor closes."""
        if self._watching:
            self._loop.remove_writer(self._fd)
            self._watching = False


def abort(transport: asyncio.BaseTransport) -> None:
    """Break off a half-sent response with a reset, so that it cannot look complete, and so
    that the kernel drops what is still queued instead of holding it (and its memory) until a
    stalled client reads it."""
    sock = transport.get_extra_info("socket")
    if sock is not None and not transport.is_closing():
        # (ValueError: uvloop's socket object once the transport has let its descriptor go)
        with contextlib.suppress(OSError, AttributeError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def _headers_sent(transport: asyncio.Transport, timeout: float) -> None:
    """Wait until the transport's buffer (the headers) is out, so the body follows them."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while transport.get_write_buffer_size():
        if loop.time() > deadline:
            raise _stalled(timeout)
        await asyncio.sleep(0.001)


async def write_or_stall(resp: web.StreamResponse, data: bytes, timeout: float) -> None:
    """resp.write, or ClientStalled when the client reads nothing for `timeout` seconds (a
    write waits for the transport to drain)."""
    try:
        async with asyncio.timeout(timeout):
            await resp.write(data)
    except TimeoutError:
        raise _stalled(timeout) from None


def _send_some(out: socket.socket, data: bytes, flags: int) -> int:
    try:
        return out.send(data, flags)
    except BlockingIOError:
        return 0


_TCP = (socket.AF_INET.value, socket.AF_INET6.value)


def _head_flags(out: socket.socket) -> int:
    # The family as _socket's int: socket.socket's property makes an IntEnum of it on every
    # call (1.5 us, per NAR).
    return socket.MSG_MORE if super(socket.socket, out).family in _TCP else 0


async def _send_head(out: socket.socket, head: bytes, stall_timeout: float) -> None:
    """The response's headers, on a TCP socket held back (MSG_MORE) to leave in one segment
    with the body's first bytes, as nginx's tcp_nopush does: a segment of their own cost the
    event loop a loopback delivery per NAR (9 % of its samples in a py-spy profile)."""
    room = _Room(out.fileno(), stall_timeout)
    try:
        while head := head[_send_some(out, head, _head_flags(out)):]:
            await room.wait()
    finally:
        room.stop()


async def _send_in_thread(pool: ThreadPoolExecutor, sock_fd: int, file_fd: int, offset: int,
                          count: int) -> int:
    """_send_available in a worker thread; the bytes it sent."""
    sending = asyncio.get_running_loop().run_in_executor(
        pool, _send_available, sock_fd, file_fd, offset, count)
    try:
        return await asyncio.shield(sending)
    except asyncio.CancelledError:
        # The caller closes both descriptors next; a number closed under a running send could
        # be reused at once by another file or connection.
        await asyncio.wait([sending])
        if not sending.cancelled():
            sending.exception()  # retrieved: the client is gone, so is any error's point
        raise


async def _send_steps(pool: ThreadPoolExecutor, sock_fd: int, file_fd: int, offset: int,
                      count: int, stall_timeout: float) -> None:
    """Send `count` bytes from `offset`: steps whose pages are in memory in the event loop,
    the others in worker threads; waiting for room in the loop."""
    room = _Room(sock_fd, stall_timeout)
    sent = 0
    try:
        while sent < count:
            at, left = offset + sent, count - sent
            step = min(left, LOOP_STEP)
            if _in_memory(file_fd, at + step - 1):
                n = _send_step(sock_fd, file_fd, at, left)
            else:
                room.stop()
                step, n = left, await _send_in_thread(pool, sock_fd, file_fd, at, left)
            sent += n
            if sent == count:
                break
            if n == step:  # the socket took a whole step and likely has room: others first
                await asyncio.sleep(0)
            else:  # the client has not read what was sent yet
                await room.wait()
    finally:
        room.stop()


def duplicate(transport: asyncio.BaseTransport) -> socket.socket:
    """A duplicate of an open transport's socket to send on. Sends never use the transport's
    own descriptor: if the client goes away and the transport closes it (during a wait, or
    under a thread), its number may be reused by a new connection at once, and bytes must never
    land there. Its owner closes it once no send uses it."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        raise ConnectionResetError("client went away")
    out = socket.socket(sock.family, sock.type, sock.proto, fileno=os.dup(sock.fileno()))
    _widen_send_buffer(out)
    return out


def send_ready(out: socket.socket, head: bytes, fd: int, offset: int, count: int) \
        -> tuple[bytes, int]:
    """Send, from the event loop and without waiting, what the socket takes now of `head` and
    then of one step of `count` bytes of `fd` from `offset`, if its pages are in memory:
    (what is left of the head, body bytes sent). Most NARs fit a socket's buffer, and go out
    whole here, with no task or wait. Raises OSError or EOFError as a step does."""
    if head:
        head = head[_send_some(out, head, _head_flags(out)):]
        if head:
            return head, 0
    step = min(count, LOOP_STEP)
    if not step or not _in_memory(fd, offset + step - 1):
        return head, 0
    return head, _send_step(out.fileno(), fd, offset, count)


class FileSender:
    """Sends committed files zero-copy; owns the threads that send them (`close` stops
    them). A client that reads nothing for `stall_timeout` seconds is dropped."""

    def __init__(self, stall_timeout: float = 60.0) -> None:
        self.stall_timeout = stall_timeout
        self._send_pool = ThreadPoolExecutor(SEND_THREADS, thread_name_prefix="fnc-sendfile")

    def close(self) -> None:
        self._send_pool.shutdown(wait=False, cancel_futures=True)

    async def send_body(self, transport: asyncio.Transport, fd: int, offset: int,
                        count: int, out: socket.socket | None = None, head: bytes = b"") -> None:
        """Send `head` (headers the caller did not write to `transport`) and `count` bytes of
        `fd` from `offset`, once what was written to `transport` is out; on `out`, the
        connection's duplicate (`duplicate`), or one made for this send. On a failure the
        connection is reset (a half-sent body must not look complete) and the error raised."""
        try:
            await _headers_sent(transport, self.stall_timeout)
            if transport.is_closing():  # its descriptor's number may belong to another now
                raise ConnectionResetError("client went away")
            own = out is None
            out = duplicate(transport) if out is None else out
            try:
                if head:
                    await _send_head(out, head, self.stall_timeout)
                await _send_steps(self._send_pool, out.fileno(), fd, offset, count,
                                  self.stall_timeout)
            finally:
                if own:
                    out.close()
        except (OSError, ClientStalled, EOFError):
            abort(transport)
            raise

    async def send_request_body(self, request: web.Request, fd: int, offset: int,
                                count: int) -> None:
        """`send_body` on the request's connection, once its response is prepared."""
        if request.transport is None:
            raise ConnectionResetError("client went away")
        await self.send_body(request.transport, fd, offset, count)

    async def send(self, request: web.Request, fd: int, size: int, content_type: str) \
            -> tuple[web.StreamResponse, int]:
        """Send the `size` bytes of open file `fd` (honouring Range); returns the response and
        the body bytes sent."""
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
        await self.send_request_body(request, fd, start, stop - start)
        await resp.write_eof()
        return resp, stop - start
