"""Listeners that no client can starve: a cap on connections and deadlines for idle ones.

aiohttp bounds neither how many connections a listener holds nor how long a client may take to
send its request headers, so a thousand idle sockets or a slowloris use up the process's file
descriptors and take every listener down together. Here each connection has a protocol of its
own, which makes aiohttp's only for a request the fast path declines:

- a connection must complete its request headers within `header_timeout` of connecting (or of
  the first byte of a later request) and may sit idle between requests for `keepalive_timeout`;
  then it is closed. A running request has no deadline here (a NAR transfer that makes no
  progress is dropped by serve/sendfile.py);
- at `max_connections` a new connection makes room by closing the oldest one that has no
  request running and has been quiet for a second; when there is none, the new one is answered
  503 (JSON, Retry-After) and closed. Accepting is done here, a batch at a time, not by the
  event loop, which takes every pending connection's descriptor at once before any can be
  closed: a burst would exhaust them;
- the listen backlog is large, so a burst queues instead of being refused at connect;
- a cache listener's connections offer each read that begins a request to serve/fastpath.py
  first, while aiohttp has nothing of theirs in hand; bytes that arrive while a request is being
  answered (pipelining) leave the connection to aiohttp for good, so answers never overtake
  each other.

The metrics listener has its own small limits, so /healthz and /readyz answer whatever the cache
clients do, and the caps are fitted to RLIMIT_NOFILE, whose soft limit is raised to the hard one.
"""

import asyncio
import contextlib
import logging
import os
import resource
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from agent import metrics
from agent.config import Config, ConfigError
from agent.serve.fastpath import Hits, NarSend
from agent.serve.sendfile import abort, duplicate
from agent.store.openfiles import open_files_budget
from agent.upstream.client import CONNECTIONS_PER_UPSTREAM

log = logging.getLogger(__name__)

BACKLOG = 4096  # the kernel caps it at net.core.somaxconn
# A connection quiet for this long may be closed to make room. A fresh one is spared: its
# request may be waiting in the kernel's buffer, not yet read, during a burst.
EVICTABLE_AFTER = 1.0
# Descriptors per connection of the cap: its socket, one of the NAR it sends, the socket's
# duplicate (kept from its first NAR on), and room for as many refused connections lingering (see
# Listener._refuse).
FDS_PER_CONNECTION = 4
LINGER = 2.0
ACCEPT_BATCH = 64  # connections accepted per wake-up, so the loop serves others in a burst
RESERVED_FDS = 64  # index, logs, thread pools, git and its pipes
MIN_CONNECTIONS = 8
OPTIONS = {"unix": "--socket", "tcp": "--listen", "metrics": "--metrics-listen",
           "peer": "--peer-listen"}
# The peer listener's cap (agent/peers/): each other agent holds at most a small pool, and the
# cap keeps peers from taking the descriptors the node's own clients need.
PEER_MAX_CONNECTIONS = 256
REASONS = ("header_timeout", "idle_timeout", "evicted", "refused")
REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
           b"Retry-After: 1\r\nConnection: close\r\nContent-Length: 44\r\n\r\n"
           b'{"error": "too many connections; try again"}')


@dataclass(frozen=True)
class Limits:
    max_connections: int
    header_timeout: float
    keepalive_timeout: float


# Probes and scrapes are short and few; nothing cache clients do can reach this cap.
METRICS_LIMITS = Limits(max_connections=32, header_timeout=5.0, keepalive_timeout=5.0)


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit", extra={"fields": {
                "soft": soft, "hard": hard, "error": str(e)}})
    return soft


def prepare_limits(config: Config) -> tuple[Limits, Limits]:
    """(each cache listener's limits, the metrics listener's), after raising the open-file
    limit: the caps are lowered so that both cache listeners full still leave descriptors for
    the metrics listener, the upstream connections, the NAR files the store keeps open and the
    rest of the agent."""
    open_files = raise_open_files_limit()
    wanted = Limits(config.max_connections, config.header_timeout, config.keepalive_timeout)
    reserved = (RESERVED_FDS + open_files_budget(open_files)
                + CONNECTIONS_PER_UPSTREAM * len(config.upstreams)
                + METRICS_LIMITS.max_connections  # a probe or scrape holds only its socket
                + (FDS_PER_CONNECTION * PEER_MAX_CONNECTIONS if config.peer_listen else 0))
    room = (open_files - reserved) // (2 * FDS_PER_CONNECTION)
    if room < MIN_CONNECTIONS:
        need = reserved + 2 * FDS_PER_CONNECTION * MIN_CONNECTIONS
        raise ConfigError(f"the open-file limit ({open_files}) is too low for the agent: raise it "
                          f"to at least {need} (ulimit -n, or the container runtime's nofile)")
    if room < wanted.max_connections:
        log.warning("max-connections lowered to fit the open-file limit", extra={"fields": {
            "max_connections": room, "configured": wanted.max_connections,
            "open_file_limit": open_files}})
        wanted = replace(wanted, max_connections=room)
    return wanted, METRICS_LIMITS


def peer_limits(limits: Limits) -> Limits:
    """The peer listener's: a cache listener's, capped at PEER_MAX_CONNECTIONS."""
    return replace(limits, max_connections=min(limits.max_connections, PEER_MAX_CONNECTIONS))


class Listener:
    """One listening socket and its connections; given to aiohttp's site as its server."""

    def __init__(self, name: str, server: web.Server, limits: Limits,
                 sock: socket.socket, fast: Hits | None = None) -> None:
        self.name = name
        self.limits = limits
        self.fast = fast
        self.sockets = [sock]
        self.loop = asyncio.get_running_loop()
        self.open: dict[_Connection, None] = {}  # oldest first
        self._sock = sock
        self._make_handler = server
        self._handled: dict[RequestHandler, _Connection] = {}  # connections aiohttp serves
        self._resume: asyncio.TimerHandle | None = None
        self.refused: dict[socket.socket, asyncio.TimerHandle] = {}  # lingering, oldest first
        self._starting: set[asyncio.Task] = set()
        self._gauge = metrics.OPEN_CONNECTIONS.labels(name)
        self._closed = {r: metrics.CONNECTIONS_CLOSED.labels(name, r) for r in REASONS}
        handle = server.request_handler

        async def tracked(request: web.BaseRequest) -> web.StreamResponse:
            conn = self._handled.get(request.protocol)
            return await (handle(request) if conn is None else conn.run_request(request, handle))

        # Read by each RequestHandler when it is made, so this sees every request.
        server.request_handler = tracked
        sock.setblocking(False)
        self.loop.add_reader(sock, self._accept)

    def close(self) -> None:
        """Stop accepting (what aiohttp's site calls on its server), and close the connections
        aiohttp does not know of (it closes its own at shutdown)."""
        self._pause(None)
        self._sock.close()
        for client in list(self.refused):
            self._end_refusal(client)
        for conn in list(self.open):
            if conn.handler is None:
                conn.stop()

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                client, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE, ENFILE, ENOBUFS: the backlog holds them meanwhile
                log.warning("cannot accept connections", extra={"fields": {
                    "listener": self.name, "error": e.strerror}})
                self._pause(1.0)
                return
            if len(self.open) < self.limits.max_connections or self._make_room():
                self._attach(client)
            else:
                self._refuse(client)

    def _refuse(self, client: socket.socket) -> None:
        """Answer 503 without reading the request, and close once the client has read it: a
        socket closed with unread data is reset, and the client may lose the answer. At most
        `max_connections` refusals linger; past that the oldest is closed (after reading what
        it sent: an idle client loses nothing)."""
        self._closed["refused"].inc()
        if len(self.refused) >= self.limits.max_connections:
            self._end_refusal(next(iter(self.refused)))
        client.setblocking(False)
        with contextlib.suppress(OSError):
            client.send(REFUSAL)
            client.shutdown(socket.SHUT_WR)
        self.refused[client] = self.loop.call_later(LINGER, self._end_refusal, client)
        self.loop.add_reader(client, self._drain, client)

    def _drain(self, client: socket.socket) -> None:
        try:
            while client.recv(1 << 16):
                pass
        except BlockingIOError:
            return
        except OSError:
            pass
        self._end_refusal(client)  # the client is done

    def _end_refusal(self, client: socket.socket) -> None:
        timer = self.refused.pop(client, None)
        if timer is None:
            return
        timer.cancel()
        self.loop.remove_reader(client)
        with contextlib.suppress(OSError):
            while client.recv(1 << 16):
                pass
        client.close()

    def _attach(self, client: socket.socket) -> None:
        if client.family != socket.AF_UNIX:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Connection(self)
        self.open[conn] = None
        self._gauge.inc()
        self._starting.add(self.loop.create_task(self._start(conn, client)))

    async def _start(self, conn: "_Connection", client: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(lambda: conn, client)
        except OSError:  # gone before it began
            self.forget(conn)
            client.close()
        finally:
            self._starting.discard(asyncio.current_task())  # type: ignore[arg-type]

    def _pause(self, seconds: float | None) -> None:
        """Stop accepting for `seconds` (None: for good) or until a connection ends."""
        if self._resume is None:
            self.loop.remove_reader(self._sock)
        else:
            self._resume.cancel()
        self._resume = self.loop.call_later(seconds, self._wake) if seconds else None

    def _wake(self) -> None:
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
            self.loop.add_reader(self._sock, self._accept)

    def _make_room(self) -> bool:
        """Close the oldest connection without a running request, unless all are fresh."""
        quiet_since = self.loop.time() - EVICTABLE_AFTER
        for conn in self.open:
            if not conn.busy and conn.since <= quiet_since:
                conn.close("evicted")
                return True
        return False

    def handler_for(self, conn: "_Connection") -> RequestHandler:
        """aiohttp's protocol for `conn`, whose requests then reach `tracked`."""
        handler = self._make_handler()
        self._handled[handler] = conn
        return handler

    def forget(self, conn: "_Connection", reason: str | None = None) -> None:
        if conn not in self.open:
            return
        del self.open[conn]
        if conn.handler is not None:
            self._handled.pop(conn.handler, None)
        self._gauge.dec()
        if reason:
            self._closed[reason].inc()
            log.debug("connection closed", extra={"fields": {
                "listener": self.name, "reason": reason}})
        self._wake()


async def _written(request: web.BaseRequest, resp: web.StreamResponse) -> None:
    """Write the response now (aiohttp's own prepare and write_eof after it do nothing)."""
    if not resp.prepared:
        await resp.prepare(request)
    await resp.write_eof()


class _Connection(asyncio.Protocol):
    """One connection, with a deadline whenever no request runs. Its requests go to the fast
    path first, and to aiohttp's protocol, made for the first one the fast path declines: a
    node's Nix asks mostly for hits, and most connections never need one (making one, with its
    task and socket options, cost more than the hits a connection asks for)."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.handler: RequestHandler | None = None
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.busy = 0  # requests aiohttp is handling or answering (one at a time)
        self.receiving = False  # bytes of a next request went to aiohttp since the last ended
        self.pipelined = False  # bytes arrived while aiohttp was busy: it keeps the connection
        self.writing = True  # the transport is not paused
        self._sending: asyncio.Task[None] | None = None  # a NAR the fast path is sending
        self._out: socket.socket | None = None  # the socket's duplicate the fast path sends on
        self._held = b""  # what arrived meanwhile, for aiohttp once it is sent
        self.since = listener.loop.time()  # connected, or last request ended
        self.expires = 0.0
        self.reason = ""
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._expire_at(self.since + listener.limits.header_timeout, "header_timeout")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.closed:  # closed while it was being set up
            self.transport.abort()

    def _aiohttp(self) -> RequestHandler:
        if self.handler is None:
            assert self.transport is not None
            self.handler = self.listener.handler_for(self)
            self.handler.connection_made(self.transport)
            if not self.writing:
                self.handler.pause_writing()
        return self.handler

    def data_received(self, data: bytes) -> None:
        if self._sending is not None:
            self._held += data
            if self.transport is not None:
                self.transport.pause_reading()  # one read held at most
            return
        if self.busy:
            self.pipelined = True
        elif not self.receiving:
            if self._answered_here(data):
                return
            self.receiving = True  # a request has begun: its headers are due soon
            deadline = self.listener.loop.time() + self.listener.limits.header_timeout
            self._expire_at(min(self.expires, deadline), "header_timeout")
        self._aiohttp().data_received(data)

    async def run_request(self, request: web.BaseRequest,
                          handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]) \
            -> web.StreamResponse:
        """Run aiohttp's handler for one request, busy until its response is written: here for
        answers (a client that waits for one may send its next request at once), else when
        aiohttp's task for the request ends, after it has answered an error."""
        self.busy += 1
        answered = False

        def done(_: object = None) -> None:
            nonlocal answered
            if not answered:
                answered = True
                self.request_done()
        task = asyncio.current_task()
        assert task is not None
        task.add_done_callback(done)
        try:
            resp = await handler(request)
        except web.HTTPException as e:
            await _written(request, e)
            done()
            raise
        await _written(request, resp)
        done()
        return resp

    def _answered_here(self, data: bytes) -> bool:
        fast = self.listener.fast
        if fast is None or self.pipelined or not self.writing or self.transport is None:
            return False
        response = fast.answer(data)
        if response is None:
            return False
        if isinstance(response, NarSend):
            self._send_nar(response, self.transport)
            return True
        self.transport.write(response)
        self._idle()
        return True

    def _send_nar(self, nar: NarSend, transport: asyncio.Transport) -> None:
        """Send what the socket takes now; a task sends the rest (and finishes the NAR however
        it ends, cancelled before it began included)."""
        try:
            if self._out is None:
                self._out = duplicate(transport)
            if not transport.get_write_buffer_size() and nar.start(self._out):
                self._idle()
                return
        except (OSError, EOFError):  # the send failed (recorded): a half answer must not stand
            nar.finish()  # (a failure in `duplicate`, before any send, is recorded here)
            abort(transport)
            return
        self.busy += 1
        self._sending = self.listener.loop.create_task(self._send(nar, transport, self._out))
        self._sending.add_done_callback(lambda _: self._send_ended(nar))

    def _send_ended(self, nar: NarSend) -> None:
        """The send's task is done, whatever ended it: no thread uses the file or the duplicate
        any more (a thread's step is awaited even on cancellation)."""
        nar.finish()
        if self.closed:
            self._close_out()

    async def _send(self, nar: NarSend, transport: asyncio.Transport,
                    out: socket.socket) -> None:
        try:
            await nar.run(transport, out)
        except Exception:
            log.exception("nar send failed")
            abort(transport)
        finally:
            self._sending = None
            self.request_done()
        if self._held and not transport.is_closing():
            held, self._held = self._held, b""
            self.pipelined = True
            transport.resume_reading()
            self.data_received(held)

    def _close_out(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    def eof_received(self) -> bool | None:
        return None if self.handler is None else self.handler.eof_received()

    def pause_writing(self) -> None:
        self.writing = False
        if self.handler is not None:
            self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.writing = True
        if self.handler is not None:
            self.handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._sending is not None:
            self._sending.cancel()  # its end closes the duplicate (a thread may be using it)
        else:
            self._close_out()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.listener.forget(self)
        if self.handler is not None:
            self.handler.connection_lost(exc)

    def request_done(self) -> None:
        self.busy -= 1
        if not self.busy:
            self.receiving = False
            self._idle()

    def _idle(self) -> None:
        if self.closed:
            return
        self.since = self.listener.loop.time()
        self._expire_at(self.since + self.listener.limits.keepalive_timeout, "idle_timeout")

    def stop(self) -> None:
        """The listener stops: close once what the transport holds is out (a NAR the fast path
        is sending is cut off, as aiohttp's shutdown cuts off its own)."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def close(self, reason: str) -> None:
        self.closed = True
        self.listener.forget(self, reason)
        if self.transport is not None:
            self.transport.abort()  # nothing is owed to it; free the descriptor now

    def _expire_at(self, when: float, reason: str) -> None:
        # One timer per connection, moved only earlier; a late check re-arms itself. Cheaper
        # than a new timer per request on the narinfo hot path.
        self.expires, self.reason = when, reason
        if self._timer is None or self._timer_at > when:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.listener.loop.call_at(when, self._check)
            self._timer_at = when

    def _check(self) -> None:
        self._timer = None
        if self.busy:
            return  # request_done sets the next deadline
        if self.listener.loop.time() < self.expires:
            self._timer = self.listener.loop.call_at(self.expires, self._check)
            self._timer_at = self.expires
            return
        self.close(self.reason)


class _Site(web.BaseSite):
    """An aiohttp site whose connections go through a Listener; a bind error is a ConfigError."""

    def __init__(self, runner: web.BaseRunner, name: str, where: str, limits: Limits,
                 bind: Callable[[], socket.socket], fast: Hits | None) -> None:
        super().__init__(runner, backlog=BACKLOG)
        self._name, self._where, self._limits, self._bind = name, where, limits, bind
        self._fast = fast

    @property
    def name(self) -> str:
        return self._where

    async def start(self) -> None:
        await super().start()
        assert self._runner.server is not None, "runner.setup() first"
        try:
            sock = self._bind()
        except OSError as e:
            reason = os.strerror(e.errno) if e.errno else str(e)
            raise ConfigError(f"cannot listen on {self._where} ({OPTIONS[self._name]}): "
                              f"{reason}") from None
        self._server = Listener(self._name, self._runner.server, self._limits,  # type: ignore
                                sock, self._fast)


def tcp_site(runner: web.BaseRunner, name: str, host: str, port: int,
             limits: Limits, fast: Hits | None = None) -> web.BaseSite:
    def bind() -> socket.socket:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=BACKLOG)
    return _Site(runner, name, f"{host}:{port}", limits, bind, fast)


def unix_site(runner: web.BaseRunner, name: str, path: Path, limits: Limits,
              fast: Hits | None = None) -> web.BaseSite:
    def bind() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            sock.listen(BACKLOG)
        except OSError:
            sock.close()
            raise
        return sock
    return _Site(runner, name, str(path), limits, bind, fast)
