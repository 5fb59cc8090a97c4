"""A binary-cache HTTP server standing in for cache.nixos.org, with injectable faults.

It serves a directory written by `nixenv.publish` from its own thread and its own asyncio
loop, so sync tests (subprocess.run of `nix copy`) and async tests (whose loop also runs
the code under test) can both use it without blocking it.

    with UpstreamServer(cache_dir) as up:
        up.set_fault("/nar/*", Fault("tamper", times=1))
        nix_copy(up.url, dest, paths, [public_key])
        assert up.counts["/nix-cache-info"] == 1
"""

from __future__ import annotations

import asyncio
import collections
import fnmatch
import socket
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from aiohttp import web

from agent.nix import narinfo
from agent.nix.signing import SecretKey

FaultKind = Literal[
    "status", "tamper", "truncate", "bad_signature", "stall", "reset", "wrong_length",
    "drip", "delay", "html", "redirect",
]
FAULT_KINDS: tuple[str, ...] = FaultKind.__args__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Fault:
    """What to do to a matching request instead of answering it well.

    status: answer `code` with an empty body. tamper: flip one byte in the middle of the
    body. truncate: send the first half with a Content-Length of the half. bad_signature:
    re-sign a narinfo with a random key of the same name. stall: send half the body and
    hang with the connection open. reset: send half then abort the TCP connection (RST).
    wrong_length: announce more bytes than the body has, then close. drip: send `chunk`
    bytes every `delay` seconds. delay: wait `delay` seconds, then answer normally.
    html: answer 200 with an HTML page, as a captive portal or a proxy does. redirect: answer
    `code` (a 3xx) with `Location: <location><request path>`.
    times: apply to the next N matching requests only (None: all of them).
    """

    kind: FaultKind
    code: int = 500
    delay: float = 0.0
    chunk: int = 8
    times: int | None = None
    location: str = ""

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}")


@dataclass
class _Armed:
    pattern: str
    fault: Fault
    remaining: int | None


# Sockets bound but never listening: connecting to them is refused, and nobody else can
# take their port while this process lives.
_DEAD_SOCKETS: list[socket.socket] = []


def dead_url() -> str:
    """An http URL on loopback where nothing listens (connections are refused)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    _DEAD_SOCKETS.append(sock)
    return f"http://127.0.0.1:{sock.getsockname()[1]}"


CAPTIVE_PORTAL = ("<!DOCTYPE html>\n<html><head><title>Sign in</title></head>\n"
                  "<body><p>Sign in to the network to continue.</p></body></html>\n")


def _content_type(path: str) -> str:
    if path.endswith(".narinfo"):
        return "text/x-nix-narinfo"
    if path.startswith("/nar/"):
        return "application/x-nix-nar"
    if path == "/nix-cache-info":
        return "text/x-nix-cache-info"
    return "application/octet-stream"


def _tampered(body: bytes) -> bytes:
    if not body:
        return body
    mid = len(body) // 2
    return body[:mid] + bytes([body[mid] ^ 0xFF]) + body[mid + 1:]


def _badly_signed(body: bytes) -> bytes:
    """Replace every Sig by a valid-looking signature from another key of the same name."""
    text = body.decode()
    try:
        info = narinfo.parse(text)
    except narinfo.NarInfoError:
        return _tampered(body)
    names = [s.partition(":")[0] for s in info.sigs] or ["cache.nixos.org-1"]
    sigs = [SecretKey.generate(n).sign(info.fingerprint()) for n in names]
    kept = [line for line in text.splitlines() if not line.startswith("Sig:")]
    return ("\n".join(kept + [f"Sig: {s}" for s in sigs]) + "\n").encode()


class UpstreamServer:
    def __init__(self, root: Path, *, latency: float = 0.0,
                 bandwidth: float | None = None, host: str = "127.0.0.1") -> None:
        self.root = Path(root).resolve()
        self.host = host  # e.g. a test network's bridge address, for agents in namespaces
        self.latency = latency
        self.bandwidth = bandwidth
        self.port = 0
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()
        self._requests: list[tuple[str, str]] = []
        self._faults: list[_Armed] = []  # first match wins
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None

    # --- lifecycle -------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> UpstreamServer:
        ready = threading.Event()
        errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._serve, args=(ready, errors),
                                        name="upstream-server", daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            raise RuntimeError("upstream server failed to start") from errors[0]
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._loop = self._thread = None

    def __enter__(self) -> UpstreamServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self, ready: threading.Event, errors: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._setup())
        except BaseException as e:
            errors.append(e)
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _setup(self) -> None:
        self._stopping = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _shutdown(self) -> None:
        assert self._stopping is not None and self._runner is not None
        self._stopping.set()
        await self._runner.cleanup()

    # --- observation and faults ------------------------------------------------------

    @property
    def counts(self) -> collections.Counter[str]:
        """GET/HEAD requests by request path (a snapshot)."""
        with self._lock:
            return collections.Counter(self._counts)

    @property
    def requests(self) -> list[tuple[str, str]]:
        """Every request as (method, path), in arrival order (a snapshot)."""
        with self._lock:
            return list(self._requests)

    def count(self, pattern: str) -> int:
        """Requests whose path matches the fnmatch `pattern`, e.g. "*.narinfo"."""
        with self._lock:
            return sum(n for p, n in self._counts.items() if fnmatch.fnmatchcase(p, pattern))

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()
            self._requests.clear()

    def set_fault(self, path_pattern: str, fault: Fault) -> None:
        """Apply `fault` to requests whose path matches `path_pattern` (replaces same pattern)."""
        with self._lock:
            self._faults = [f for f in self._faults if f.pattern != path_pattern]
            self._faults.append(_Armed(path_pattern, fault, fault.times))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _record(self, method: str, path: str) -> Fault | None:
        """Count the request and take the fault that applies to it, if any."""
        with self._lock:
            if method in ("GET", "HEAD"):
                self._counts[path] += 1
            self._requests.append((method, path))
            for armed in self._faults:
                if armed.remaining == 0 or not fnmatch.fnmatchcase(path, armed.pattern):
                    continue
                if armed.remaining is not None:
                    armed.remaining -= 1
                return armed.fault
        return None

    # --- serving ---------------------------------------------------------------------

    def _file(self, path: str) -> bytes | None:
        target = (self.root / path.lstrip("/")).resolve()
        if not target.is_relative_to(self.root) or not target.is_file():
            return None
        return target.read_bytes()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        fault = self._record(request.method, request.path)
        if self.latency:
            await asyncio.sleep(self.latency)
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405)
        if fault is not None and fault.kind == "delay":
            await asyncio.sleep(fault.delay)
            fault = None
        if fault is not None and fault.kind == "status":
            return web.Response(status=fault.code)
        if fault is not None and fault.kind == "redirect":
            return web.Response(status=fault.code,
                                headers={"Location": fault.location + request.path_qs})
        if fault is not None and fault.kind == "html":
            return web.Response(text=CAPTIVE_PORTAL, content_type="text/html")
        body = self._file(request.path)
        if body is None:
            return web.Response(status=404)
        ctype = _content_type(request.path)
        if fault is not None:
            return await self._faulty(request, fault, body, ctype)
        return await self._send(request, body, ctype)

    async def _send(self, request: web.Request, body: bytes,
                    ctype: str) -> web.StreamResponse:
        if self.bandwidth is None or request.method == "HEAD":
            return web.Response(body=body, headers={"Content-Type": ctype})
        resp = await self._prepare(request, ctype, len(body))
        step = max(1, int(self.bandwidth / 20))
        try:
            for i in range(0, len(body), step):
                await resp.write(body[i:i + step])
                await asyncio.sleep(len(body[i:i + step]) / self.bandwidth)
        except ConnectionError:
            pass
        return resp

    @staticmethod
    async def _prepare(request: web.Request, ctype: str, length: int) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": ctype})
        resp.content_length = length
        await resp.prepare(request)
        return resp

    async def _faulty(self, request: web.Request, fault: Fault, body: bytes,
                      ctype: str) -> web.StreamResponse:
        if fault.kind == "tamper":
            return await self._send(request, _tampered(body), ctype)
        if fault.kind == "bad_signature":
            fixed = _badly_signed(body) if request.path.endswith(".narinfo") else body
            return await self._send(request, fixed, ctype)
        if fault.kind == "truncate":
            return await self._send(request, body[: len(body) // 2], ctype)
        if request.method == "HEAD" and fault.kind in ("drip", "wrong_length"):
            return await self._send(request, body, ctype)
        handler = {"stall": self._stall, "reset": self._reset,
                   "wrong_length": self._wrong_length, "drip": self._drip}[fault.kind]
        try:
            return await handler(request, fault, body, ctype)
        except ConnectionError:
            return web.Response(status=599)  # the client went away; nothing is sent

    async def _stall(self, request: web.Request, fault: Fault, body: bytes,
                     ctype: str) -> web.StreamResponse:
        resp = await self._prepare(request, ctype, len(body))
        if request.method == "GET":
            await resp.write(body[: len(body) // 2])
        assert self._stopping is not None
        # Hang until the client gives up or the server stops.
        while not self._stopping.is_set():
            transport = request.transport
            if transport is None or transport.is_closing():
                break
            await asyncio.sleep(0.05)
        _abort(request)
        return resp

    async def _reset(self, request: web.Request, fault: Fault, body: bytes,
                     ctype: str) -> web.StreamResponse:
        resp = await self._prepare(request, ctype, len(body))
        if request.method == "GET":
            await resp.write(body[: len(body) // 2])
        _abort(request, rst=True)
        return resp

    async def _wrong_length(self, request: web.Request, fault: Fault, body: bytes,
                            ctype: str) -> web.StreamResponse:
        resp = await self._prepare(request, ctype, len(body) + max(1, len(body) // 2))
        await resp.write(body)
        transport = request.transport
        if transport is not None:
            transport.close()  # flushes, then FIN: the body is short
        return resp

    async def _drip(self, request: web.Request, fault: Fault, body: bytes,
                    ctype: str) -> web.StreamResponse:
        resp = await self._prepare(request, ctype, len(body))
        step = max(1, fault.chunk)
        for i in range(0, len(body), step):
            await resp.write(body[i:i + step])
            await asyncio.sleep(fault.delay)
        return resp


def _abort(request: web.Request, *, rst: bool = False) -> None:
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if rst and sock is not None:
        # Linger 0: close() sends RST instead of FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
