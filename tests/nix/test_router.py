"""The URL router of the real aiohttp app, in-process: arbitrary request paths never give a 5xx
or a traceback, and only the exact names the store writes can ever answer 200.

Requests are written raw on a socket (not through a client that would normalise `..` or
re-encode), against an upstream that has nothing, so a well-formed miss is a 404 and any 5xx
would be the router's fault.
"""

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import config
from agent.app import build, cache_app
from agent.nix.nix32 import ALPHABET
from tests.support.upstream import UpstreamServer

SENTINEL = "SENTINEL-outside-the-store-7c1f"
ALWAYS_OK = {"/nix-cache-info", "/healthz", "/readyz"}
FRAGMENTS = ["..", ".", "%2e%2e", "%2E%2E", "%252e%252e", "%2f", "%2F", "%5c", "\\", "%00",
             "nar", ".narinfo", ".nar", ".nar.xz", ".ls", "secret", "etc", "passwd", "v1",
             "prewarm", "status", "//", "~", "%", "?", "#", ";", "a" * 32, "0" * 52,
             "e" * 32, "nix-cache-info", "readyz", "store", "../secret.narinfo"]


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[TestServer]:
    (tmp_path / "secret.narinfo").write_text(SENTINEL)
    (tmp_path / "secret").write_text(SENTINEL)
    empty = tmp_path / "empty-upstream"
    empty.mkdir()
    with UpstreamServer(empty) as up:
        cfg = config.load(None, {"store": str(tmp_path / "store"), "upstreams": [up.url],
                                 "kubernetes": "off", "negative_ttl": 0.0}, environ={})
        async with build(cfg) as parts:
            server = TestServer(cache_app(parts, "tcp", with_admin=False))
            await server.start_server()
            try:
                yield server
            finally:
                await server.close()


def _target(path: str) -> bytes:
    """The request target as sent: raw, except bytes HTTP cannot carry are %-encoded."""
    out = bytearray()
    for b in path.encode("utf-8", "surrogatepass"):
        out += b"%%%02X" % b if b <= 0x20 or b >= 0x7F else bytes([b])
    return bytes(out)


async def _get(server: TestServer, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(b"GET " + _target(path) + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    status = int(raw.split(b" ", 2)[1])
    return status, raw


def _servable(path: str) -> bool:
    # A query string or a fragment is not part of the path: "/nix-cache-info?" and
    # "/nix-cache-info#" are /nix-cache-info.
    return re.split(r"[?#]", path, maxsplit=1)[0] in ALWAYS_OK


paths = st.one_of(
    st.text(max_size=60).map(lambda s: "/" + s),
    st.lists(st.sampled_from(FRAGMENTS) | st.text(ALPHABET + "/.%", max_size=8),
             max_size=8).map(lambda parts: "/" + "/".join(parts)),
    st.lists(st.sampled_from(FRAGMENTS), max_size=6).map(lambda parts: "/" + "".join(parts)),
    st.text(ALPHABET, min_size=30, max_size=34).map(lambda h: f"/{h}.narinfo"),
    st.text(ALPHABET + ".", min_size=50, max_size=60).map(lambda h: f"/nar/{h}"),
)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=paths)
async def test_arbitrary_paths_never_5xx_nor_leak(server: TestServer, path: str) -> None:
    status, raw = await _get(server, path)
    assert status < 500, (path, raw[:300])
    assert b"Traceback" not in raw and SENTINEL.encode() not in raw
    if status == 200:
        assert _servable(path), (path, raw[:300])
    if not _servable(path):
        assert 400 <= status < 500


@pytest.mark.parametrize("path", [
    "/../secret.narinfo", "/%2e%2e/secret.narinfo", "/%252e%252e%252fsecret.narinfo",
    "/..%2fsecret", "/nar/../../secret", "/nar/%2e%2e%2f%2e%2e%2fsecret", "//etc/passwd",
    "/nar/..\\..\\secret", "/%00.narinfo", "/secret.narinfo", "/store/../secret",
    "/" + "0" * 32 + ".narinfo/../../secret", "/nar/" + "0" * 52 + ".nar.evil",
    "/nar/" + "0" * 52 + ".nar/../../secret", "/v1/status", "/metrics",
])
async def test_traversal_paths_are_4xx(server: TestServer, path: str) -> None:
    status, raw = await _get(server, path)
    assert 400 <= status < 500, raw[:300]
    assert SENTINEL.encode() not in raw


async def test_well_formed_names_are_plain_404_misses(server: TestServer) -> None:
    for path in ("/" + "0" * 32 + ".narinfo", "/nar/" + "1" * 52 + ".nar.xz",
                 "/nar/" + "1" * 52 + ".nar"):
        status, raw = await _get(server, path)
        assert status == 404, raw[:300]
    status, raw = await _get(server, "/nix-cache-info")
    assert status == 200 and re.search(rb"StoreDir: /nix/store", raw)


async def test_a_query_string_does_not_change_what_is_served(server: TestServer) -> None:
    assert (await _get(server, "/nix-cache-info?"))[0] == 200
    assert (await _get(server, "/nix-cache-info?x=../../etc/passwd"))[0] == 200
