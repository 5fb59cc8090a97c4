"""The agent as a read-through Nix binary cache, driven by the real Nix client (issue 3)."""

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from tests.support.agent import AgentProcess
from tests.support.nixenv import Closure, hash_part, nar_request_path, nix_copy, path_valid_in
from tests.support.upstream import Fault, UpstreamServer, dead_url

# Fail fast instead of Nix's default five attempts and five-minute stall timeout.
QUICK = "download-attempts = 1\nstalled-download-timeout = 10\nconnect-timeout = 5\n"


@pytest.fixture
def agent(tmp_path: Path, upstream_server: UpstreamServer, signing_key: tuple[Path, str]):
    with AgentProcess(tmp_path / "agent", [upstream_server.url], [signing_key[1]]) as a:
        yield a


def _store_files(agent: AgentProcess) -> set[str]:
    root = agent.store
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if p.is_file() and not p.name.startswith(".index")}


def test_nix_copy_through_agent_then_second_client_costs_no_upstream(
        agent: AgentProcess, upstream_server: UpstreamServer, small_closure: Closure,
        signing_key: tuple[Path, str], tmp_path: Path) -> None:
    first = nix_copy(agent.url, tmp_path / "node1", small_closure.roots, [signing_key[1]])
    assert first.returncode == 0, first.stderr
    assert all(path_valid_in(tmp_path / "node1", p) for p in small_closure.paths)
    assert upstream_server.count("/nar/*") == len(small_closure.paths)

    upstream_server.reset_counts()
    second = nix_copy(agent.url, tmp_path / "node2", small_closure.roots, [signing_key[1]])
    assert second.returncode == 0, second.stderr
    assert all(path_valid_in(tmp_path / "node2", p) for p in small_closure.paths)
    assert upstream_server.requests == []
    assert agent.metric("flox_node_cache_lookups_total", kind="nar", source="local") \
        == len(small_closure.paths)


async def test_unix_socket_serves_the_same_bytes_as_tcp(
        agent: AgentProcess, small_closure: Closure) -> None:
    h = hash_part(small_closure.roots[0])
    async with agent.unix_session() as unix, aiohttp.ClientSession() as tcp:
        async with unix.get(f"http://agent/{h}.narinfo") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/x-nix-narinfo")
            via_socket = await r.text()
        async with tcp.get(f"{agent.url}/{h}.narinfo") as r:
            assert await r.text() == via_socket
        url = next(line.split(": ", 1)[1] for line in via_socket.splitlines()
                   if line.startswith("URL: "))
        async with unix.get(f"http://agent/{url}") as r:
            assert r.status == 200
            nar_socket = await r.read()
        async with tcp.get(f"{agent.url}/{url}") as r:
            assert r.headers["Accept-Ranges"] == "bytes"
            assert await r.read() == nar_socket
        async with tcp.get(f"{agent.url}/{url}", headers={"Range": "bytes=10-19"}) as r:
            assert r.status == 206
            assert await r.read() == nar_socket[10:20]
        async with unix.get("http://agent/nix-cache-info") as r:
            assert "StoreDir: /nix/store" in await r.text()


async def test_concurrent_cold_clients_cause_one_upstream_request_each(
        agent: AgentProcess, upstream_server: UpstreamServer, small_closure: Closure,
        signing_key: tuple[Path, str], tmp_path: Path) -> None:
    from tests.support.nixenv import nix_copy_async

    # Slow the upstream so the 20 clients really overlap.
    upstream_server.set_fault("*", Fault("delay", delay=0.3))
    results = await asyncio.gather(*[
        nix_copy_async(agent.url, tmp_path / f"node{i}", small_closure.roots, [signing_key[1]])
        for i in range(20)])
    for r in results:
        assert r.returncode == 0, r.stderr
    counts = upstream_server.counts
    for path in small_closure.paths:
        assert counts[f"/{hash_part(path)}.narinfo"] == 1, path
    assert upstream_server.count("/nar/*") == len(small_closure.paths)
    assert all(v == 1 for k, v in counts.items() if k.startswith("/nar/"))
    assert agent.metric("flox_node_cache_lookups_total", source="coalesced") > 0


def test_store_directory_is_a_file_substituter(
        agent: AgentProcess, small_closure: Closure, signing_key: tuple[Path, str],
        tmp_path: Path) -> None:
    assert nix_copy(agent.url, tmp_path / "warm", small_closure.roots,
                    [signing_key[1]]).returncode == 0
    r = nix_copy(f"file://{agent.store}", tmp_path / "pod", small_closure.roots,
                 [signing_key[1]])
    assert r.returncode == 0, r.stderr
    assert all(path_valid_in(tmp_path / "pod", p) for p in small_closure.paths)


@pytest.mark.parametrize("fault,reasons", [
    # A flipped byte inside xz data is caught by the decoder before the FileHash check.
    (Fault("tamper"), ("file_hash", "decompress")),
    (Fault("truncate"), ("file_size",)),
])
def test_corrupt_upstream_nar_is_never_committed(
        agent: AgentProcess, upstream_server: UpstreamServer, published_cache: Path,
        small_closure: Closure, signing_key: tuple[Path, str], tmp_path: Path,
        fault: Fault, reasons: tuple[str, ...]) -> None:
    root = small_closure.roots[0]
    upstream_server.set_fault(nar_request_path(published_cache, root), fault)
    r = nix_copy(agent.url, tmp_path / "node", [root], [signing_key[1]], extra_config=QUICK)
    assert r.returncode != 0
    assert not path_valid_in(tmp_path / "node", root)
    assert not (agent.store / f"{hash_part(root)}.narinfo").exists()
    assert sum(agent.metric("flox_node_cache_verification_failures_total", reason=r)
               for r in reasons) >= 1
    assert not any(f.startswith(".tmp/") for f in _store_files(agent))

    # Once the upstream is healthy again, a retry succeeds.
    upstream_server.clear_faults()
    r = nix_copy(agent.url, tmp_path / "retry", [root], [signing_key[1]], extra_config=QUICK)
    assert r.returncode == 0, r.stderr


def test_badly_signed_narinfo_is_refused(
        agent: AgentProcess, upstream_server: UpstreamServer, small_closure: Closure,
        signing_key: tuple[Path, str], tmp_path: Path) -> None:
    upstream_server.set_fault("*.narinfo", Fault("bad_signature"))
    r = nix_copy(agent.url, tmp_path / "node", small_closure.roots, [signing_key[1]],
                 extra_config=QUICK)
    assert r.returncode != 0
    assert upstream_server.count("/nar/*") == 0
    assert not list(agent.store.glob("*.narinfo"))
    assert agent.metric("flox_node_cache_verification_failures_total", reason="signature") >= 1


async def test_upstream_errors_are_503_not_404_and_misses_are_404(
        tmp_path: Path, upstream_server: UpstreamServer, signing_key: tuple[Path, str],
        small_closure: Closure) -> None:
    h = hash_part(small_closure.roots[0])
    upstream_server.set_fault("*.narinfo", Fault("status", code=502))
    with AgentProcess(tmp_path / "a", [upstream_server.url], [signing_key[1]]) as agent:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{agent.url}/{h}.narinfo") as r:
                assert r.status == 503
            upstream_server.clear_faults()
            async with s.get(f"{agent.url}/{'0' * 32}.narinfo") as r:
                assert r.status == 404
            async with s.get(f"{agent.url}/{h}.narinfo") as r:
                assert r.status == 200  # the error was not cached


async def test_dead_upstream_is_skipped_quickly_by_the_circuit_breaker(
        tmp_path: Path, upstream_server: UpstreamServer, signing_key: tuple[Path, str],
        small_closure: Closure) -> None:
    # The dead upstream comes first; after a few failures the breaker keeps it out of the way.
    with AgentProcess(tmp_path / "a", [dead_url(), upstream_server.url], [signing_key[1]],
                      "--circuit-failures", "2", "--circuit-cooldown", "60") as agent:
        async with aiohttp.ClientSession() as s:
            for _ in range(4):
                async with s.get(f"{agent.url}/{'1' * 32}.narinfo") as r:
                    # The dead upstream might have it: never a 404 that Nix caches for an hour.
                    assert r.status == 503
            start = time.monotonic()
            async with s.get(f"{agent.url}/{hash_part(small_closure.roots[0])}.narinfo") as r:
                assert r.status == 200
            assert time.monotonic() - start < 1.0
        assert agent.metric("flox_node_cache_upstream_circuit_open") == 1
        # Two real connection attempts, then the open circuit spared the dead upstream.
        assert agent.metric("flox_node_cache_upstream_errors_total", reason="connection") == 2
        assert agent.metric("flox_node_cache_upstream_errors_total", reason="circuit_open") >= 2


async def test_stream_through_sends_bytes_before_the_download_completes(
        tmp_path: Path, published_cache: Path, signing_key: tuple[Path, str],
        big_path_closure: Closure) -> None:
    # ~8 MB at 2 MB/s: the whole download takes about 4 s.
    with UpstreamServer(published_cache, bandwidth=2_000_000) as slow, \
            AgentProcess(tmp_path / "a", [slow.url], [signing_key[1]]) as agent:
        root = big_path_closure.roots[0]
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{agent.url}/{hash_part(root)}.narinfo") as r:
                url = next(x.split(": ", 1)[1] for x in (await r.text()).splitlines()
                           if x.startswith("URL: "))
            start = time.monotonic()
            async with s.get(f"{agent.url}/{url}") as r:
                first = await r.content.readany()
                first_at = time.monotonic() - start
                rest = await r.read()
                total_at = time.monotonic() - start
        assert first and rest
        assert first_at < total_at / 3, (first_at, total_at)
        assert slow.count("/nar/*") == 1


async def test_malformed_requests_are_rejected_without_touching_the_filesystem(
        agent: AgentProcess) -> None:
    async with aiohttp.ClientSession() as s:
        for path in ("/../../etc/passwd", "/nar/..%2F..%2Fetc%2Fpasswd", "/nar/%2Fetc%2Fpasswd",
                     "/e" * 16 + ".narinfo", "/UPPERCASEUPPERCASEUPPERCASE12345.narinfo",
                     "/nar/abc.nar.xz", "/nar/" + "e" * 52 + ".nar.exe", "/%00.narinfo",
                     "/.index.sqlite", "/nar/.." ):
            async with s.get(agent.url + path) as r:
                assert r.status in (400, 404), path
                assert "Traceback" not in await r.text()


def test_sigterm_leaves_no_temporary_files(
        tmp_path: Path, published_cache: Path, signing_key: tuple[Path, str],
        big_path_closure: Closure) -> None:
    with UpstreamServer(published_cache, bandwidth=1_000_000) as slow:
        agent = AgentProcess(tmp_path / "a", [slow.url], [signing_key[1]]).start()
        import threading

        t = threading.Thread(target=nix_copy, args=(agent.url, tmp_path / "n",
                                                     big_path_closure.roots, [signing_key[1]]),
                             kwargs={"extra_config": QUICK}, daemon=True)
        t.start()
        deadline = time.monotonic() + 20
        while not list((agent.store / ".tmp").iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list((agent.store / ".tmp").iterdir()), "the download never started"
        assert agent.stop() == 0
        assert list((agent.store / ".tmp").iterdir()) == []
        assert not agent.socket.exists()
        t.join(30)


def test_agent_adds_its_own_signature_and_keeps_the_upstream_one(
        tmp_path: Path, upstream_server: UpstreamServer, signing_key: tuple[Path, str],
        small_closure: Closure) -> None:
    from tests.support.nixenv import make_keypair

    agent_sk, agent_pk = make_keypair(tmp_path / "keys", "node-cache-1")
    with AgentProcess(tmp_path / "a", [upstream_server.url], [signing_key[1]],
                      "--signing-key-file", str(agent_sk)) as agent:
        # The client trusts only the agent's key: the agent's signature must be valid.
        r = nix_copy(agent.url, tmp_path / "n", small_closure.roots, [agent_pk])
        assert r.returncode == 0, r.stderr
        text = (agent.store / f"{hash_part(small_closure.roots[0])}.narinfo").read_text()
        sigs = [x for x in text.splitlines() if x.startswith("Sig: ")]
        assert sorted(s.split(":")[1].strip() for s in sigs) == ["node-cache-1",
                                                                  "upstream-test-1"]


async def test_a_client_leaving_mid_nar_never_leaks_bytes_into_other_connections(
        agent: AgentProcess, big_path_closure: Closure, signing_key: tuple[Path, str],
        tmp_path: Path) -> None:
    import socket

    root = big_path_closure.roots[0]
    assert nix_copy(agent.url, tmp_path / "warm", [root], [signing_key[1]]).returncode == 0
    h = hash_part(root)
    text = (agent.store / f"{h}.narinfo").read_text()
    url = next(x.split(": ", 1)[1] for x in text.splitlines() if x.startswith("URL: "))
    for _ in range(30):
        # Ask for the 8 MB NAR with a tiny receive buffer, read a little, and hang up...
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", agent.port))
        s.sendall(f"GET /{url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        s.recv(1024)
        s.close()
        # ...while new connections (which may get the same descriptor number) are served.
        async def ask() -> None:
            async with aiohttp.ClientSession() as session:
                for _ in range(3):
                    async with session.get(f"{agent.url}/{h}.narinfo") as r:
                        assert r.status == 200
                        # (the URL may change meanwhile: the NAR is being re-encoded to zstd)
                        assert (await r.text()).startswith(f"StorePath: {root}\n")

        await asyncio.gather(*(ask() for _ in range(8)))


async def test_listing_of_a_fetched_path_is_the_one_nix_writes(
        agent: AgentProcess, small_closure: Closure, signing_key: tuple[Path, str],
        tmp_path: Path) -> None:
    """`/<hash>.ls` is generated once, while the NAR is verified, and matches byte for byte
    the listing the real Nix writes for the same path (write-nar-listing)."""
    import json
    import subprocess

    from tests.support.nixenv import nix_env

    root = small_closure.roots[0]
    h = hash_part(root)
    async with aiohttp.ClientSession() as http, http.get(f"{agent.url}/{h}.ls") as r:
        assert r.status == 404  # nothing fetched yet: no listing, and none is fetched
    copied = nix_copy(agent.url, tmp_path / "node", [root], [signing_key[1]])
    assert copied.returncode == 0, copied.stderr
    nix_cache = tmp_path / "nix-listing"
    subprocess.run(["nix", "copy", "--to",
                    f"file://{nix_cache}?write-nar-listing=true&compression=none", root],
                   env=nix_env(), check=True, capture_output=True)
    written_by_nix = json.loads((nix_cache / f"{h}.ls").read_text())
    async with aiohttp.ClientSession() as http, http.get(f"{agent.url}/{h}.ls") as r:
        assert r.status == 200 and r.content_type == "application/json"
        assert await r.json() == written_by_nix
