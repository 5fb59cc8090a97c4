"""Bad input against the real agent process: hostile request paths, oversized requests, a
misused admin API and malformed upstream narinfos. Every answer is a clear 4xx (or a 503 when
the upstream misbehaves), never a traceback, and the agent keeps serving.

Malformed upstream narinfos, and what the client gets (documented behaviour):
  missing field, bad hash, StorePath of another path, larger than 1 MiB, not UTF-8 -> 503
      with Retry-After: a 200 that is not a narinfo of the path is an error of the upstream
      (its circuit counts it), never "not there" (a 404 would be cached by Nix for an hour);
      counted as verification_failures_total{reason="malformed"};
  unsigned -> 404 saying so: the path is not available from this cache, so Nix tries its
      next substituter; counted as verification_failures_total{reason="signature"}.
"""

import asyncio
import contextlib
import json
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from agent.nix import narinfo
from agent.nix.signing import SecretKey, add_signature
from tests.support.agent import AgentProcess
from tests.support.nixenv import Closure, hash_part
from tests.support.upstream import UpstreamServer

# Fake hash parts for the bad narinfos (valid nix32, not real paths).
H = {name: c * 31 + "z" for name, c in [
    ("missing", "1"), ("badhash", "2"), ("mismatch", "3"), ("huge", "4"), ("unsigned", "5"),
    ("binary", "6"), ("badsize", "7"), ("badref", "8"), ("large", "9")]}


def _bad_cache(src: Path, dest: Path, closure: Closure, key_file: Path) -> Path:
    """A copy of the published cache plus one malformed narinfo per case of H."""
    shutil.copytree(src, dest)
    real = narinfo.parse((src / f"{hash_part(closure.paths[-1])}.narinfo").read_text())
    key = SecretKey.parse(key_file.read_text())

    def signed_text(hash_part_: str, **changes: object) -> str:
        from dataclasses import replace
        info = replace(real, store_path=narinfo.StorePath(hash_part_, "bad"), sigs=(),
                       **changes)
        return add_signature(info, key).render()

    def drop(text: str, key_: str) -> str:
        return "".join(line + "\n" for line in text.splitlines()
                       if not line.startswith(key_ + ":"))

    def swap(text: str, key_: str, value: str) -> str:
        return drop(text, key_) + f"{key_}: {value}\n"

    files = {
        "missing": drop(signed_text(H["missing"]), "NarHash"),
        "badhash": swap(signed_text(H["badhash"]), "NarHash", "sha256:not-a-hash"),
        "mismatch": (src / f"{hash_part(closure.paths[-1])}.narinfo").read_text(),
        "huge": signed_text(H["huge"]) + "".join(f"X-Pad{i}: {'p' * 100}\n"
                                                 for i in range(20_000)),
        "large": signed_text(H["large"]) + "".join(f"X-Pad{i}: {'p' * 100}\n"
                                                   for i in range(3_000)),
        "unsigned": drop(signed_text(H["unsigned"]), "Sig"),
        "badsize": swap(signed_text(H["badsize"]), "NarSize", "-5"),
        "badref": swap(signed_text(H["badref"]), "References", "../../etc/passwd"),
    }
    for name, text in files.items():
        (dest / f"{H[name]}.narinfo").write_text(text)
    (dest / f"{H['binary']}.narinfo").write_bytes(b"StorePath: \xff\xfe\x00\n" * 10)
    return dest


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, published_cache: Path,
          small_closure: Closure, signing_key: tuple[Path, str]) -> Iterator[AgentProcess]:
    work = tmp_path_factory.mktemp("bad-input")
    cache = _bad_cache(published_cache, work / "cache", small_closure, signing_key[0])
    with UpstreamServer(cache) as up, \
            AgentProcess(work / "agent", [up.url], [signing_key[1]],
                         "--negative-ttl", "0", "--circuit-failures", "1000") as a:
        yield a


def _ready(agent: AgentProcess) -> None:
    with urllib.request.urlopen(agent.metrics_url + "/readyz", timeout=5) as r:
        assert r.status == 200


async def _raw(agent: AgentProcess, request: bytes, *, unix: bool = False) -> bytes:
    """Send raw bytes (no client-side normalisation) and read the whole answer."""
    if unix:
        reader, writer = await asyncio.open_unix_connection(str(agent.socket))
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", agent.port)
    try:
        writer.write(request)
        # The server may close before reading everything it was sent.
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        try:
            return await asyncio.wait_for(reader.read(), 10)
        except ConnectionError:
            return b""
    finally:
        writer.close()


def _get(target: bytes, headers: bytes = b"") -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + headers + b"\r\n"


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")) else 0


# --- request paths ---------------------------------------------------------------------------

HOSTILE = [
    b"/../../../etc/passwd", b"/%2e%2e/%2e%2e/etc/passwd", b"/%252e%252e%252fetc%252fpasswd",
    b"/..%2f..%2fetc%2fpasswd", b"/nar/../../etc/passwd", b"/nar/..%5c..%5cetc%5cpasswd",
    b"/nar/..\\..\\etc\\passwd", b"/%00.narinfo", b"/" + b"0" * 32 + b"%00.narinfo",
    b"/etc/passwd", b"//etc/passwd", b"http://evil/etc/passwd", b"/nar/%2fetc%2fpasswd",
    b"/.index.sqlite", b"/.tmp/", b"/nix-cache-info/../.index.sqlite", b"/nar/",
    b"/" + b"0" * 31 + b".narinfo", b"/" + b"0" * 33 + b".narinfo",
    b"/" + b"E" * 32 + b".narinfo", b"/" + b"e" * 32 + b".narinfo",
    b"/nar/" + b"0" * 52 + b".nar.exe", b"/nar/" + b"0" * 51 + b".nar",
    b"/nar/" + b"0" * 52 + b".nar.xz/../../.index.sqlite", b"/nar/" + b"u" * 52 + b".nar",
]


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
async def test_hostile_paths_are_4xx_and_touch_nothing(agent: AgentProcess, unix: bool) -> None:
    for target in HOSTILE:
        raw = await _raw(agent, _get(target), unix=unix)
        assert 400 <= _status(raw) < 500, (target, raw[:200])
        assert b"Traceback" not in raw and b"root:" not in raw and b"SQLite" not in raw
    _ready(agent)


async def test_huge_header_and_url_are_refused_and_the_agent_keeps_serving(
        agent: AgentProcess, small_closure: Closure) -> None:
    big_header = b"X-Big: " + b"a" * 100_000 + b"\r\n"
    raw = await _raw(agent, _get(b"/nix-cache-info", big_header))
    assert _status(raw) in (400, 431), raw[:200]
    many_headers = b"".join(b"X-H%d: v\r\n" % i for i in range(5000))
    raw = await _raw(agent, _get(b"/nix-cache-info", many_headers))
    assert _status(raw) in (400, 431), raw[:200]
    raw = await _raw(agent, _get(b"/" + b"a" * 10_000_000))
    assert _status(raw) in (0, 400, 414), raw[:200]  # 0: refused by closing the connection
    assert b"Traceback" not in raw
    raw = await _raw(agent, b"GARBAGE\r\n\r\n")
    assert _status(raw) == 400 and b"Traceback" not in raw
    _ready(agent)
    async with aiohttp.ClientSession() as s, \
            s.get(f"{agent.url}/{hash_part(small_closure.roots[0])}.narinfo") as r:
        assert r.status == 200


# --- admin API -------------------------------------------------------------------------------

async def _admin(agent: AgentProcess, method: str, path: str, data: bytes | str | None = None,
                 **kw: object) -> tuple[int, str]:
    async with agent.unix_session() as s, \
            s.request(method, f"http://agent{path}", data=data, **kw) as r:
        return r.status, await r.text()


def _assert_json_error(status: int, text: str, status_range: tuple[int, int] = (400, 499)) \
        -> str:
    assert status_range[0] <= status <= status_range[1], text
    assert "Traceback" not in text and 'File "' not in text
    body = json.loads(text)
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], body
    return body["error"]


BAD_PREWARMS: list[tuple[str, object, str]] = [
    ("non-JSON", b"{not json", "JSON"),
    ("array", [1, 2], "object"),
    ("string", "acme/web", "object"),
    ("unknown field", {"ref": "a/b", "colour": "red"}, "colour"),
    ("ref type", {"ref": 5}, "ref"),
    ("system type", {"ref": "a/b", "system": ["x"]}, "system"),
    ("store_paths type", {"store_paths": "/nix/store/x"}, "store_paths"),
    ("store_paths items", {"store_paths": [1]}, "store_paths"),
    ("nothing", {}, "exactly one"),
    ("two targets", {"ref": "a/b", "store_paths": ["/nix/store/" + "0" * 32 + "-x"]},
     "exactly one"),
    ("ref ../x", {"ref": "../x"}, ""),
    ("ref a/b/c", {"ref": "a/b/c"}, ""),
    ("ref negative generation", {"ref": "owner/env:-1"}, ""),
    ("ref empty owner", {"ref": "/env"}, ""),
    ("ref NUL", {"ref": "own\u0000er/env"}, ""),
    ("lockfile not JSON", {"lockfile": "{{{"}, "lockfile"),
    ("lockfile wrong version", {"lockfile": json.dumps({"lockfile-version": 99})}, "lockfile"),
    ("lockfile packages not a list", {"lockfile": json.dumps(
        {"lockfile-version": 1, "packages": {"a": 1}})}, "lockfile"),
    ("lockfile bad store path", {"lockfile": json.dumps({"lockfile-version": 1, "packages": [
        {"install_id": "x", "store_path": "/etc/passwd", "system": "x86_64-linux"}]})},
     "lockfile"),
    ("store path outside the store", {"store_paths": ["/etc/passwd"]}, ""),
    ("store path traversal", {"store_paths": ["/nix/store/../../etc/passwd"]}, ""),
    ("store path bad hash", {"store_paths": ["/nix/store/" + "e" * 32 + "-x"]}, ""),
    ("store path no name", {"store_paths": ["/nix/store/" + "0" * 32]}, ""),
]


@pytest.mark.parametrize("case,body,message", BAD_PREWARMS, ids=[b[0] for b in BAD_PREWARMS])
async def test_bad_prewarm_requests_are_clear_json_4xx(
        agent: AgentProcess, case: str, body: object, message: str) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body)
    status, text = await _admin(agent, "POST", "/v1/prewarm", data,
                                headers={"Content-Type": "application/json"})
    error = _assert_json_error(status, text)
    assert message.lower() in error.lower(), error


async def test_other_admin_misuse_is_clear_json_4xx(agent: AgentProcess) -> None:
    for method, path, data in [
        ("GET", "/v1/prewarm/no-such-job", None),
        ("GET", "/v1/prewarm/..%2f..%2fetc", None),
        ("DELETE", "/v1/pins/nobody/nothing", None),
        ("POST", "/v1/gc", b"[]"),
        ("POST", "/v1/gc", b"\xff\xfe"),
    ]:
        status, text = await _admin(agent, method, path, data)
        _assert_json_error(status, text)
    status, text = await _admin(agent, "GET", "/v1/nothing-here")
    assert status == 404 and "Traceback" not in text
    _ready(agent)


async def test_a_5mb_admin_body_is_413_json(agent: AgentProcess) -> None:
    big = json.dumps({"lockfile": "x" * 5_000_000})
    status, text = await _admin(agent, "POST", "/v1/prewarm", big)
    _assert_json_error(status, text, (413, 413))


async def test_a_5mb_admin_body_is_413_and_the_agent_keeps_serving(agent: AgentProcess) -> None:
    big = json.dumps({"lockfile": "x" * 5_000_000})
    status, text = await _admin(agent, "POST", "/v1/prewarm", big)
    assert status == 413 and "Traceback" not in text

    async def chunks():  # no Content-Length: the limit must hold while reading
        for _ in range(50):
            yield b"x" * 100_000

    status, text = await _admin(agent, "POST", "/v1/gc", chunks())
    assert status == 413 and "Traceback" not in text
    _ready(agent)
    status, text = await _admin(agent, "GET", "/v1/status")
    assert status == 200 and "used_bytes" in json.loads(text)


# --- malformed narinfos from upstream --------------------------------------------------------

@pytest.mark.parametrize("case,status,reason", [
    ("missing", 503, "malformed"),
    ("badhash", 503, "malformed"),
    ("mismatch", 503, "malformed"),
    ("badsize", 503, "malformed"),
    ("badref", 503, "malformed"),
    ("unsigned", 404, "signature"),
    ("huge", 503, "malformed"),
    ("binary", 503, "malformed"),
])
async def test_malformed_upstream_narinfos_are_refused_and_not_committed(
        agent: AgentProcess, case: str, status: int, reason: str | None) -> None:
    before = agent.metric("flox_node_cache_verification_failures_total", reason=reason)
    async with aiohttp.ClientSession() as s, s.get(f"{agent.url}/{H[case]}.narinfo") as r:
        assert r.status == status, await r.text()
        text = await r.text()
        if status == 503:
            assert r.headers.get("Retry-After")
    assert "Traceback" not in text
    if case == "unsigned":
        assert text == "not signed\n"
    after = agent.metric("flox_node_cache_verification_failures_total", reason=reason)
    assert after == before + 1
    assert not (agent.store / f"{H[case]}.narinfo").exists()
    async with agent.unix_session() as s, s.get("http://agent/v1/status") as r:
        assert r.status == 200
    _ready(agent)


async def test_an_oversized_upstream_narinfo_is_counted_as_a_verification_failure(
        agent: AgentProcess) -> None:
    before = agent.metric("flox_node_cache_verification_failures_total")
    async with aiohttp.ClientSession() as s, s.get(f"{agent.url}/{H['huge']}.narinfo") as r:
        assert r.status == 503
    assert agent.metric("flox_node_cache_verification_failures_total") > before


async def test_a_large_valid_upstream_narinfo_is_read_whole(agent: AgentProcess) -> None:
    async with aiohttp.ClientSession() as s, s.get(f"{agent.url}/{H['large']}.narinfo") as r:
        assert r.status == 200
        text = await r.text()
    assert "X-Pad2999: " + "p" * 100 in text
