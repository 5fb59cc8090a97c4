"""The test support does what the rest of the suite relies on, checked against real Nix."""

from __future__ import annotations

import hashlib
import itertools
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from agent.nix import narinfo
from agent.nix.hashes import Hash
from agent.nix.signing import PublicKey, verified_by
from tests.conftest import SMALL_SIZES
from tests.support.nixenv import (
    Closure,
    build_closure,
    hash_part,
    nar_request_path,
    nix_copy,
    nix_copy_async,
    nix_env,
    path_valid_in,
    publish,
    store_paths_of,
)
from tests.support.upstream import Fault, UpstreamServer, dead_url

# Fail fast instead of Nix's retries and 300 s stall timeout.
QUICK = "download-attempts = 1\nstalled-download-timeout = 5\nconnect-timeout = 2\n"
SHORT = aiohttp.ClientTimeout(total=5, sock_read=0.5)


def references(path: str) -> list[str]:
    out = subprocess.run(["nix-store", "-q", "--references", path], env=nix_env(),
                         capture_output=True, text=True, check=True).stdout
    return sorted(out.split())


def read_narinfo(cache: Path, path: str) -> narinfo.NarInfo:
    return narinfo.parse((cache / f"{hash_part(path)}.narinfo").read_text())


# --- nixenv: building and publishing ---------------------------------------------------


def test_closure_is_a_chain_of_real_references(small_closure: Closure) -> None:
    chain = small_closure.chain
    assert small_closure.roots == [chain[0]]
    assert store_paths_of(chain[0]) == sorted(chain) == small_closure.paths
    for here, nxt in itertools.pairwise(chain):
        assert references(here) == [nxt]
    assert references(chain[-1]) == []
    assert [(Path(p) / "data").stat().st_size for p in chain] == SMALL_SIZES
    assert small_closure.total_nar_size > sum(SMALL_SIZES)


def test_builds_are_deterministic_and_named(nix_workdir: Path, small_closure: Closure) -> None:
    assert build_closure(nix_workdir, "small", SMALL_SIZES) == small_closure
    other = build_closure(nix_workdir, "small-twin", SMALL_SIZES)
    assert not set(other.paths) & set(small_closure.paths)


def test_shared_dependency_is_referenced(nix_workdir: Path, small_closure: Closure) -> None:
    env = build_closure(nix_workdir, "sharer", [1_000, 10], shared=small_closure)
    assert references(env.chain[-1]) == [small_closure.roots[0]]
    assert set(env.paths) == set(env.chain) | set(small_closure.paths)


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_publish_compression(nix_workdir: Path, tmp_path: Path, compression: str) -> None:
    text = build_closure(nix_workdir, "texty", [100_000], compressible=True)
    publish(text.roots, tmp_path, None, compression)
    info = read_narinfo(tmp_path, text.roots[0])
    assert info.compression == compression
    assert info.sigs == ()
    nar = (tmp_path / info.url).read_bytes()
    if compression == "none":
        assert len(nar) == info.nar_size
    else:
        assert len(nar) < info.nar_size / 3  # text-like content compresses


def test_published_narinfos_are_signed_and_hashed(
        published_cache: Path, signing_key: tuple[Path, str], small_closure: Closure,
        big_path_closure: Closure) -> None:
    key = PublicKey.parse(signing_key[1])
    assert "StoreDir: /nix/store" in (published_cache / "nix-cache-info").read_text()
    for path in small_closure.paths + big_path_closure.paths:
        info = read_narinfo(published_cache, path)
        assert info.store_path.path() == path
        assert info.compression == "xz"
        assert verified_by(info, [key]) == key
        assert sorted(r.path() for r in info.references) == references(path)
        nar = (published_cache / info.url).read_bytes()
        assert info.file_hash == Hash.parse("sha256:" + hashlib.sha256(nar).hexdigest())
        assert info.file_size == len(nar)


# --- nix_copy through UpstreamServer ---------------------------------------------------


def test_nix_copy_from_upstream_fills_a_cold_root(
        upstream_server: UpstreamServer, cold_root: Path, small_closure: Closure,
        signing_key: tuple[Path, str], published_cache: Path, tmp_path: Path) -> None:
    proc = nix_copy(upstream_server.url, cold_root, small_closure.roots, [signing_key[1]])
    assert proc.returncode == 0, proc.stderr
    assert all(path_valid_in(cold_root, p) for p in small_closure.paths)
    assert store_paths_of(small_closure.roots[0], cold_root) == small_closure.paths
    assert not path_valid_in(tmp_path / "elsewhere", small_closure.roots[0])
    counts = upstream_server.counts
    assert counts["/nix-cache-info"] >= 1
    for path in small_closure.paths:
        assert counts[f"/{hash_part(path)}.narinfo"] >= 1
        assert counts[nar_request_path(published_cache, path)] == 1
    assert upstream_server.count("/nar/*") == len(small_closure.paths)
    upstream_server.reset_counts()
    assert upstream_server.counts == {}


def test_nix_copy_requires_a_trusted_signature(
        upstream_server: UpstreamServer, cold_root: Path, small_closure: Closure,
        signing_key: tuple[Path, str]) -> None:
    stranger = "stranger-1:" + signing_key[1].split(":", 1)[1]
    proc = nix_copy(upstream_server.url, cold_root, small_closure.roots, [stranger])
    assert proc.returncode != 0
    assert "lacks a valid signature" in proc.stderr


def test_nix_copy_fails_on_a_tampered_nar(
        upstream_server: UpstreamServer, cold_root: Path, small_closure: Closure,
        signing_key: tuple[Path, str]) -> None:
    upstream_server.set_fault("/nar/*", Fault("tamper"))
    proc = nix_copy(upstream_server.url, cold_root, small_closure.roots, [signing_key[1]],
                    extra_config=QUICK)
    assert proc.returncode != 0
    assert not path_valid_in(cold_root, small_closure.roots[0])


def test_nix_copy_rejects_a_bad_signature(
        upstream_server: UpstreamServer, cold_root: Path, small_closure: Closure,
        signing_key: tuple[Path, str]) -> None:
    upstream_server.set_fault("*.narinfo", Fault("bad_signature"))
    proc = nix_copy(upstream_server.url, cold_root, small_closure.roots, [signing_key[1]],
                    extra_config=QUICK)
    assert proc.returncode != 0
    assert "lacks a valid signature" in proc.stderr


def test_nix_copy_from_a_dead_upstream_fails(cold_root: Path, small_closure: Closure,
                                             signing_key: tuple[Path, str]) -> None:
    proc = nix_copy(dead_url(), cold_root, small_closure.roots, [signing_key[1]],
                    extra_config=QUICK, timeout=60)
    assert proc.returncode != 0
    assert "connect" in proc.stderr.lower()


async def test_nix_copy_async_succeeds_and_times_out(
        upstream_server: UpstreamServer, cold_root: Path, tmp_path: Path, small_closure: Closure,
        signing_key: tuple[Path, str]) -> None:
    proc = await nix_copy_async(upstream_server.url, cold_root, small_closure.roots,
                                [signing_key[1]])
    assert proc.returncode == 0, proc.stderr
    assert path_valid_in(cold_root, small_closure.roots[0])
    upstream_server.set_fault("/nar/*", Fault("stall"))
    with pytest.raises(subprocess.TimeoutExpired):
        await nix_copy_async(upstream_server.url, tmp_path / "stalled", small_closure.roots,
                             [signing_key[1]], timeout=1.5)


# --- UpstreamServer over HTTP ----------------------------------------------------------


async def fetch(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession(timeout=SHORT) as session, \
            session.request(method, url) as resp:
        return resp.status, dict(resp.headers), await resp.read()


@pytest.fixture
def nar(published_cache: Path, small_closure: Closure) -> tuple[str, bytes]:
    """(request path, bytes) of the 200 kB NAR."""
    url = nar_request_path(published_cache, small_closure.roots[0])
    return url, (published_cache / url.lstrip("/")).read_bytes()


async def test_serves_files_with_types_and_head(
        upstream_server: UpstreamServer, small_closure: Closure, nar: tuple[str, bytes]) -> None:
    info_path = f"/{hash_part(small_closure.roots[0])}.narinfo"
    status, headers, body = await fetch(upstream_server.url + info_path)
    assert (status, headers["Content-Type"]) == (200, "text/x-nix-narinfo")
    assert narinfo.parse(body.decode()).store_path.path() == small_closure.roots[0]
    status, headers, body = await fetch(upstream_server.url + nar[0], "HEAD")
    assert (status, body) == (200, b"")
    assert headers["Content-Type"] == "application/x-nix-nar"
    assert int(headers["Content-Length"]) == len(nar[1])
    assert (await fetch(upstream_server.url + "/" + "0" * 32 + ".narinfo"))[0] == 404
    assert (await fetch(upstream_server.url + "/../../etc/passwd"))[0] == 404
    assert upstream_server.counts[nar[0]] == 1


async def test_status_fault_applies_times(upstream_server: UpstreamServer,
                                          nar: tuple[str, bytes]) -> None:
    upstream_server.set_fault("/nar/*.xz", Fault("status", code=503, times=2))
    statuses = [(await fetch(upstream_server.url + nar[0]))[0] for _ in range(3)]
    assert statuses == [503, 503, 200]
    upstream_server.set_fault("/nar/*", Fault("status", code=500))
    upstream_server.clear_faults()
    assert (await fetch(upstream_server.url + nar[0]))[0] == 200
    assert upstream_server.counts[nar[0]] == 4


async def test_body_faults(upstream_server: UpstreamServer, nar: tuple[str, bytes]) -> None:
    url, good = nar
    upstream_server.set_fault(url, Fault("tamper", times=1))
    _, _, body = await fetch(upstream_server.url + url)
    assert len(body) == len(good)
    assert sum(a != b for a, b in zip(body, good, strict=True)) == 1
    upstream_server.set_fault(url, Fault("truncate", times=1))
    _, headers, body = await fetch(upstream_server.url + url)
    assert body == good[: len(good) // 2]
    assert int(headers["Content-Length"]) == len(good) // 2
    assert (await fetch(upstream_server.url + url))[2] == good


async def test_html_and_redirect_faults(upstream_server: UpstreamServer,
                                        nar: tuple[str, bytes]) -> None:
    upstream_server.set_fault("*.narinfo", Fault("html"))
    status, headers, body = await fetch(f"{upstream_server.url}/{'0' * 32}.narinfo")
    assert (status, headers["Content-Type"].split(";")[0]) == (200, "text/html")
    assert b"<html>" in body
    upstream_server.set_fault(nar[0], Fault("redirect", code=307, location="http://x.invalid"))
    async with aiohttp.ClientSession(timeout=SHORT) as session, \
            session.get(upstream_server.url + nar[0], allow_redirects=False) as resp:
        assert (resp.status, resp.headers["Location"]) == (307, "http://x.invalid" + nar[0])


async def test_bad_signature_fault(upstream_server: UpstreamServer, small_closure: Closure,
                                   signing_key: tuple[Path, str]) -> None:
    key = PublicKey.parse(signing_key[1])
    info_url = f"{upstream_server.url}/{hash_part(small_closure.roots[0])}.narinfo"
    upstream_server.set_fault("*.narinfo", Fault("bad_signature", times=1))
    bad = narinfo.parse((await fetch(info_url))[2].decode())
    good = narinfo.parse((await fetch(info_url))[2].decode())
    assert verified_by(good, [key]) == key
    assert verified_by(bad, [key]) is None
    assert [s.split(":")[0] for s in bad.sigs] == [key.name]
    assert bad.with_sigs(good.sigs) == good


@pytest.mark.parametrize(("kind", "error"), [
    ("stall", TimeoutError),
    ("reset", aiohttp.ClientError),
    ("wrong_length", aiohttp.ClientPayloadError),
])
async def test_broken_transfers(upstream_server: UpstreamServer, nar: tuple[str, bytes], kind: str,
                                error: type[BaseException]) -> None:
    upstream_server.set_fault(nar[0], Fault(kind))  # type: ignore[arg-type]
    start = time.monotonic()
    with pytest.raises(error):
        await fetch(upstream_server.url + nar[0])
    assert time.monotonic() - start < 3


async def test_slow_answers(upstream_server: UpstreamServer, nar: tuple[str, bytes]) -> None:
    upstream_server.set_fault(nar[0], Fault("drip", chunk=len(nar[1]) // 10 + 1, delay=0.05))
    start = time.monotonic()
    assert (await fetch(upstream_server.url + nar[0]))[2] == nar[1]
    assert time.monotonic() - start >= 0.45
    upstream_server.set_fault(nar[0], Fault("delay", delay=0.3))
    start = time.monotonic()
    assert (await fetch(upstream_server.url + nar[0]))[2] == nar[1]
    assert time.monotonic() - start >= 0.3


async def test_latency_and_bandwidth(published_cache: Path, nar: tuple[str, bytes]) -> None:
    with UpstreamServer(published_cache, latency=0.2, bandwidth=len(nar[1]) * 2) as server:
        start = time.monotonic()
        assert (await fetch(server.url + nar[0]))[2] == nar[1]
        assert time.monotonic() - start >= 0.2 + 0.45


async def test_dead_url_refuses_connections() -> None:
    with pytest.raises(aiohttp.ClientConnectorError):
        await fetch(dead_url() + "/nix-cache-info")
