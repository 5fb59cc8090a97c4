"""Corruption is healed, not fatal (issue 12): a corrupt index is rebuilt from the store's own
files; a NAR gone from the store (deleted by hand, or evicted after a client read its narinfo)
is fetched again, byte for byte. The real agent, the real Nix client."""

import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp
import pytest

from tests.store.test_faults import verify, wait_for
from tests.support.agent import AgentProcess
from tests.support.nixenv import Closure, hash_part, nix_copy, nix_env, path_valid_in
from tests.support.upstream import UpstreamServer


def narinfo_file(store: Path, path: str) -> Path:
    return store / f"{hash_part(path)}.narinfo"


def url_of(text: str) -> str:
    return next(x[5:] for x in text.splitlines() if x.startswith("URL: "))


def wait_reencoded(store: Path, closure: Closure) -> None:
    """Until no narinfo names the upstream's xz: each NAR is zstd, or uncompressed where zstd
    barely shrinks it (the small closure's random contents)."""
    wait_for(lambda: all("Compression: xz" not in narinfo_file(store, p).read_text()
                         for p in closure.paths), "every NAR to be re-encoded")


async def served(agent: AgentProcess, paths: list[str]) -> dict[str, tuple[str, bytes]]:
    """Every path's narinfo text and NAR bytes, as the agent serves them."""
    out = {}
    async with aiohttp.ClientSession() as s:
        for p in paths:
            async with s.get(f"{agent.url}/{hash_part(p)}.narinfo") as r:
                assert r.status == 200, p
                text = await r.text()
            async with s.get(f"{agent.url}/{url_of(text)}") as r:
                assert r.status == 200, p
                out[p] = (text, await r.read())
    return out


def _truncate(data: bytes) -> bytes:
    return data[:len(data) // 2]


def _flip(data: bytes) -> bytes:
    mid = len(data) // 2
    return data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 64]) + data[mid + 64:]


def _header(data: bytes) -> bytes:
    return b"\x00" * 100 + data[100:]


@pytest.mark.parametrize("damage", [_truncate, _flip, _header], ids=["truncated", "flipped",
                                                                      "header"])
async def test_a_corrupt_index_is_rebuilt_from_the_store_and_serves_the_same_bytes(
        tmp_path: Path, upstream_server: UpstreamServer, signing_key: tuple[Path, str],
        small_closure: Closure, damage) -> None:  # type: ignore[no-untyped-def]
    key = signing_key[1]
    store = tmp_path / "store"
    with AgentProcess(tmp_path / "a", [upstream_server.url], [key], store=store) as agent:
        r = nix_copy(agent.url, tmp_path / "warm", small_closure.roots, [key])
        assert r.returncode == 0, r.stderr
        wait_reencoded(store, small_closure)
        before = await served(agent, small_closure.paths)
        assert subprocess.run([sys.executable, "-m", "agent", "prewarm", "--store-path",
                               small_closure.roots[0], "--pin", "--socket", str(agent.socket)],
                              capture_output=True).returncode == 0
    index = store / ".index.sqlite"
    index.write_bytes(damage(index.read_bytes()))
    found = verify(store)  # a tool beside the agent says so, and leaves it to the agent
    assert found.returncode == 1 and "restart the agent" in " ".join(found.stderr.split())
    # A damaged NAR too: the rebuild must not vouch for it.
    damaged = small_closure.chain[1]
    nar = store / url_of(narinfo_file(store, damaged).read_text())
    nar.write_bytes(_flip(nar.read_bytes()))

    upstream_server.reset_counts()
    with AgentProcess(tmp_path / "b", [upstream_server.url], [key], store=store) as agent:
        assert agent.metric("flox_node_cache_index_rebuilds_total") == 1
        intact = [p for p in small_closure.paths if p != damaged]
        after = await served(agent, intact)
        assert after == {p: before[p] for p in intact}  # byte for byte, narinfo and NAR
        assert upstream_server.count("/nar/*") == 0
        r = nix_copy(agent.url, tmp_path / "cold", small_closure.roots, [key])
        assert r.returncode == 0, r.stderr
        assert all(path_valid_in(tmp_path / "cold", p) for p in small_closure.paths)
        assert upstream_server.count("/nar/*") == 1  # only the damaged one, fetched again
        messages = [rec["msg"] for rec in agent.log_records()]
        assert any(m.startswith("index corrupt") and "pins" in m for m in messages)
        assert "index rebuilt" in messages
    assert list(store.glob(".index.sqlite.corrupt-*"))
    assert verify(store).returncode == 0


async def test_a_nar_deleted_by_hand_is_fetched_again_for_the_real_client(
        tmp_path: Path, upstream_server: UpstreamServer, signing_key: tuple[Path, str],
        small_closure: Closure) -> None:
    key = signing_key[1]
    root = small_closure.roots[0]
    zstd = small_closure.chain[-1]  # re-encoded to zstd; the others are stored uncompressed
    with AgentProcess(tmp_path / "a", [upstream_server.url], [key]) as agent:
        assert nix_copy(agent.url, tmp_path / "warm", [root], [key]).returncode == 0
        wait_reencoded(agent.store, small_closure)
        nar = agent.store / url_of(narinfo_file(agent.store, zstd).read_text())
        assert nar.name.endswith(".nar.zst")
        original = nar.read_bytes()
        nar.unlink()

        # A client holding a narinfo that names the re-encoded file gets those very bytes:
        # the upstream's xz, re-encoded on the way and verified against the FileHash.
        [(_, body)] = (await served(agent, [zstd])).values()
        assert body == original
        assert agent.metric("flox_node_cache_nar_refetches_total") == 1
        # The entry was forgotten: for the real client the path is a miss, fetched again
        # (here it lands on the original encoding, still kept for its grace period).
        for attempt in range(2):
            r = nix_copy(agent.url, tmp_path / f"after-{attempt}", [zstd], [key])
            assert r.returncode == 0, r.stderr
            assert path_valid_in(tmp_path / f"after-{attempt}", zstd)
        assert (agent.store / url_of(narinfo_file(agent.store, zstd).read_text())).exists()

        # The real client asking for a deleted file it holds the narinfo of (uncompressed).
        other = small_closure.chain[1]
        (agent.store / url_of(narinfo_file(agent.store, other).read_text())).unlink()
        r = nix_copy(agent.url, tmp_path / "other", [other], [key])
        assert r.returncode == 0, r.stderr
        assert agent.metric("flox_node_cache_nar_refetches_total") == 2
        assert agent.metric("flox_node_cache_http_requests_total", code="500") == 0
    assert verify(agent.store).returncode == 0


@pytest.mark.parametrize("recompress", ["zstd", "none"])
async def test_a_nar_evicted_between_narinfo_and_nar_is_fetched_again(
        tmp_path: Path, upstream_server: UpstreamServer, signing_key: tuple[Path, str],
        small_closure: Closure, recompress: str) -> None:
    key = signing_key[1]
    root = small_closure.roots[0]
    leaf = small_closure.chain[-1]  # re-encoded to zstd under --recompress zstd
    # No direct-read grace: the test itself reads the store's files (wait_reencoded), which
    # would otherwise keep them from eviction like a node's reads.
    with AgentProcess(tmp_path / "a", [upstream_server.url], [key], "--recompress",
                      recompress, "--gc-interval", "3600", "--store-budget", "1",
                      "--direct-read-grace", "0") as agent:
        assert nix_copy(agent.url, tmp_path / "warm", [root], [key]).returncode == 0
        if recompress == "zstd":
            wait_reencoded(agent.store, small_closure)
        [(text, body)] = (await served(agent, [leaf])).values()
        assert url_of(text).endswith({"zstd": ".nar.zst", "none": ".nar.xz"}[recompress])

        gc = subprocess.run([sys.executable, "-m", "agent", "gc", "--socket",
                             str(agent.socket)], capture_output=True, text=True)
        assert gc.returncode == 0, gc.stderr
        assert not (agent.store / url_of(text)).exists()  # evicted after the narinfo
        async with aiohttp.ClientSession() as s, s.get(f"{agent.url}/{url_of(text)}") as r:
            assert r.status == 200
            assert await r.read() == body
        assert agent.metric("flox_node_cache_nar_refetches_total") == 1


def realise(dest_root: Path, path: str, substituters: list[str], key: str) \
        -> subprocess.CompletedProcess:
    """The node's view: `nix-store -r` with several substituters, in priority order."""
    with tempfile.TemporaryDirectory(prefix="nix-xdg-") as xdg:
        env = nix_env(f"substituters = {' '.join(substituters)}\ntrusted-public-keys = {key}\n"
                      "require-sigs = true\nnarinfo-cache-negative-ttl = 0\n"
                      "narinfo-cache-positive-ttl = 0\n")
        env["XDG_CACHE_HOME"] = xdg
        return subprocess.run(["nix-store", "--store", str(dest_root), "-r", path], env=env,
                              capture_output=True, text=True, timeout=300)


async def test_a_nar_gone_without_a_source_is_a_404_the_client_falls_through(
        tmp_path: Path, upstream_server: UpstreamServer, signing_key: tuple[Path, str],
        small_closure: Closure) -> None:
    """After a rebuild the store knows no source for its NARs: a file then deleted is a 404,
    and the real Nix client, holding its narinfo, moves on to its next substituter."""
    key = signing_key[1]
    store = tmp_path / "store"
    leaf = small_closure.chain[-1]
    with AgentProcess(tmp_path / "a", [upstream_server.url], [key], store=store) as agent:
        assert nix_copy(agent.url, tmp_path / "warm", [leaf], [key]).returncode == 0
        wait_reencoded(store, Closure([leaf], [leaf]))
    (store / ".index.sqlite").write_bytes(b"\0" * 100)  # rebuilt: no sources known
    with AgentProcess(tmp_path / "b", [upstream_server.url], [key], store=store) as agent:
        (store / url_of(narinfo_file(store, leaf).read_text())).unlink()
        upstream_server.reset_counts()
        r = realise(tmp_path / "node", leaf, [agent.url, f"{upstream_server.url}?priority=90"],
                    key)
        assert r.returncode == 0, r.stderr
        assert path_valid_in(tmp_path / "node", leaf)
        assert agent.metric("flox_node_cache_http_requests_total", endpoint="nar",
                            code="404") == 1
        assert upstream_server.count("/nar/*") == 1  # from the next substituter
