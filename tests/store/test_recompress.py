"""NARs re-encoded after ingest: verified, signatures kept, old URL served a while; zstd where it
pays, uncompressed where zstd barely shrinks the NAR."""

import json
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from tests.support.agent import AgentProcess
from tests.support.nixenv import Closure, hash_part, nix_copy, path_valid_in
from tests.support.upstream import UpstreamServer


def fields(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        k, _, v = line.partition(": ")
        out.setdefault(k, []).append(v)
    return out


async def narinfo(agent: AgentProcess, path: str) -> dict[str, list[str]]:
    async with aiohttp.ClientSession() as s, s.get(f"{agent.url}/{hash_part(path)}.narinfo") as r:
        assert r.status == 200
        return fields(await r.text())


# The small closure's three larger paths hold random bytes, which zstd cannot shrink: they are
# stored uncompressed. The 10-byte one is mostly NAR framing, which zstd shrinks by half.
REENCODED_AS = {"small-0": "none", "small-1": "none", "small-2": "none", "small-3": "zstd"}
SUFFIX = {"none": ".nar", "zstd": ".nar.zst"}


def reencoding(path: str) -> str:
    return REENCODED_AS[Path(path).name.split("-", 1)[1]]


async def wait_reencoded(agent: AgentProcess, paths: list[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        infos = [await narinfo(agent, p) for p in paths]
        if all(i["Compression"] != ["xz"] for i in infos):
            return
        time.sleep(0.1)
    raise AssertionError(f"not re-encoded: {infos}")


async def test_reencoded_nars_keep_signatures_and_the_old_url_works_during_grace(
        tmp_path: Path, upstream_server: UpstreamServer, signing_key: tuple[Path, str],
        small_closure: Closure, published_cache: Path) -> None:
    # What the upstream serves (and the agent served first): xz, under Nix's own file names.
    before = {p: fields((published_cache / f"{hash_part(p)}.narinfo").read_text())
              for p in small_closure.paths}
    assert all(i["Compression"] == ["xz"] for i in before.values())
    with AgentProcess(tmp_path / "a", [upstream_server.url], [signing_key[1]]) as agent:
        r = nix_copy(agent.url, tmp_path / "n1", small_closure.roots, [signing_key[1]])
        assert r.returncode == 0, r.stderr
        await wait_reencoded(agent, small_closure.paths)
        for p in small_closure.paths:
            after = await narinfo(agent, p)
            assert after["Sig"] == before[p]["Sig"]
            assert after["NarHash"] == before[p]["NarHash"]
            assert after["Compression"] == [reencoding(p)], p
            assert after["URL"][0].endswith(SUFFIX[reencoding(p)])
            assert (agent.store / after["URL"][0]).exists()
            # A client that read the old narinfo a moment ago can still fetch the old file.
            async with aiohttp.ClientSession() as s, \
                    s.get(f"{agent.url}/{before[p]['URL'][0]}") as resp:
                assert resp.status == 200
        assert agent.metric("flox_node_cache_recompressions_total", outcome="ok") \
            == len(small_closure.paths)
        # Both encodings count against the budget, and `status` says why.
        out = subprocess.run([sys.executable, "-m", "agent", "status", "--socket",
                              str(agent.socket)], capture_output=True, text=True)
        text = " ".join(out.stdout.split())
        assert "originals kept" in text and "(re-encoding grace period)" in text, text
        st = json.loads(subprocess.run(
            [sys.executable, "-m", "agent", "status", "--json", "--socket", str(agent.socket)],
            capture_output=True, text=True).stdout)["store"]
        originals = sum(int(before[p]["FileSize"][0]) for p in small_closure.paths)
        assert st["usage"]["originals_in_grace"] == originals
        assert st["used_bytes"] > st["usage"]["nars"] + originals

        # A cold client checks the upstream signatures against the zstd narinfos: still valid.
        upstream_server.reset_counts()
        r = nix_copy(agent.url, tmp_path / "n2", small_closure.roots, [signing_key[1]])
        assert r.returncode == 0, r.stderr
        assert all(path_valid_in(tmp_path / "n2", p) for p in small_closure.paths)
        assert upstream_server.requests == []
        # The store directory itself stays a valid cache with the new files.
        r = nix_copy(f"file://{agent.store}", tmp_path / "n3", small_closure.roots,
                     [signing_key[1]])
        assert r.returncode == 0, r.stderr


async def test_old_encodings_are_dropped_after_grace_and_none_disables(
        tmp_path: Path, upstream_server: UpstreamServer, signing_key: tuple[Path, str],
        small_closure: Closure) -> None:
    with AgentProcess(tmp_path / "a", [upstream_server.url], [signing_key[1]],
                      "--recompress-grace", "0", "--gc-interval", "0.2") as agent:
        assert nix_copy(agent.url, tmp_path / "n", small_closure.roots,
                        [signing_key[1]]).returncode == 0
        await wait_reencoded(agent, small_closure.paths)
        deadline = time.monotonic() + 10
        while any(agent.store.glob("nar/*.nar.xz")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not list(agent.store.glob("nar/*.nar.xz"))
        kept = sorted("".join(f.suffixes) for f in agent.store.glob("nar/*.nar*"))
        assert kept == sorted(SUFFIX[reencoding(p)] for p in small_closure.paths)
    with AgentProcess(tmp_path / "b", [upstream_server.url], [signing_key[1]],
                      "--recompress", "none") as plain:
        assert nix_copy(plain.url, tmp_path / "m", small_closure.roots,
                        [signing_key[1]]).returncode == 0
        time.sleep(0.5)
        for p in small_closure.paths:
            assert (await narinfo(plain, p))["Compression"] == ["xz"]


async def test_uncompressed_mode_stores_plain_nars_that_clients_accept(
        tmp_path: Path, upstream_server: UpstreamServer, signing_key: tuple[Path, str],
        small_closure: Closure) -> None:
    with AgentProcess(tmp_path / "a", [upstream_server.url], [signing_key[1]],
                      "--recompress", "uncompressed") as agent:
        assert nix_copy(agent.url, tmp_path / "n1", small_closure.roots,
                        [signing_key[1]]).returncode == 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            infos = [await narinfo(agent, p) for p in small_closure.paths]
            if all(i["Compression"] == ["none"] for i in infos):
                break
            time.sleep(0.1)
        for info in infos:
            assert info["Compression"] == ["none"]
            assert info["URL"][0].endswith(".nar")
            assert info["FileHash"] == info["NarHash"]  # the file is the NAR itself
            assert info["FileSize"] == info["NarSize"]
        r = nix_copy(agent.url, tmp_path / "n2", small_closure.roots, [signing_key[1]])
        assert r.returncode == 0, r.stderr
        assert all(path_valid_in(tmp_path / "n2", p) for p in small_closure.paths)
