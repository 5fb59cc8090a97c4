"""Minimal HTTP/1.1 keep-alive clients, over loopback TCP or a Unix socket.

A load generator must not be the bottleneck it measures: aiohttp's client costs more per
request than nginx does to answer, so these speak just enough HTTP (GET, Content-Length or
chunked bodies, keep-alive) with raw sockets. Bodies are read into a reused buffer and dropped.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

_BUF = 1 << 20


@dataclass(frozen=True)
class Target:
    """Where a server listens: a loopback port or a Unix socket path."""

    host: str = "127.0.0.1"
    port: int = 0
    unix: str | None = None

    @property
    def transport(self) -> str:
        return "unix" if self.unix else "tcp"

    def connect(self) -> socket.socket:
        if self.unix:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(self.unix)
        else:
            if self.host not in ("127.0.0.1", "localhost", "::1"):
                raise ValueError("load only goes to loopback")
            s = socket.create_connection((self.host, self.port))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.unix:
            return await asyncio.open_unix_connection(self.unix, limit=_BUF)
        return await asyncio.open_connection(self.host, self.port, limit=_BUF)


def _request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: loadtest\r\n\r\n".encode()


def _parse_head(head: bytes) -> tuple[int, int | None, bool, bool]:
    """(status, content length or None, chunked, server closes)."""
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length, chunked, close = None, False, False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding" and "chunked" in value:
            chunked = True
        elif name == "connection" and value == "close":
            close = True
    return status, length, chunked, close


class Conn:
    """A blocking keep-alive connection; reconnects when the server closed it."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.sock: socket.socket | None = None
        self.pending = bytearray()
        self.buf = bytearray(_BUF)
        self.view = memoryview(self.buf)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.pending.clear()

    def get(self, path: str) -> tuple[int, int]:
        """GET `path`; returns (status, body bytes). The body is dropped."""
        if self.sock is None:
            self.sock = self.target.connect()
        self.sock.sendall(_request(path))
        status, length, chunked, close = _parse_head(self._head())
        n = self._chunked() if chunked else self._exactly(length or 0)
        if close:
            self.close()
        return status, n

    def text(self, path: str) -> tuple[int, str]:
        """GET a small Content-Length body and return it."""
        if self.sock is None:
            self.sock = self.target.connect()
        self.sock.sendall(_request(path))
        status, length, chunked, close = _parse_head(self._head())
        if chunked or length is None:
            raise ValueError(f"{path}: expected a Content-Length body")
        while len(self.pending) < length:
            n = self._recv()
            self.pending += self.view[:n]
        body = bytes(self.pending[:length]).decode()
        del self.pending[:length]
        if close:
            self.close()
        return status, body

    def _recv(self) -> int:
        assert self.sock is not None
        n = self.sock.recv_into(self.buf)
        if n == 0:
            self.close()
            raise ConnectionError("server closed the connection")
        return n

    def _head(self) -> bytes:
        while (i := self.pending.find(b"\r\n\r\n")) < 0:
            n = self._recv()
            self.pending += self.view[:n]
        head = bytes(self.pending[:i])
        del self.pending[: i + 4]
        return head

    def _exactly(self, length: int) -> int:
        take = min(length, len(self.pending))
        del self.pending[:take]
        remaining = length - take
        while remaining > 0:
            assert self.sock is not None
            n = self.sock.recv_into(self.view[: min(remaining, _BUF)])
            if n == 0:
                self.close()
                raise ConnectionError("short body")
            remaining -= n
        return length

    def _line(self) -> bytes:
        while (i := self.pending.find(b"\r\n")) < 0:
            n = self._recv()
            self.pending += self.view[:n]
        line = bytes(self.pending[:i])
        del self.pending[: i + 2]
        return line

    def _chunked(self) -> int:
        total = 0
        while True:
            size = int(self._line().split(b";")[0], 16)
            if size == 0:
                while self._line():
                    pass  # trailers end with an empty line
                return total
            total += self._exactly(size)
            self._line()


class AsyncConn:
    """An asyncio keep-alive connection (for many concurrent small requests)."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> tuple[int, int]:
        if self.writer is None:
            self.reader, self.writer = await self.target.open()
        assert self.reader is not None
        self.writer.write(_request(path))
        head = await self.reader.readuntil(b"\r\n\r\n")
        status, length, chunked, close = _parse_head(head[:-4])
        if chunked:
            raise ValueError("chunked body on a small-request path")
        body = await self.reader.readexactly(length or 0)
        if close:
            await self.close()
        return status, len(body)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None
