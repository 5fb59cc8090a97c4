"""Security properties of the running agent: where the admin API and metrics are served, the
socket's permissions, required signatures, and FloxHub tokens never leaking."""

import base64
import grp
import json
import os
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.agent import AgentProcess
from tests.support.floxmeta import Floxmeta
from tests.support.gitserver import GitHTTPServer
from tests.support.lockfiles import lockfile_for
from tests.support.nixenv import Closure, nar_request_path, nix_copy, path_valid_in, publish
from tests.support.upstream import Fault, UpstreamServer

QUICK = "download-attempts = 1\nstalled-download-timeout = 10\nconnect-timeout = 5\n"
TOKEN = "flxtok_SECRET-9f8e7d6c5b4a-do-not-leak"


def _http(url: str, method: str = "GET", data: bytes | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, method=method, data=data)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, published_cache: Path,
          signing_key: tuple[Path, str]) -> Iterator[AgentProcess]:
    with UpstreamServer(published_cache) as up, \
            AgentProcess(tmp_path_factory.mktemp("sec") / "agent", [up.url], [signing_key[1]],
                         "--socket-group", "daemon") as a:
        yield a


ADMIN = [("POST", "/v1/prewarm", b'{"store_paths": []}'), ("GET", "/v1/status", None),
         ("POST", "/v1/gc", b'{"dry_run": true}'), ("GET", "/v1/prewarm", None),
         ("GET", "/v1/environments", None), ("DELETE", "/v1/pins/a/b", None)]


@pytest.mark.parametrize("method,path,body", ADMIN)
def test_admin_api_is_not_on_tcp_nor_the_metrics_port(
        agent: AgentProcess, method: str, path: str, body: bytes | None) -> None:
    for base in (agent.url, agent.metrics_url):
        status, text = _http(base + path, method, body)
        assert status in (404, 405), (base, path, status, text)


async def test_admin_api_is_on_the_socket(agent: AgentProcess) -> None:
    async with agent.unix_session() as s:
        async with s.get("http://agent/v1/status") as r:
            assert r.status == 200 and "budget_bytes" in await r.json()
        async with s.post("http://agent/v1/gc", data=b'{"dry_run": true}') as r:
            assert r.status == 200
        async with s.post("http://agent/v1/prewarm", data=b'{"store_paths": []}') as r:
            assert r.status == 400  # reached the handler: "give exactly one of ..."
            assert "error" in await r.json()


def test_socket_is_0660_and_owned_by_the_configured_group(agent: AgentProcess) -> None:
    st = os.stat(agent.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == grp.getgrnam("daemon").gr_gid


def test_socket_mode_without_a_group(tmp_path: Path, published_cache: Path,
                                     signing_key: tuple[Path, str]) -> None:
    with UpstreamServer(published_cache) as up, \
            AgentProcess(tmp_path / "agent", [up.url], [signing_key[1]]) as a:
        assert stat.S_IMODE(os.stat(a.socket).st_mode) == 0o660


def test_metrics_only_on_the_metrics_port(agent: AgentProcess) -> None:
    status, text = _http(agent.metrics_url + "/metrics")
    assert status == 200 and "flox_node_cache_" in text
    status, text = _http(agent.url + "/metrics")
    assert status == 404 and "flox_node_cache_" not in text
    # The metrics port serves no cache protocol.
    assert _http(agent.metrics_url + "/nix-cache-info")[0] == 404


async def test_metrics_are_not_on_the_socket(agent: AgentProcess) -> None:
    async with agent.unix_session() as s, s.get("http://agent/metrics") as r:
        assert r.status == 404


def test_tcp_listener_is_loopback_by_default() -> None:
    from agent.config import Config
    assert Config().listen_addr[0] == "127.0.0.1"
    assert Config().metrics_addr[0] == "127.0.0.1"


# --- signatures ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def unsigned_cache(nix_workdir: Path, small_closure: Closure) -> Path:
    cache = nix_workdir / "unsigned-cache"
    if not cache.exists():
        publish(small_closure.roots, cache, None, "xz")
    return cache


def test_unsigned_narinfos_are_refused_by_default(
        tmp_path: Path, unsigned_cache: Path, small_closure: Closure,
        signing_key: tuple[Path, str]) -> None:
    with UpstreamServer(unsigned_cache) as up, \
            AgentProcess(tmp_path / "agent", [up.url], [signing_key[1]]) as a:
        r = nix_copy(a.url, tmp_path / "node", small_closure.roots, [signing_key[1]],
                     extra_config=QUICK)
        assert r.returncode != 0
        assert not path_valid_in(tmp_path / "node", small_closure.roots[0])
        assert a.metric("flox_node_cache_verification_failures_total", reason="signature") >= 1
        assert not list(a.store.glob("*.narinfo"))


def test_unsigned_accepted_with_no_require_signatures_but_nar_hash_still_verified(
        tmp_path: Path, unsigned_cache: Path, small_closure: Closure,
        signing_key: tuple[Path, str]) -> None:
    # The client accepts unsigned paths too: this tests what the agent lets through.
    lax = QUICK + "require-sigs = false\n"
    with UpstreamServer(unsigned_cache) as up, \
            AgentProcess(tmp_path / "agent", [up.url], [signing_key[1]],
                         "--no-require-signatures") as a:
        r = nix_copy(a.url, tmp_path / "node", small_closure.roots, [signing_key[1]],
                     extra_config=lax)
        assert r.returncode == 0, r.stderr
        assert all(path_valid_in(tmp_path / "node", p) for p in small_closure.paths)

    leaf = small_closure.chain[-1]
    with UpstreamServer(unsigned_cache) as up, \
            AgentProcess(tmp_path / "agent2", [up.url], [signing_key[1]],
                         "--no-require-signatures") as a:
        up.set_fault(nar_request_path(unsigned_cache, leaf), Fault("tamper"))
        r = nix_copy(a.url, tmp_path / "node2", [leaf], [signing_key[1]], extra_config=lax)
        assert r.returncode != 0
        assert not path_valid_in(tmp_path / "node2", leaf)
        assert sum(a.metric("flox_node_cache_verification_failures_total", reason=reason)
                   for reason in ("file_hash", "decompress", "nar_hash")) >= 1
        assert not list((a.store / "nar").glob("*"))


# --- FloxHub tokens --------------------------------------------------------------------------

def _prewarm_cli(agent: AgentProcess, ref: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "prewarm", ref, "--socket",
                           str(agent.socket)], capture_output=True, text=True, timeout=60,
                          check=False)


def _leaks(text: str) -> list[str]:
    basic = base64.b64encode(f"oauth:{TOKEN}".encode()).decode()
    return [s for s in (TOKEN, basic, TOKEN[8:30]) if s in text]


async def _everything_said(agent: AgentProcess) -> str:
    """Logs, metrics, and every admin answer about jobs and environments."""
    parts = [agent.logs(), _http(agent.metrics_url + "/metrics")[1]]
    async with agent.unix_session() as s:
        for path in ("/v1/prewarm", "/v1/environments", "/v1/status"):
            async with s.get(f"http://agent{path}") as r:
                parts.append(await r.text())
    return "\n".join(parts)


async def test_floxhub_token_never_appears_in_logs_metrics_or_errors(
        tmp_path: Path, published_cache: Path, small_closure: Closure,
        signing_key: tuple[Path, str]) -> None:
    meta = Floxmeta(tmp_path / "floxhub")
    meta.add_generation("acme", "web", lockfile_for(small_closure.roots[0]))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with GitHTTPServer(meta.root, token=TOKEN) as git, UpstreamServer(published_cache) as up, \
            AgentProcess(tmp_path / "agent", [up.url], [signing_key[1]],
                         "--floxhub-git-url", git.url, "--floxhub-token-file",
                         str(token_file)) as a:
        ok = _prewarm_cli(a, "acme/web")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert all((a.store / f"{p.split('/')[-1][:32]}.narinfo").exists()
                   for p in small_closure.paths)

        git.token = "a-rotated-token-the-agent-does-not-have"  # auth now fails
        failed = _prewarm_cli(a, "acme/other")
        assert failed.returncode != 0
        said = failed.stdout + failed.stderr
        assert "refused access" in said, said  # the auth failure, explained
        everything = said + ok.stdout + ok.stderr + await _everything_said(a)
        assert _leaks(everything) == []
        assert _leaks(json.dumps(a.log_records())) == []
        async with aiohttp.ClientSession() as s, s.get(a.url + "/nix-cache-info") as r:
            assert r.status == 200
