"""Faults the agent must survive without losing or corrupting anything (issue 7)."""

import asyncio
import contextlib
import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import pytest

from tests.support.agent import AgentProcess
from tests.support.nixenv import Closure, hash_part, nar_request_path, nix_copy, path_valid_in
from tests.support.upstream import Fault, UpstreamServer

QUICK = "download-attempts = 1\nstalled-download-timeout = 10\nconnect-timeout = 5\n"


def verify(store: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", "verify", "--store", str(store),
                           "--json", *extra], capture_output=True, text=True, timeout=120)


def visible_files(store: Path) -> set[str]:
    return {str(p.relative_to(store)) for p in store.rglob("*")
            if p.is_file() and not p.name.startswith((".index", "nix-cache-info"))}


def wait_for(pred, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


async def nar_url(agent: AgentProcess, path: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"{agent.url}/{hash_part(path)}.narinfo") as r:
        assert r.status == 200
        return next(x.split(": ", 1)[1] for x in (await r.text()).splitlines()
                    if x.startswith("URL: "))


def test_kill_9_during_a_large_download_leaves_nothing_half_visible(
        tmp_path: Path, published_cache: Path, signing_key: tuple[Path, str],
        big_path_closure: Closure) -> None:
    root = big_path_closure.roots[0]
    with UpstreamServer(published_cache, bandwidth=1_000_000) as slow:
        agent = AgentProcess(tmp_path / "a", [slow.url], [signing_key[1]]).start()
        client = threading.Thread(target=nix_copy, daemon=True, kwargs={"extra_config": QUICK},
                                  args=(agent.url, tmp_path / "n1", [root], [signing_key[1]]))
        client.start()
        wait_for(lambda: any((agent.store / ".tmp").iterdir()), "the download to start")
        time.sleep(0.5)
        agent.kill9()
        assert any((agent.store / ".tmp").iterdir())  # the crash left a partial file...
        assert not (agent.store / f"{hash_part(root)}.narinfo").exists()

        agent.start()  # ...which the restart removes
        assert list((agent.store / ".tmp").iterdir()) == []
        assert not (agent.store / f"{hash_part(root)}.narinfo").exists()
        report = verify(agent.store)
        assert report.returncode == 0, report.stdout
        r = nix_copy(agent.url, tmp_path / "n2", [root], [signing_key[1]], extra_config=QUICK)
        assert r.returncode == 0, r.stderr
        assert all(path_valid_in(tmp_path / "n2", p) for p in big_path_closure.paths)
        agent.stop()
        assert verify(agent.store).returncode == 0
        client.join(60)


def test_kill_9_during_eviction_keeps_the_store_consistent(
        tmp_path: Path, upstream_server: UpstreamServer, signing_key: tuple[Path, str],
        small_closure: Closure, big_path_closure: Closure) -> None:
    store = tmp_path / "store"
    with AgentProcess(tmp_path / "a", [upstream_server.url], [signing_key[1]],
                      store=store) as agent:
        for closure in (small_closure, big_path_closure):
            assert nix_copy(agent.url, tmp_path / f"warm-{closure.roots[0][-8:]}",
                            closure.roots, [signing_key[1]]).returncode == 0
    before = len(list((store / "nar").iterdir()))
    rng = random.Random(7)
    for attempt in range(4):
        # A 1-byte budget: the agent starts evicting everything as soon as it starts.
        agent = AgentProcess(tmp_path / f"gc{attempt}", [upstream_server.url], [signing_key[1]],
                             "--store-budget", "1", store=store)
        agent.start()
        time.sleep(rng.uniform(0.0, 0.05))
        agent.kill9()
        report = verify(store)
        assert report.returncode in (0, 1)
        problems = json.loads(report.stdout)["problems"]
        # Orphan files may remain until the next start; a narinfo without its NAR, never.
        assert not [p for p in problems if p["kind"] in ("missing", "damaged")], problems
        for info in store.glob("*.narinfo"):
            url = next(x.split(": ", 1)[1] for x in info.read_text().splitlines()
                       if x.startswith("URL: "))
            assert (store / url).exists(), info
    with AgentProcess(tmp_path / "final", [upstream_server.url], [signing_key[1]],
                      store=store):
        pass
    assert verify(store).returncode == 0  # start-up recovery removed any orphans
    assert len(list((store / "nar").iterdir())) < before


async def test_disk_full_still_serves_the_client_and_recovers(
        tmp_path: Path, tiny_tmpfs: Path, upstream_server: UpstreamServer,
        signing_key: tuple[Path, str], big_path_closure: Closure, small_closure: Closure,
        published_cache: Path) -> None:
    store = tiny_tmpfs / "store"
    big = big_path_closure.roots[0]
    with AgentProcess(tmp_path / "a", [upstream_server.url], [signing_key[1]],
                      "--gc-interval", "0.2", store=store) as agent:
        url = await nar_url(agent, big)
        expected = (published_cache / url).read_bytes()  # the upstream's file, same name
        async with aiohttp.ClientSession() as s, s.get(f"{agent.url}/{url}") as r:
            assert r.status == 200
            body = await r.read()
        assert body == expected  # served in full, streamed from upstream without caching
        assert agent.metric("flox_node_cache_store_disk_full") == 1
        assert agent.metric("flox_node_cache_store_write_errors_total", reason="disk_full") >= 1
        # Honest, not racy: the failed temporary file is gone, but the 8 MB NAR still cannot
        # fit, so the disk-full chore (every 0.2 s) leaves the state alone.
        await asyncio.sleep(1)
        async with aiohttp.ClientSession() as s, s.get(f"{agent.metrics_url}/readyz") as r:
            assert (await r.json())["checks"]["disk"] == "full"
        assert list((store / ".tmp").iterdir()) == []
        assert not (store / f"{hash_part(big)}.narinfo").exists()

        # Space is there again (the failed temp file is gone): the agent recovers by itself.
        r = await asyncio.to_thread(nix_copy, agent.url, tmp_path / "n", small_closure.roots,
                                    [signing_key[1]])
        assert r.returncode == 0, r.stderr
        wait_for(lambda: agent.metric("flox_node_cache_store_disk_full") == 0, "recovery")
        assert (store / f"{hash_part(small_closure.roots[0])}.narinfo").exists()
    assert verify(store).returncode == 0


@pytest.mark.parametrize("fault", [
    Fault("stall"), Fault("reset"), Fault("truncate"), Fault("wrong_length"),
    Fault("status", code=500), Fault("drip", chunk=16, delay=0.05),
], ids=lambda f: f.kind)
async def test_upstream_nar_faults_fail_promptly_and_commit_nothing(
        tmp_path: Path, upstream_server: UpstreamServer, signing_key: tuple[Path, str],
        published_cache: Path, small_closure: Closure, fault: Fault) -> None:
    root = small_closure.roots[0]
    with AgentProcess(tmp_path / "a", [upstream_server.url], [signing_key[1]],
                      "--upstream-read-timeout", "2") as agent:
        url = await nar_url(agent, root)
        upstream_server.set_fault(nar_request_path(published_cache, root), fault)
        start = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            with contextlib.suppress(aiohttp.ClientError):
                async with s.get(f"{agent.url}/{url}") as r:
                    body = await r.read()
                    # A complete, successful body is impossible: it would be unverified bytes.
                    assert r.status >= 500 or len(body) != r.content_length, (r.status, len(body))
        assert time.monotonic() - start < 15
        assert not (agent.store / f"{hash_part(root)}.narinfo").exists()
        assert list((agent.store / ".tmp").iterdir()) == []

        upstream_server.clear_faults()
        r = await asyncio.to_thread(nix_copy, agent.url, tmp_path / "n", [root],
                                    [signing_key[1]], extra_config=QUICK)
        assert r.returncode == 0, r.stderr


def test_corrupt_entry_fails_the_client_then_scrub_repairs_it(
        tmp_path: Path, upstream_server: UpstreamServer, signing_key: tuple[Path, str],
        small_closure: Closure) -> None:
    root = small_closure.roots[0]
    store = tmp_path / "store"
    # One encoding per NAR (no zstd copy beside the xz one), so the repair must go upstream.
    with AgentProcess(tmp_path / "a", [upstream_server.url], [signing_key[1]],
                      "--recompress", "none", store=store) as agent:
        assert nix_copy(agent.url, tmp_path / "warm", [root], [signing_key[1]]).returncode == 0
    url = next(x.split(": ", 1)[1] for x in
               (store / f"{hash_part(root)}.narinfo").read_text().splitlines()
               if x.startswith("URL: "))
    nar = store / url
    data = bytearray(nar.read_bytes())
    data[len(data) // 2] ^= 0x01
    nar.write_bytes(bytes(data))

    # verify finds it and exits 1; the client's own check fails loudly before any repair.
    found = verify(store)
    assert found.returncode == 1
    assert json.loads(found.stdout)["problems"][0]["file"] == url
    with AgentProcess(tmp_path / "b", [upstream_server.url], [signing_key[1]], store=store) \
            as agent:
        r = nix_copy(agent.url, tmp_path / "bad", [root], [signing_key[1]], extra_config=QUICK)
        assert r.returncode != 0
        assert not path_valid_in(tmp_path / "bad", root)

    # The background scrub removes it; the next request fetches it again from upstream.
    upstream_server.reset_counts()
    with AgentProcess(tmp_path / "c", [upstream_server.url], [signing_key[1]],
                      "--scrub-interval", "0.5", "--recompress", "none", store=store) as agent:
        wait_for(lambda: not nar.exists(), "the scrub to remove the damaged NAR")
        assert agent.metric("flox_node_cache_verification_failures_total", reason="scrub") == 1
        r = nix_copy(agent.url, tmp_path / "good", [root], [signing_key[1]], extra_config=QUICK)
        assert r.returncode == 0, r.stderr
        assert upstream_server.count("/nar/*") == 1
    assert verify(store).returncode == 0


def test_verify_repair_removes_damage_and_orphans(
        tmp_path: Path, upstream_server: UpstreamServer, signing_key: tuple[Path, str],
        small_closure: Closure) -> None:
    store = tmp_path / "store"
    with AgentProcess(tmp_path / "a", [upstream_server.url], [signing_key[1]], store=store) \
            as agent:
        assert nix_copy(agent.url, tmp_path / "warm", small_closure.roots,
                        [signing_key[1]]).returncode == 0
    victim = sorted((store / "nar").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:-1])
    (store / "nar" / ("1" * 52 + ".nar.xz")).write_bytes(b"stray")
    report = json.loads(verify(store).stdout)
    kinds = sorted(p["kind"] for p in report["problems"])
    assert kinds == ["damaged", "orphan"]
    assert verify(store, "--repair").returncode == 1
    assert verify(store).returncode == 0
    assert not victim.exists()
    assert all((store / x.split(": ", 1)[1]).exists()
               for info in store.glob("*.narinfo")
               for x in info.read_text().splitlines() if x.startswith("URL: "))


def test_verify_repair_beside_a_running_agent(
        tmp_path: Path, upstream_server: UpstreamServer, signing_key: tuple[Path, str],
        small_closure: Closure) -> None:
    """The agent notices entries another process removed (it caches narinfos in memory)."""
    root = small_closure.roots[0]
    with AgentProcess(tmp_path / "a", [upstream_server.url], [signing_key[1]],
                      "--recompress", "none", "--scrub-interval", "0") as agent:
        assert nix_copy(agent.url, tmp_path / "warm", [root], [signing_key[1]]).returncode == 0
        assert nix_copy(agent.url, tmp_path / "warm2", [root], [signing_key[1]]).returncode == 0
        url = next(x.split(": ", 1)[1] for x in
                   (agent.store / f"{hash_part(root)}.narinfo").read_text().splitlines()
                   if x.startswith("URL: "))
        nar = agent.store / url
        nar.write_bytes(nar.read_bytes()[:-1])
        assert verify(agent.store, "--repair").returncode == 1
        assert not nar.exists()
        time.sleep(1.2)
        r = nix_copy(agent.url, tmp_path / "after", [root], [signing_key[1]], extra_config=QUICK)
        assert r.returncode == 0, r.stderr
        assert nar.exists()  # fetched again from upstream
