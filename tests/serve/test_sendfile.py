"""Sending files on the loop the agent runs (uvloop): steps in the loop and in worker threads,
waits for the reader, stalls, and abort."""

import asyncio
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import uvloop

from agent.serve import sendfile
from agent.serve.sendfile import _in_memory, abort


def test_abort_of_a_transport_that_let_its_socket_go_is_quiet() -> None:
    """A client that left while its NAR was being sent: the transport is already closing and
    uvloop's socket object has no descriptor (setsockopt raises ValueError there)."""

    async def main() -> bool:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        abort(writer.transport)  # a live one: reset
        await asyncio.sleep(0.05)
        abort(writer.transport)  # and again, once uvloop let the descriptor go
        closing = writer.transport.is_closing()
        server.close()
        await server.wait_closed()
        return closing

    assert uvloop.run(main())


SIZE = 12 << 20


def _half_on_disk(tmp_path: Path) -> tuple[int, bytes]:
    """A descriptor of a file whose first half is in the page cache and second half only on
    the disk (a real filesystem: tmpfs pages cannot be dropped), and its bytes."""
    data = os.urandom(SIZE)
    path = tmp_path / "nar"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)  # written back, so that its pages can be dropped
    # The kernel skips pages it cannot drop at that moment (a busy host made this flaky): ask again.
    for _ in range(100):
        os.posix_fadvise(fd, SIZE // 2, 0, os.POSIX_FADV_DONTNEED)
        if not _in_memory(fd, SIZE - 1):
            break
        time.sleep(0.02)
    assert _in_memory(fd, 0) and not _in_memory(fd, SIZE - 1)
    return fd, data


def _pair() -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair()
    for s in (ours, theirs):
        s.setblocking(False)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)  # many waits for the reader
    return ours, theirs


def test_a_file_partly_on_disk_reaches_a_slow_reader_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps whose pages are in memory run in the event loop, the others in a worker thread,
    with waits for the reader between them: every byte arrives, in order, and the socket is
    no longer watched once the send is over."""
    fd, data = _half_on_disk(tmp_path)
    steps = {"loop": 0, "thread": 0}

    def counted(name: str, fn: Callable[..., int]) -> Callable[..., int]:
        def step(*args: int) -> int:
            steps[name] += 1
            return fn(*args)
        return step
    monkeypatch.setattr(sendfile, "_send_step", counted("loop", sendfile._send_step))
    monkeypatch.setattr(sendfile, "_send_available", counted("thread", sendfile._send_available))

    async def main() -> tuple[bytes, bool]:
        loop = asyncio.get_running_loop()
        ours, theirs = _pair()
        received = bytearray()

        async def read_slowly() -> None:
            while len(received) < SIZE:
                chunk = await loop.sock_recv(theirs, 256 << 10)
                assert chunk, "closed early"
                received.extend(chunk)
                await asyncio.sleep(0.001)
        reader = asyncio.create_task(read_slowly())
        with ThreadPoolExecutor(2) as pool:
            await sendfile._send_steps(pool, ours.fileno(), fd, 0, SIZE, 10.0)
        await reader
        still_watched = loop.remove_writer(ours.fileno())
        ours.close()
        theirs.close()
        return bytes(received), still_watched

    try:
        received, still_watched = uvloop.run(main())
    finally:
        os.close(fd)
    assert received == data
    assert steps["loop"] > 1 and steps["thread"] >= 1, steps
    assert not still_watched


def test_a_reader_that_stops_is_dropped_after_the_stall_timeout(tmp_path: Path) -> None:
    fd, _ = _half_on_disk(tmp_path)

    async def main() -> tuple[float, bool]:
        loop = asyncio.get_running_loop()
        ours, theirs = _pair()
        started = loop.time()
        with ThreadPoolExecutor(2) as pool, pytest.raises(sendfile.ClientStalled):
            await sendfile._send_steps(pool, ours.fileno(), fd, 0, SIZE, 0.5)
        waited = loop.time() - started
        still_watched = loop.remove_writer(ours.fileno())
        ours.close()
        theirs.close()
        return waited, still_watched

    try:
        waited, still_watched = uvloop.run(main())
    finally:
        os.close(fd)
    assert 0.5 <= waited < 5
    assert not still_watched
