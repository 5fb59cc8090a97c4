"""Clients cannot starve the agent (issue 12): idle and slow connections, stalled NAR readers,
bursts on the admin socket, and a second agent on the same store, socket or port."""

import asyncio
import contextlib
import json
import os
import resource
import select
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.agent import AgentProcess
from tests.support.nixenv import Closure, hash_part
from tests.support.upstream import UpstreamServer

# Generous: these are correctness bounds (the agent answers at all), not benchmarks.
ANSWER_WITHIN = 5.0


@pytest.fixture(autouse=True)
def _many_open_files() -> None:
    """The test itself holds a thousand sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < min(hard, 4096):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))


def _agent(tmp_path: Path, upstream: UpstreamServer, key: str, *flags: str,
           nofile: str | None = None) -> AgentProcess:
    agent = AgentProcess(tmp_path / "agent", [upstream.url], [key], "--recompress", "none",
                         *flags)
    if nofile:  # a low descriptor limit, so that exhausting it is within reach
        agent.args = ["prlimit", f"--nofile={nofile}", "--", *agent.args]
    return agent


@pytest.fixture
def started(request: pytest.FixtureRequest, tmp_path: Path, upstream_server: UpstreamServer,
            signing_key: tuple[Path, str]) -> Iterator[AgentProcess]:
    flags, nofile = request.param
    with _agent(tmp_path, upstream_server, signing_key[1], *flags, nofile=nofile) as agent:
        yield agent


def _http_get(url: str) -> tuple[int, bytes]:
    """GET with a deadline; a 503 at the connection cap is retried as a Nix client would."""
    deadline = time.monotonic() + ANSWER_WITHIN
    while True:
        try:
            with urllib.request.urlopen(url, timeout=ANSWER_WITHIN) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            if e.code != 503 or time.monotonic() > deadline:
                return e.code, e.read()
        time.sleep(0.2)


def _unix_request(path: Path, target: str, timeout: float = ANSWER_WITHIN) -> tuple[int, bytes]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _assert_everything_answers(agent: AgentProcess, narinfo_hash: str) -> None:
    started = time.monotonic()
    assert _http_get(agent.metrics_url + "/healthz") == (200, b"ok\n")
    assert _http_get(agent.metrics_url + "/readyz")[0] == 200
    status, body = _unix_request(agent.socket, "/v1/status")
    assert status == 200 and "budget_bytes" in json.loads(body)
    status, body = _http_get(f"{agent.url}/{narinfo_hash}.narinfo")
    assert status == 200 and body.startswith(b"StorePath: ")
    assert time.monotonic() - started < 4 * ANSWER_WITHIN


def _connect_many(port: int, count: int, rcvbuf: int | None = None) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        s = socket.socket()
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.connect(("127.0.0.1", port))
        socks.append(s)
    return socks


def _closed_by_server(s: socket.socket, wait: float) -> bool:
    """True when the server closed `s` (EOF or reset, after any answer it sent); False when the
    connection is still open and silent for `wait` seconds."""
    while True:
        if not select.select([s], [], [], wait)[0]:
            return False
        try:
            if not s.recv(1 << 20):
                return True
        except OSError:
            return True


def _cache_nar(agent: AgentProcess, root: str) -> str:
    """Fetch `root`'s narinfo and NAR through the agent, so both are committed; the NAR's URL."""
    status, body = _http_get(f"{agent.url}/{hash_part(root)}.narinfo")
    assert status == 200
    url = next(line[5:] for line in body.decode().splitlines() if line.startswith("URL: "))
    status, nar = _http_get(f"{agent.url}/{url}")
    assert status == 200 and nar
    return "/" + url


def _nofile_limits(agent: AgentProcess) -> tuple[int, int]:
    assert agent.proc is not None
    line = next(ln for ln in Path(f"/proc/{agent.proc.pid}/limits").read_text().splitlines()
                if ln.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


LOW_NOFILE = (("--header-timeout", "3"), "128:256")


@pytest.mark.parametrize("started", [LOW_NOFILE], indirect=True)
def test_a_thousand_idle_connections_starve_nothing_and_are_closed(
        started: AgentProcess, small_closure: Closure) -> None:
    agent = started
    assert _nofile_limits(agent) == (256, 256)  # the agent raised its own soft limit
    assert any(r.get("msg") == "max-connections lowered to fit the open-file limit"
               for r in agent.log_records())
    root = hash_part(small_closure.roots[0])
    _cache_nar(agent, small_closure.roots[0])

    idle = _connect_many(agent.port, 1000)
    try:
        _assert_everything_answers(agent, root)
        assert agent.open_files() < 256
        # Every idle connection is closed: past the cap at once with a JSON 503, the others
        # after the header timeout.
        assert all(_closed_by_server(s, 3 + 2) for s in idle)
        assert agent.metric("flox_node_cache_connections_closed_total", listener="tcp",
                            reason="header_timeout") > 0
        assert agent.metric("flox_node_cache_connections_closed_total", listener="tcp",
                            reason="refused") > 0
        _assert_everything_answers(agent, root)
    finally:
        for s in idle:
            s.close()


def test_a_connection_over_the_cap_is_answered_503_json(
        tmp_path: Path, upstream_server: UpstreamServer, signing_key: tuple[Path, str]) -> None:
    with _agent(tmp_path, upstream_server, signing_key[1], "--max-connections", "8") as agent:
        held = _connect_many(agent.port, 8)
        try:
            time.sleep(0.3)  # accepted, but not yet quiet long enough to be evicted
            with socket.create_connection(("127.0.0.1", agent.port), timeout=5) as s:
                s.sendall(b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = b""
                while chunk := s.recv(4096):
                    answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503 ")
            assert b"Retry-After: 1" in head
            assert "error" in json.loads(body)
        finally:
            for s in held:
                s.close()


@pytest.mark.parametrize("started", [LOW_NOFILE], indirect=True)
def test_a_slowloris_of_300_connections_starves_nothing_and_is_closed(
        started: AgentProcess, small_closure: Closure) -> None:
    agent = started
    root = hash_part(small_closure.roots[0])
    _cache_nar(agent, small_closure.roots[0])
    slow = _connect_many(agent.port, 300)
    request = f"GET /{root}.narinfo HTTP/1.1\r\nHost: agent\r\nX-Slow: ".encode()
    try:
        for second in range(6):  # one header byte a second, on every connection
            for s in slow:
                with contextlib.suppress(OSError):
                    s.send(request[second:second + 1] if second < 3 else b"x")
            if second == 2:
                _assert_everything_answers(agent, root)
                assert agent.open_files() < 256
            time.sleep(1)
        assert all(_closed_by_server(s, 2) for s in slow)
        assert agent.metric("flox_node_cache_connections_closed_total", listener="tcp",
                            reason="header_timeout") > 0
        _assert_everything_answers(agent, root)
    finally:
        for s in slow:
            s.close()


# Short connection deadlines: a running transfer must not be cut by them, only by the stall.
STALL = (("--client-stall-timeout", "8", "--header-timeout", "2", "--keepalive-timeout", "2"),
         None)


@pytest.mark.parametrize("started", [STALL], indirect=True)
def test_stalled_readers_of_one_nar_do_not_delay_another_and_are_dropped(
        started: AgentProcess, small_closure: Closure, big_path_closure: Closure) -> None:
    agent = started
    big = _cache_nar(agent, big_path_closure.roots[0])
    other = _cache_nar(agent, small_closure.roots[0])
    stalled = _connect_many(agent.port, 200, rcvbuf=4096)
    try:
        for s in stalled:  # ask for the big NAR and never read it
            s.sendall(f"GET {big} HTTP/1.1\r\nHost: agent\r\n\r\n".encode())
        time.sleep(1)
        started_at = time.monotonic()
        status, body = _http_get(agent.url + other)
        assert status == 200 and body
        assert time.monotonic() - started_at < ANSWER_WITHIN
        _assert_everything_answers(agent, hash_part(small_closure.roots[0]))
        time.sleep(8)
        assert all(_closed_by_server(s, 1) for s in stalled)
        assert agent.metric("flox_node_cache_stalled_sends_total") >= 200
        assert agent.metric("flox_node_cache_connections_closed_total", listener="tcp",
                            reason="header_timeout") == 0
    finally:
        for s in stalled:
            s.close()


@pytest.mark.parametrize("started", [(("--client-stall-timeout", "3"), None)], indirect=True)
def test_stalled_readers_of_a_nar_being_fetched_are_dropped_and_the_fetch_completes(
        started: AgentProcess, big_path_closure: Closure) -> None:
    agent = started
    status, body = _http_get(f"{agent.url}/{hash_part(big_path_closure.roots[0])}.narinfo")
    assert status == 200
    url = next(line[5:] for line in body.decode().splitlines() if line.startswith("URL: "))
    stalled = _connect_many(agent.port, 20, rcvbuf=4096)
    try:
        for s in stalled:  # the first starts the upstream fetch, the others join it
            s.sendall(f"GET /{url} HTTP/1.1\r\nHost: agent\r\n\r\n".encode())
        time.sleep(3 + 2)
        assert all(_closed_by_server(s, 1) for s in stalled)
        assert agent.metric("flox_node_cache_stalled_sends_total") >= 20
    finally:
        for s in stalled:
            s.close()
    status, nar = _http_get(f"{agent.url}/{url}")
    assert status == 200 and nar
    assert agent.metric("flox_node_cache_lookups_total", kind="nar", source="local") == 1


STATUS = b"GET /v1/status HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"


async def _answer(s: socket.socket) -> tuple[int, dict]:
    loop = asyncio.get_running_loop()
    data = b""
    while chunk := await loop.sock_recv(s, 65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.mark.parametrize("started", [(("--max-connections", "300"), None)], indirect=True)
async def test_a_burst_of_1000_admin_requests_is_queued_or_answered(
        started: AgentProcess) -> None:
    socks = [socket.socket(socket.AF_UNIX) for _ in range(1000)]
    try:
        refused = []
        for s in socks:  # as fast as one process can: connect, send the request
            s.setblocking(False)
            if error := s.connect_ex(str(started.socket)):
                refused.append(os.strerror(error))  # EAGAIN: the backlog is full
            else:
                s.send(STATUS)
        assert refused == []
        answers = await asyncio.wait_for(asyncio.gather(*(_answer(s) for s in socks)), 60)
    finally:
        for s in socks:
            s.close()
    for status, body in answers:
        answered = status == 200 and "budget_bytes" in body
        assert answered or (status in (429, 503) and body["error"]), (status, body)
    assert sum(status == 200 for status, _ in answers) >= 300


def _run_second(agent: AgentProcess) -> subprocess.CompletedProcess[str]:
    return subprocess.run(agent.args, capture_output=True, text=True, timeout=60,
                          env=agent.env)


def test_a_second_agent_on_the_same_store_or_socket_refuses_to_start(
        tmp_path: Path, upstream_server: UpstreamServer, signing_key: tuple[Path, str],
        small_closure: Closure) -> None:
    key = signing_key[1]
    with _agent(tmp_path, upstream_server, key) as first:
        in_flight = first.store / ".tmp" / "in-flight-download"
        in_flight.write_bytes(b"partial NAR")
        same_store = AgentProcess(tmp_path / "second", [upstream_server.url], [key],
                                  store=first.store)
        same_socket = AgentProcess(first.workdir, [upstream_server.url], [key],
                                   store=tmp_path / "other-store")
        for second, what in ((same_store, "store"), (same_socket, "socket")):
            result = _run_second(second)
            assert result.returncode == 2, result.stderr
            assert f"the {what} " in result.stderr and "in use by another agent" in result.stderr
            assert f"pid {first.proc.pid}" in result.stderr  # type: ignore[union-attr]
            assert "Traceback" not in result.stderr
            assert first.socket.is_socket()
            assert in_flight.read_bytes() == b"partial NAR"
            _assert_everything_answers(first, hash_part(small_closure.roots[0]))
    # The lock dies with its holder: the store is usable again at once.
    with _agent(tmp_path, upstream_server, key) as again:
        _assert_everything_answers(again, hash_part(small_closure.roots[0]))


def test_too_low_an_open_file_limit_is_a_clear_error(
        tmp_path: Path, upstream_server: UpstreamServer, signing_key: tuple[Path, str]) -> None:
    agent = _agent(tmp_path, upstream_server, signing_key[1], nofile="128:128")
    result = _run_second(agent)
    assert result.returncode == 2
    assert "open-file limit (128) is too low" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_port_in_use_is_a_clear_error(tmp_path: Path, upstream_server: UpstreamServer,
                                        signing_key: tuple[Path, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        agent = _agent(tmp_path, upstream_server, signing_key[1])
        agent.args[agent.args.index("--listen") + 1] = f"127.0.0.1:{port}"
        result = _run_second(agent)
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port} (--listen): Address already in use" \
        in result.stderr
    assert "Traceback" not in result.stderr
    assert not agent.socket.exists()  # it cleaned up after itself
