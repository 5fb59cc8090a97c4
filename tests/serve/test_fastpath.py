"""Narinfo hits answered before aiohttp (agent/serve/fastpath.py): the same answer as the
aiohttp route, counted the same, and every request it should not answer left to aiohttp
intact, on connections that mix both, keep alive, pipeline or stall."""

import re
import select
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.serve.fastpath import Hits
from tests.support.agent import AgentProcess
from tests.support.nixenv import Closure, hash_part
from tests.support.upstream import UpstreamServer

HASH = "0" * 31 + "1"
TEXT = f"StorePath: /nix/store/{HASH}-x\nURL: nar/x.nar\n"


class _Row:
    text = TEXT


class _ReadThrough:
    """Holds one narinfo and no NAR."""

    def __init__(self, known: str) -> None:
        self.known = known

    def local_narinfo(self, hash_part: str) -> _Row | None:
        return _Row() if hash_part == self.known else None

    def local_nar(self, file: str) -> None:
        return None


def _hits(known: str = HASH) -> Hits:
    return Hits(_ReadThrough(known), None, "unit")  # type: ignore[arg-type]


def _request(target: str = f"/{HASH}.narinfo", method: str = "GET", version: str = "HTTP/1.1",
             headers: str = "Host: agent\r\nAccept: */*\r\n") -> bytes:
    return f"{method} {target} {version}\r\n{headers}\r\n".encode()


def test_a_plain_hit_is_answered_whole() -> None:
    out = _hits().answer(_request(headers="Host: a\r\nX-Request-Id: abc-1\r\n"))
    assert out is not None
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK"
    fields = dict(line.split(": ", 1) for line in lines[1:])
    assert fields["Content-Type"] == "text/x-nix-narinfo"
    assert int(fields["Content-Length"]) == len(body) and body == TEXT.encode()
    assert fields["X-Request-Id"] == "abc-1"
    assert re.fullmatch(r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT", fields["Date"])


@pytest.mark.parametrize(("headers", "request_id"), [
    ("", None),                                                          # no headers at all
    ("Connection: Keep-Alive \r\nX-Empty:\r\n", None),
    ("x-request-id:\tid-1 \r\nX-Request-Id: id-2\r\n", "id-1"),        # the first, as aiohttp
    ("User-Agent: curl/8.5.0 Nix/2.18\r\nAccept: */*\r\nX-REQUEST-ID: a b\r\n", "a b"),
])
def test_plain_requests_are_answered_here(headers: str, request_id: str | None) -> None:
    out = _hits().answer(_request(headers=headers))
    assert out is not None and out.endswith(TEXT.encode())
    rid = re.search(rb"\r\nX-Request-Id: ([^\r]*)\r\n", out)
    assert rid is not None and rid[1] != b""
    assert request_id is None or rid[1].decode() == request_id


def test_head_has_the_length_and_no_body() -> None:
    out = _hits().answer(_request(method="HEAD"))
    assert out is not None and out.endswith(b"\r\n\r\n")
    assert f"Content-Length: {len(TEXT)}\r\n".encode() in out


@pytest.mark.parametrize("data", [
    _request(f"/{'0' * 31}2.narinfo"),                                   # a miss
    _request(f"/{HASH}.narinfo?x=1"[:42]),                               # not the exact target
    _request(f"/{HASH}.narinfo", version="HTTP/1.0"),
    _request(method="POST"), _request(method="get"),
    _request(f"http://a/{HASH}.narinfo"),                               # absolute form
    _request(f"/{'e' * 32}.narinfo"),                                    # 'e' is not nix32
    _request(f"/nar/{HASH}.narinfo"[:42]),
    _request(headers="Connection: close\r\n"),
    _request(headers="Connection: upgrade\r\nUpgrade: h2c\r\n"),
    _request(headers="Content-Length: 0\r\n"),
    _request(headers="Transfer-Encoding: chunked\r\n"),
    _request("/nar/" + "0" * 52 + ".nar"),                               # a NAR not held
    _request(headers="Expect: 100-continue\r\n"),
    _request(headers="Host: a\r\n folded\r\n"),                          # obs-fold
    _request(headers="Host : a\r\n"),                                    # space before colon
    _request(headers="NoColon\r\n"),
    _request(headers="X-Request-Id: a\x01b\r\n"),
    _request(headers="X-Request-Id: caf\xe9\r\n".encode("latin-1").decode("latin-1")),
    _request(headers="X-Long: " + "a" * 9000 + "\r\n"),
    _request()[:-2],                                                     # partial
    _request() + _request(),                                             # pipelined
    _request().replace(b"\r\n", b"\n"),                                  # bare LF
    _request().replace(b" /", b"  /", 1),
    _request(headers="RANGE: bytes=0-1\r\n"),                            # names ignore case
    _request(headers="connection: keep-alive, upgrade\r\n"),
    _request(headers="Host: a\r\nif-range: x\r\n"),
    _request().replace(b"narinfo", "narinf\xf6".encode()),               # a non-ASCII target
    _request().replace(b"GET /", b"GET /\x00", 1),
], ids=lambda d: d[:60].decode("latin-1"))
def test_anything_but_a_plain_hit_is_left_to_aiohttp(data: bytes) -> None:
    assert _hits().answer(data) is None


# --- against the real agent -----------------------------------------------------------------

@pytest.fixture
def agent(tmp_path: Path, upstream_server: UpstreamServer,
          signing_key: tuple[Path, str]) -> Iterator[AgentProcess]:
    with AgentProcess(tmp_path / "agent", [upstream_server.url], [signing_key[1]],
                      "--recompress", "none", "--keepalive-timeout", "2") as agent:
        yield agent


def _connect(agent: AgentProcess) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", agent.port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _read_response(s: socket.socket, buf: bytearray, head_only: bool = False) \
        -> tuple[int, dict[str, str], bytes]:
    """One response from `s` (bytes after it stay in `buf`)."""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, "connection closed before a response"
        buf += chunk
    head, _, _ = bytes(buf).partition(b"\r\n\r\n")
    del buf[:len(head) + 4]
    lines = head.decode().split("\r\n")
    fields = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    length = 0 if head_only else int(fields.get("content-length", 0))
    while len(buf) < length:
        chunk = s.recv(65536)
        assert chunk, "connection closed mid-body"
        buf += chunk
    body = bytes(buf[:length])
    del buf[:length]
    return int(lines[0].split()[1]), fields, body


def _get(target: str, extra: str = "") -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: agent\r\n{extra}\r\n".encode()


def _field(narinfo: bytes, name: str) -> str:
    return next(line.split(": ", 1)[1] for line in narinfo.decode().splitlines()
                if line.startswith(name + ": "))


def _nar_url(narinfo: bytes) -> str:
    return "/" + _field(narinfo, "URL")


def _commit(agent: AgentProcess, h: str) -> tuple[bytes, bytes]:
    """Fetch a path's narinfo and NAR through the agent, so both are held: (narinfo, NAR)."""
    with _connect(agent) as s:
        buf = bytearray()
        s.sendall(_get(f"/{h}.narinfo"))
        narinfo = _read_response(s, buf)[2]
        s.sendall(_get(_nar_url(narinfo)))
        return narinfo, _read_response(s, buf)[2]


def test_one_connection_mixes_hits_misses_and_nars_in_order(
        agent: AgentProcess, small_closure: Closure) -> None:
    first, second = (hash_part(p) for p in small_closure.paths[:2])
    with _connect(agent) as s:
        buf = bytearray()
        s.sendall(_get(f"/{first}.narinfo"))       # a miss: aiohttp reads it through
        status, fields, miss_body = _read_response(s, buf)
        assert status == 200 and "server" in fields  # aiohttp names itself
        s.sendall(_get(f"/{first}.narinfo"))       # now a hit: the fast path
        status, fields, hit_body = _read_response(s, buf)
        assert status == 200 and hit_body == miss_body and "server" not in fields
        assert fields["content-type"] == "text/x-nix-narinfo"
        s.sendall(_get(_nar_url(hit_body)))        # a NAR being fetched: aiohttp streams it
        status, fields, nar = _read_response(s, buf)
        assert status == 200 and len(nar) == int(_field(hit_body, "FileSize"))
        assert "server" in fields
        s.sendall(_get(_nar_url(hit_body)))        # committed now: the fast path sends it
        status, fields, again = _read_response(s, buf)
        assert (status, again, fields["content-type"]) == (200, nar, "application/x-nix-nar")
        assert "server" not in fields and fields["accept-ranges"] == "bytes"
        s.sendall(_get(_nar_url(hit_body), "Range: bytes=0-9\r\n"))  # a Range: aiohttp
        status, fields, part = _read_response(s, buf)
        assert (status, part) == (206, nar[:10])
        s.sendall(_get(f"/{second}.narinfo"))
        assert _read_response(s, buf)[0] == 200
        s.sendall(_get(f"/{first}.narinfo", "X-Request-Id: mine-7\r\n"))
        status, fields, body = _read_response(s, buf)
        assert (status, fields["x-request-id"], body) == (200, "mine-7", hit_body)
        s.sendall(f"HEAD /{first}.narinfo HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        status, fields, body = _read_response(s, buf, head_only=True)
        assert status == 200 and int(fields["content-length"]) == len(hit_body)
        s.sendall(_get("/nix-cache-info"))         # aiohttp again, after the fast path
        status, _, info = _read_response(s, buf)
        assert status == 200 and info.startswith(b"StoreDir: /nix/store")
        assert not buf


def test_pipelined_requests_are_answered_in_order(
        agent: AgentProcess, small_closure: Closure) -> None:
    hashes = [hash_part(p) for p in small_closure.paths[:3]]
    with _connect(agent) as s:
        buf = bytearray()
        for h in hashes:  # commit them, one at a time
            s.sendall(_get(f"/{h}.narinfo"))
            _read_response(s, buf)
        bodies = {}
        for h in hashes:
            s.sendall(_get(f"/{h}.narinfo"))
            bodies[h] = _read_response(s, buf)[2]
        nar = _nar_url(bodies[hashes[0]])
        # One write: a NAR between narinfo hits, then the cache info and a miss
        batch = [f"/{hashes[1]}.narinfo", nar, f"/{hashes[2]}.narinfo", "/nix-cache-info",
                 f"/{hashes[0]}.narinfo", f"/{'0' * 32}.narinfo"]
        s.sendall(b"".join(_get(t) for t in batch))
        answers = [_read_response(s, buf) for _ in batch]
        assert [a[0] for a in answers] == [200, 200, 200, 200, 200, 404]
        assert answers[0][2] == bodies[hashes[1]] and answers[2][2] == bodies[hashes[2]]
        assert len(answers[1][2]) == int(_field(bodies[hashes[0]], "FileSize"))
        assert answers[3][2].startswith(b"StoreDir:") and answers[4][2] == bodies[hashes[0]]
        s.sendall(_get(f"/{hashes[1]}.narinfo"))  # the connection still works
        assert _read_response(s, buf)[2] == bodies[hashes[1]]


def test_hits_are_counted_like_the_routes_and_keep_the_connection_alive_while_used(
        agent: AgentProcess, small_closure: Closure) -> None:
    h = hash_part(small_closure.paths[0])
    with _connect(agent) as s:
        buf = bytearray()
        s.sendall(_get(f"/{h}.narinfo"))
        _read_response(s, buf)  # the miss, through aiohttp
        before = agent.metric("flox_node_cache_http_requests_total", listener="tcp",
                         endpoint="narinfo", method="GET", code="200")
        hits_before = agent.metric("flox_node_cache_lookups_total", kind="narinfo",
                              source="local")
        # Busier than the 2 s keep-alive deadline for 3 s: never closed while in use
        deadline, sent = time.monotonic() + 3, 0
        while time.monotonic() < deadline:
            s.sendall(_get(f"/{h}.narinfo"))
            assert _read_response(s, buf)[0] == 200
            sent += 1
            time.sleep(0.05)
        after = agent.metric("flox_node_cache_http_requests_total", listener="tcp",
                        endpoint="narinfo", method="GET", code="200")
        assert after - before == sent
        assert agent.metric("flox_node_cache_lookups_total", kind="narinfo",
                       source="local") - hits_before == sent
        # Then idle: closed by the listener's keep-alive deadline, not left open
        assert select.select([s], [], [], 5)[0], "an idle connection was not closed"
        assert s.recv(1) == b""


def _rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) << 10  # type: ignore[union-attr]


def test_a_client_that_reads_no_answers_is_not_buffered_without_bound(
        agent: AgentProcess, small_closure: Closure) -> None:
    """Requests one at a time from a client that never reads: once the socket is full the
    transport pauses, the fast path stops answering, and aiohttp's flow control stops reading
    from the client."""
    h = hash_part(small_closure.paths[0])
    with _connect(agent) as warm:
        warm.sendall(_get(f"/{h}.narinfo"))
        _read_response(warm, bytearray())
    assert agent.proc is not None
    s = _connect(agent)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.setblocking(False)
    blocked = False
    try:
        for i in range(200_000):
            try:
                s.send(_get(f"/{h}.narinfo"))
            except BlockingIOError:
                blocked = True  # the agent stopped reading: backpressure reached the client
                break
            if i % 64 == 0:
                time.sleep(0.001)  # mostly one request per read: the fast path's case
        rss = _rss_bytes(agent.proc.pid)
        assert blocked, "the agent kept reading from a client that reads nothing"
        assert rss < 300 << 20, f"agent grew to {rss >> 20} MiB for a client that reads nothing"
    finally:
        s.close()
    with urllib.request.urlopen(f"{agent.url}/{h}.narinfo", timeout=10) as r:
        assert r.status == 200


def test_a_request_sent_while_a_nar_is_going_out_waits_for_it(
        agent: AgentProcess, big_path_closure: Closure, small_closure: Closure) -> None:
    """A client that sends its next request before reading a NAR the fast path is sending
    gets both answers, in order, the second from aiohttp."""
    big = hash_part(big_path_closure.roots[0])
    small = hash_part(small_closure.paths[0])
    big_info, _ = _commit(agent, big)
    _commit(agent, small)
    url = _nar_url(big_info)
    size = int(_field(big_info, "FileSize"))
    assert size > 6 << 20, "the NAR must outlast the socket buffers"
    with _connect(agent) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        buf = bytearray()
        s.sendall(_get(url))
        time.sleep(0.3)  # the agent is sending, waiting for room
        s.sendall(_get(f"/{small}.narinfo"))
        status, fields, nar = _read_response(s, buf)
        assert status == 200 and len(nar) == size and "server" not in fields
        status, fields, narinfo = _read_response(s, buf)
        assert status == 200 and narinfo.startswith(b"StorePath: ") and "server" in fields
        s.sendall(_get(f"/{small}.narinfo"))  # pipelined once: aiohttp's from now on
        assert "server" in _read_response(s, buf)[1]


def test_a_nar_whose_file_was_lost_is_fetched_again_and_counted_once(
        agent: AgentProcess, small_closure: Closure) -> None:
    narinfo, nar = _commit(agent, hash_part(small_closure.paths[0]))
    url = _nar_url(narinfo)
    with _connect(agent) as s:
        buf = bytearray()
        s.sendall(_get(url))
        status, fields, body = _read_response(s, buf)
        assert (status, body) == (200, nar) and "server" not in fields  # the fast path's
        (agent.store / url[1:]).unlink()
        lookups = agent.metric("flox_node_cache_lookups_total", kind="nar")
        local = agent.metric("flox_node_cache_lookups_total", kind="nar", source="local")
        s.sendall(_get(url))
        status, fields, body = _read_response(s, buf)
        assert (status, body) == (200, nar) and "server" in fields  # declined: aiohttp's
    # The fast path found the file gone and declined before counting; the route counted the
    # lookup that answered it, once.
    assert agent.metric("flox_node_cache_lookups_total", kind="nar") == lookups + 1
    assert agent.metric("flox_node_cache_lookups_total", kind="nar", source="local") == local
    assert agent.metric("flox_node_cache_lookups_total", kind="nar", source="upstream") >= 1


def test_a_client_gone_mid_nar_leaves_the_agent_serving(
        agent: AgentProcess, big_path_closure: Closure) -> None:
    narinfo, nar = _commit(agent, hash_part(big_path_closure.roots[0]))
    for _ in range(5):
        s = _connect(agent)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.sendall(_get(_nar_url(narinfo)))
        s.recv(4096)
        s.close()  # mid-body
    with _connect(agent) as s:
        buf = bytearray()
        s.sendall(_get(_nar_url(narinfo)))
        assert _read_response(s, buf)[2] == nar
    assert "nar send failed" not in agent.logs()
    assert "Traceback" not in agent.logs()


def test_the_agent_stops_cleanly_with_open_connections_whoever_answered_them(
        agent: AgentProcess, small_closure: Closure) -> None:
    """aiohttp closes the connections it has a protocol for when it shuts down; the listener
    closes those the fast path alone answered, which aiohttp never heard of."""
    h = hash_part(small_closure.roots[0])
    _commit(agent, h)
    hits, served = _connect(agent), _connect(agent)
    hits.sendall(_get(f"/{h}.narinfo"))
    assert _read_response(hits, bytearray())[0] == 200
    served.sendall(_get("/nix-cache-info"))
    assert _read_response(served, bytearray())[0] == 200
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGTERM)
    for s in (hits, served):
        s.settimeout(10)
        assert s.recv(1) == b""
    assert agent.proc.wait(20) == 0
    assert "Traceback" not in agent.logs() and "unclosed" not in agent.logs()


def test_connections_that_were_sent_nars_leave_no_descriptor_behind(
        agent: AgentProcess, small_closure: Closure, big_path_closure: Closure) -> None:
    """Each connection keeps a duplicate of its socket from its first NAR on, and a NAR's file
    is open while it is sent: all of them are closed however the connection ends. (The store
    keeps one descriptor per file sent, store/openfiles.py: both are sent once before.)"""
    small_narinfo, small_nar = _commit(agent, hash_part(small_closure.roots[0]))
    big_narinfo, big_nar = _commit(agent, hash_part(big_path_closure.roots[0]))
    for narinfo, nar in ((small_narinfo, small_nar), (big_narinfo, big_nar)):
        with _connect(agent) as s:
            s.sendall(_get(_nar_url(narinfo)))
            assert _read_response(s, bytearray())[2] == nar
    time.sleep(0.5)  # the agent has seen those connections close
    before = agent.open_files()
    for n in range(12):
        s = _connect(agent)
        buf = bytearray()
        s.sendall(_get(_nar_url(small_narinfo)))  # one the socket takes whole, at once
        assert _read_response(s, buf)[2] == small_nar
        if n % 3 == 1:  # then a large one, read whole
            s.sendall(_get(_nar_url(big_narinfo)))
            assert _read_response(s, buf)[2] == big_nar
        elif n % 3 == 2:  # then a large one given up mid-body
            s.sendall(_get(_nar_url(big_narinfo)))
            s.recv(4096)
        s.close()
    deadline = time.monotonic() + 10
    while agent.open_files() > before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert agent.open_files() <= before
    assert "Traceback" not in agent.logs()
