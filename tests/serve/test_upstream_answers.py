"""Upstream answers mean what they say (issue 12), against the real agent process, real
upstream servers and the real Nix client:
  - a 200 that is not a narinfo (a captive portal's page) is an upstream error: 503, counted by
    the circuit, never a 404 the agent or Nix would remember;
  - redirects are followed only within the upstream's origin, or to an allowed one;
  - a narinfo signed by an untrusted key is a 404 that says so, to Nix and to the CLI;
  - upstreams are identified by their full URL.
"""

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.support.agent import AgentProcess
from tests.support.nixenv import Closure, hash_part, make_keypair, nix_copy, path_valid_in
from tests.support.upstream import Fault, UpstreamServer

QUICK = "download-attempts = 1\nconnect-timeout = 5\n"


async def _get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.text()


def _warnings(agent: AgentProcess, msg: str) -> list[dict]:
    return [r for r in agent.log_records() if r["level"] == "warning" and r["msg"] == msg]


@pytest.fixture
def linked_cache(tmp_path: Path, published_cache: Path) -> Path:
    """The published cache (hard links, so cheap), where /moved, /a and /b are the cache
    again: two caches on one host, and a place to redirect to within the same origin."""
    root = tmp_path / "linked-cache"
    shutil.copytree(published_cache, root, copy_function=os.link)
    for alias in ("moved", "a", "b"):
        (root / alias).symlink_to(".")
    return root


# --- a 200 that is not a narinfo -------------------------------------------------------------

async def test_a_captive_portal_page_is_an_upstream_error_never_a_remembered_404(
        tmp_path: Path, upstream_server: UpstreamServer, signing_key: tuple[Path, str],
        small_closure: Closure) -> None:
    root = small_closure.roots[0]
    h = hash_part(root)
    upstream_server.set_fault("*.narinfo", Fault("html"))
    with AgentProcess(tmp_path / "a", [upstream_server.url], [signing_key[1]],
                      "--negative-ttl", "3600", "--circuit-failures", "2",
                      "--circuit-cooldown", "1") as agent:
        for _ in range(2):
            status, text = await _get(f"{agent.url}/{h}.narinfo")
            assert status == 503, text
        assert agent.metric("flox_node_cache_upstream_circuit_open",
                            upstream=upstream_server.url) == 1
        assert agent.metric("flox_node_cache_upstream_errors_total",
                            reason="malformed") == 2
        errors = [r["error"] for r in _warnings(agent, "upstream unavailable")]
        assert any("not a narinfo" in e for e in errors), errors
        copy = await asyncio.to_thread(nix_copy, agent.url, tmp_path / "during", [root],
                                       [signing_key[1]], extra_config=QUICK)
        assert copy.returncode != 0 and "503" in copy.stderr, copy.stderr

        # The portal is gone: once the circuit lets a trial through, the path is served
        # (a remembered 404 would refuse it for the negative TTL, an hour here).
        upstream_server.clear_faults()
        for _ in range(100):
            status, _ = await _get(f"{agent.url}/{h}.narinfo")
            if status != 503:
                break
            await asyncio.sleep(0.1)
        assert status == 200
        copy = await asyncio.to_thread(nix_copy, agent.url, tmp_path / "after", [root],
                                       [signing_key[1]])
        assert copy.returncode == 0, copy.stderr


def test_a_portal_upstream_is_skipped_once_its_circuit_opens_and_another_one_serves(
        tmp_path: Path, upstream_server: UpstreamServer, published_cache: Path,
        signing_key: tuple[Path, str], small_closure: Closure) -> None:
    upstream_server.set_fault("*.narinfo", Fault("html"))
    with UpstreamServer(published_cache) as good, \
            AgentProcess(tmp_path / "a", [upstream_server.url, good.url], [signing_key[1]],
                         "--circuit-failures", "2", "--circuit-cooldown", "600") as agent:
        copy = nix_copy(agent.url, tmp_path / "node", small_closure.roots, [signing_key[1]])
        assert copy.returncode == 0, copy.stderr
        assert all(path_valid_in(tmp_path / "node", p) for p in small_closure.paths)
        assert good.count("/nar/*") == len(small_closure.paths)
        # Its pages counted as errors: after two, the portal was no longer asked.
        assert len(small_closure.paths) > 2 and upstream_server.count("*.narinfo") == 2


# --- redirects -------------------------------------------------------------------------------

def test_a_redirect_within_the_upstreams_origin_is_followed(
        tmp_path: Path, linked_cache: Path, signing_key: tuple[Path, str],
        small_closure: Closure) -> None:
    with UpstreamServer(linked_cache) as up, \
            AgentProcess(tmp_path / "a", [up.url], [signing_key[1]]) as agent:
        up.set_fault("/nar/*", Fault("redirect", code=302, location="/moved"))
        up.set_fault("/" + "?" * 32 + ".narinfo",  # not /moved/<hash>.narinfo
                     Fault("redirect", code=301, location=up.url + "/moved"))
        copy = nix_copy(agent.url, tmp_path / "node", small_closure.roots, [signing_key[1]])
        assert copy.returncode == 0, copy.stderr
        assert up.count("/moved/nar/*") == len(small_closure.paths)
        assert up.count("/moved/*.narinfo") == len(small_closure.paths)


async def test_a_redirect_to_another_origin_is_an_error_unless_that_origin_is_allowed(
        tmp_path: Path, upstream_server: UpstreamServer, published_cache: Path,
        signing_key: tuple[Path, str], small_closure: Closure) -> None:
    root = small_closure.roots[0]
    with UpstreamServer(published_cache) as elsewhere:
        upstream_server.set_fault("*", Fault("redirect", code=302, location=elsewhere.url))
        with AgentProcess(tmp_path / "a", [upstream_server.url], [signing_key[1]]) as agent:
            status, _ = await _get(f"{agent.url}/{hash_part(root)}.narinfo")
            assert status == 503
            assert elsewhere.requests == []
            assert agent.metric("flox_node_cache_upstream_errors_total",
                                upstream=upstream_server.url, reason="redirect") == 1
            errors = [r["error"] for r in _warnings(agent, "upstream unavailable")]
            assert any(f"redirected to {elsewhere.url}, which is not this upstream's origin"
                       in e for e in errors), errors

        with AgentProcess(tmp_path / "b", [upstream_server.url], [signing_key[1]],
                          "--upstream-redirect-origin", elsewhere.url) as agent:
            copy = await asyncio.to_thread(nix_copy, agent.url, tmp_path / "node",
                                           small_closure.roots, [signing_key[1]])
            assert copy.returncode == 0, copy.stderr
            assert elsewhere.count("/nar/*") == len(small_closure.paths)


async def test_a_redirect_loop_is_an_error_after_a_few_hops(
        tmp_path: Path, upstream_server: UpstreamServer, signing_key: tuple[Path, str],
        small_closure: Closure) -> None:
    narinfo = f"/{hash_part(small_closure.roots[0])}.narinfo"
    upstream_server.set_fault(narinfo, Fault("redirect", code=307, location=""))
    with AgentProcess(tmp_path / "a", [upstream_server.url], [signing_key[1]]) as agent:
        status, _ = await _get(agent.url + narinfo)
        assert status == 503
        assert upstream_server.counts[narinfo] == 6  # the request and five redirects
        errors = [r["error"] for r in _warnings(agent, "upstream unavailable")]
        assert any("more than 5 redirects" in e for e in errors), errors


# --- untrusted signatures --------------------------------------------------------------------

async def test_a_narinfo_signed_by_an_untrusted_key_is_a_404_that_says_so(
        tmp_path: Path, upstream_server: UpstreamServer, small_closure: Closure) -> None:
    root = small_closure.roots[0]
    h = hash_part(root)
    _, other_key = make_keypair(tmp_path / "keys", "other-cache-1")
    with AgentProcess(tmp_path / "a", [upstream_server.url], [other_key]) as agent:
        for _ in range(2):  # the second answer comes from the negative cache
            status, text = await _get(f"{agent.url}/{h}.narinfo")
            assert (status, text) == (404, "signed by an untrusted key: upstream-test-1\n")
        assert upstream_server.counts[f"/{h}.narinfo"] == 1
        assert agent.metric("flox_node_cache_verification_failures_total",
                            reason="signature") == 1
        rejected = _warnings(agent, "narinfo rejected")
        assert [(r["store_path"], r["error"]) for r in rejected] == [
            (root, "signed by an untrusted key: upstream-test-1")]

        prewarm = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "agent", "prewarm", "--store-path", root,
                             "--socket", str(agent.socket)],
            capture_output=True, text=True, timeout=120)
        assert prewarm.returncode == 1, prewarm.stderr
        assert f"{root}: signed by an untrusted key: upstream-test-1" in prewarm.stderr


# --- identity --------------------------------------------------------------------------------

async def test_two_caches_on_one_host_are_two_upstreams(
        tmp_path: Path, linked_cache: Path, signing_key: tuple[Path, str],
        small_closure: Closure) -> None:
    h = hash_part(small_closure.roots[0])
    with UpstreamServer(linked_cache) as up:
        first, second = f"{up.url}/a", f"{up.url}/b"
        up.set_fault("/a/*", Fault("status", code=500))
        with AgentProcess(tmp_path / "a", [first + "/", second], [signing_key[1]],
                          "--circuit-failures", "1", "--circuit-cooldown", "600") as agent:
            status, _ = await _get(f"{agent.url}/{h}.narinfo")
            assert status == 200
            status, text = await _get(agent.metrics_url + "/readyz")
            assert json.loads(text)["checks"]["upstreams"] == {first: "circuit_open",
                                                               second: "ok"}
            assert agent.metric("flox_node_cache_upstream_circuit_open", upstream=first) == 1
            assert agent.metric("flox_node_cache_upstream_circuit_open", upstream=second) == 0
            assert agent.metric("flox_node_cache_upstream_requests_total", upstream=second,
                                kind="narinfo", code="200") == 1
