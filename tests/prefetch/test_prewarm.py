"""Prewarm end to end: FloxHub-shaped git, real upstream cache, the CLI, then a real Nix copy."""

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from agent.flox.lockfile import node_system
from agent.store.pins import EnvironmentReport
from tests.support.agent import AgentProcess
from tests.support.floxmeta import Floxmeta
from tests.support.gitserver import GitHTTPServer
from tests.support.lockfiles import lockfile_for
from tests.support.nixenv import Closure, build_closure, nix_copy, path_valid_in, publish
from tests.support.upstream import UpstreamServer

TOKEN = "fhub-secret-token-6d3f2a"  # a test token: must never reach the logs


@pytest.fixture
def floxhub(tmp_path: Path) -> Iterator[tuple[Floxmeta, GitHTTPServer]]:
    meta = Floxmeta(tmp_path / "floxhub")
    with GitHTTPServer(meta.root, token=TOKEN) as server:
        yield meta, server


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    return f


def cli(agent: AgentProcess, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", *args, "--socket", str(agent.socket)],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def agent(tmp_path: Path, upstream_server: UpstreamServer, signing_key: tuple[Path, str],
          floxhub: tuple[Floxmeta, GitHTTPServer], token_file: Path) -> Iterator[AgentProcess]:
    with AgentProcess(tmp_path / "agent", [upstream_server.url], [signing_key[1]],
                      "--floxhub-git-url", floxhub[1].url + "/",
                      "--floxhub-token-file", str(token_file),
                      "--generation-watch-interval", "0.5") as a:
        yield a


def test_prewarm_environment_then_pods_cost_no_upstream(
        agent: AgentProcess, floxhub: tuple[Floxmeta, GitHTTPServer],
        upstream_server: UpstreamServer, small_closure: Closure, signing_key: tuple[Path, str],
        tmp_path: Path) -> None:
    meta, _ = floxhub
    meta.create_owner("acme")
    meta.add_generation("acme", "web", lockfile_for(*small_closure.roots))

    r = cli(agent, "prewarm", "acme/web", "--pin")
    assert r.returncode == 0, r.stderr
    assert "ready" in r.stderr
    assert upstream_server.count("/nar/*") == len(small_closure.paths)

    upstream_server.reset_counts()
    again = cli(agent, "prewarm", "acme/web", "--json")
    assert again.returncode == 0, again.stderr
    job = json.loads(again.stdout)
    assert job["progress"]["paths_done"] == len(small_closure.paths)
    assert job["progress"]["bytes_fetched"] == 0
    assert upstream_server.requests == []  # a present closure costs no upstream request

    copy = nix_copy(agent.url, tmp_path / "pod", small_closure.roots, [signing_key[1]])
    assert copy.returncode == 0, copy.stderr
    assert all(path_valid_in(tmp_path / "pod", p) for p in small_closure.paths)
    assert upstream_server.requests == []

    status = cli(agent, "status", "--json")
    envs = json.loads(status.stdout)["environments"]
    web = next(e for e in envs if e["ref"] == "acme/web")
    assert web["generation"] == 1 and web["complete"] and web["pinned_by"] == ["env:acme/web"]
    assert "acme/web" in cli(agent, "status").stdout
    assert TOKEN not in agent.logs()


def test_new_generation_is_prefetched_before_any_pod_asks(
        agent: AgentProcess, floxhub: tuple[Floxmeta, GitHTTPServer],
        upstream_server: UpstreamServer, published_cache: Path, small_closure: Closure,
        signing_key: tuple[Path, str], nix_workdir: Path) -> None:
    meta, _ = floxhub
    meta.create_owner("acme")
    meta.add_generation("acme", "api", lockfile_for(*small_closure.roots))
    assert cli(agent, "prewarm", "acme/api", "--pin").returncode == 0

    gen2 = build_closure(nix_workdir, "gen2", [30_000, 100])
    publish(gen2.paths, published_cache, signing_key[0])
    upstream_server.reset_counts()
    meta.add_generation("acme", "api", lockfile_for(*gen2.roots))

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        envs = json.loads(cli(agent, "status", "--json").stdout)["environments"]
        api = next(e for e in envs if e["ref"] == "acme/api")
        if api["generation"] == 2 and api["complete"]:
            break
        time.sleep(0.3)
    else:
        pytest.fail(f"generation 2 was not prefetched: {envs}")
    assert upstream_server.count("/nar/*") == len(gen2.paths)
    assert api["pinned_by"] == ["env:acme/api"]
    assert agent.metric("flox_node_cache_floxhub_generation_changes_total") >= 1


def test_prewarm_lockfile_and_store_paths(
        agent: AgentProcess, small_closure: Closure, big_path_closure: Closure,
        tmp_path: Path) -> None:
    lock = tmp_path / "manifest.lock"
    lock.write_text(lockfile_for(*small_closure.roots))
    r = cli(agent, "prewarm", "--lockfile", str(lock), "--system", node_system())
    assert r.returncode == 0, r.stderr
    r = cli(agent, "prewarm", "--store-path", big_path_closure.roots[0], "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["progress"]["paths_total"] == len(big_path_closure.paths)


@pytest.mark.parametrize("setup,ref,message", [
    (lambda m: None, "nobody/web", "owner"),
    (lambda m: m.create_owner("acme"), "acme/missing", "environment"),
    (lambda m: (m.create_owner("acme"), m.add_generation("acme", "web", "{}")), "acme/web:9",
     "generation"),
    (lambda m: (m.create_owner("acme"), m.add_generation("acme", "web", None)), "acme/web",
     "manifest.lock"),
])
def test_floxhub_errors_are_clear_and_fail_the_cli(
        agent: AgentProcess, floxhub: tuple[Floxmeta, GitHTTPServer], setup, ref: str,
        message: str) -> None:
    setup(floxhub[0])
    r = cli(agent, "prewarm", ref)
    assert r.returncode == 1
    assert message in r.stderr.lower(), r.stderr
    assert TOKEN not in r.stderr + agent.logs()


def test_bad_requests_are_usage_errors(agent: AgentProcess, tmp_path: Path) -> None:
    r = cli(agent, "prewarm", "not a ref")
    assert r.returncode == 2 and "error" in r.stderr
    bad = tmp_path / "bad.lock"
    bad.write_text('{"lockfile-version": 7}')
    r = cli(agent, "prewarm", "--lockfile", str(bad))
    assert r.returncode == 2 and "lockfile" in r.stderr
    r = cli(agent, "prewarm", "--store-path", "/etc/passwd")
    assert r.returncode == 2


def test_wrong_token_is_an_authentication_error(
        tmp_path: Path, upstream_server: UpstreamServer, signing_key: tuple[Path, str],
        floxhub: tuple[Floxmeta, GitHTTPServer], small_closure: Closure) -> None:
    floxhub[0].create_owner("acme")
    floxhub[0].add_generation("acme", "web", lockfile_for(*small_closure.roots))
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token-91ab")
    with AgentProcess(tmp_path / "a", [upstream_server.url], [signing_key[1]],
                      "--floxhub-git-url", floxhub[1].url,
                      "--floxhub-token-file", str(wrong)) as agent:
        r = cli(agent, "prewarm", "acme/web")
        assert r.returncode == 1
        assert "auth" in r.stderr.lower(), r.stderr
        assert "not-the-token-91ab" not in r.stderr + agent.logs()


def test_unreachable_floxhub_and_unreachable_agent(
        tmp_path: Path, upstream_server: UpstreamServer, signing_key: tuple[Path, str]) -> None:
    from tests.support.gitserver import dead_url

    with AgentProcess(tmp_path / "a", [upstream_server.url], [signing_key[1]],
                      "--floxhub-git-url", dead_url()) as agent:
        r = cli(agent, "prewarm", "acme/web")
        assert r.returncode == 1
        assert "reach" in r.stderr.lower() or "unreachable" in r.stderr.lower(), r.stderr
    r = subprocess.run([sys.executable, "-m", "agent", "status", "--socket",
                        str(tmp_path / "nothing.sock")], capture_output=True, text=True)
    assert r.returncode == 3 and "cannot reach the agent" in r.stderr


def test_pins_can_be_dropped(agent: AgentProcess, floxhub: tuple[Floxmeta, GitHTTPServer],
                             small_closure: Closure) -> None:
    import urllib.parse

    floxhub[0].create_owner("acme")
    floxhub[0].add_generation("acme", "web", lockfile_for(*small_closure.roots))
    assert cli(agent, "prewarm", "acme/web", "--pin").returncode == 0
    out = subprocess.run(["curl", "-s", "--unix-socket", str(agent.socket), "-X", "DELETE",
                          "http://agent/v1/pins/" + urllib.parse.quote("acme/web", safe="/")],
                         capture_output=True, text=True)
    assert json.loads(out.stdout) == {"unpinned": "acme/web"}
    envs = json.loads(cli(agent, "status", "--json").stdout)["environments"]
    assert next(e for e in envs if e["ref"] == "acme/web")["pinned_by"] == []


async def test_unpin_during_a_running_prefetch_is_not_undone_by_its_end(
        tmp_path: Path, published_cache: Path, signing_key: tuple[Path, str],
        big_path_closure: Closure) -> None:
    """A pod that goes away while its environment is still being fetched leaves no pin."""
    import asyncio

    from agent.app import build
    from agent.config import load
    from agent.prefetch import Target

    with UpstreamServer(published_cache, bandwidth=4_000_000) as slow:
        cfg = load(None, {"store": str(tmp_path / "store"), "upstreams": [slow.url],
                          "trusted_public_keys": [signing_key[1]], "kubernetes": "off"}, {})
        async with build(cfg) as agent:
            job = agent.prefetcher.submit(Target.parse(store_paths=big_path_closure.roots),
                                          pin="pod:acme/web")
            await asyncio.sleep(0.3)
            assert job.state == "running"
            agent.prefetcher.unpin("pod:acme/web")
            await job.wait()
            assert job.state == "succeeded"
            assert "pod:acme/web" not in agent.store.pins.holders()


def _prewarm_then_kill9(agent_dir: Path, upstream: UpstreamServer, key: str, store: Path,
                       roots: list[str], until: Callable[[], bool]) -> None:
    """A pinned prewarm of `roots`, killed with SIGKILL once `until()` holds."""
    agent = AgentProcess(agent_dir, [upstream.url], [key], store=store).start()
    body = json.dumps({"store_paths": roots, "pin": True})
    subprocess.run(["curl", "-s", "--unix-socket", str(agent.socket), "-X", "POST",
                    "http://agent/v1/prewarm", "-d", body], check=True, capture_output=True)
    deadline = time.monotonic() + 20
    while not until() and time.monotonic() < deadline:
        time.sleep(0.02)
    agent.kill9()


def _environments_once_complete(agent: AgentProcess) -> list[dict]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        envs = json.loads(cli(agent, "status", "--json").stdout)["environments"]
        if envs and all(e["complete"] for e in envs):
            return envs
        time.sleep(0.3)
    notable = [r for r in agent.log_records() if r.get("level") not in ("debug", "info")]
    pytest.fail(f"the prefetch did not resume: {envs}\nwarnings and errors: {notable[-20:]}")


def test_an_interrupted_pinned_prefetch_resumes_after_a_restart(
        tmp_path: Path, published_cache: Path, signing_key: tuple[Path, str],
        big_path_closure: Closure) -> None:
    store = tmp_path / "store"
    with UpstreamServer(published_cache, bandwidth=1_000_000) as slow:
        # in the middle of the 8 MB NAR
        _prewarm_then_kill9(tmp_path / "a", slow, signing_key[1], store, big_path_closure.roots,
                            lambda: any((store / ".tmp").iterdir()))
        slow.reset_counts()
        with AgentProcess(tmp_path / "b", [slow.url], [signing_key[1]], store=store) as again:
            envs = _environments_once_complete(again)
            assert envs[0]["pinned_by"] and envs[0]["paths"] == len(big_path_closure.paths)
            assert slow.count("/nar/*") >= 1  # the missing NAR was fetched by the resumed job


def test_a_prefetch_killed_after_its_roots_resumes_the_rest_of_the_closure(
        tmp_path: Path, nix_workdir: Path, signing_key: tuple[Path, str]) -> None:
    """Killed once the small root is in and its large reference is on its way: the restart
    must not take the root (all that was recorded before the walk) for the whole closure."""
    closure = build_closure(nix_workdir, "root-then-big", [2_000, 4_000_000])
    cache, store = tmp_path / "cache", tmp_path / "store"
    publish(closure.roots, cache, signing_key[0], "none")
    with UpstreamServer(cache, bandwidth=1_000_000) as slow:
        # the root committed, the 4 MB reference half way
        _prewarm_then_kill9(tmp_path / "a", slow, signing_key[1], store, closure.roots,
                            lambda: any((store / "nar").glob("*.nar*"))
                            and any((store / ".tmp").iterdir()))
        with AgentProcess(tmp_path / "b", [slow.url], [signing_key[1]], store=store) as again:
            envs = json.loads(cli(again, "status", "--json").stdout)["environments"]
            assert envs and not envs[0]["complete"]  # right after the restart
            envs = _environments_once_complete(again)
            assert envs[0]["paths"] == envs[0]["paths_present"] == len(closure.paths) == 2
            assert envs[0]["pinned_by"]


def test_an_environment_being_walked_is_not_complete() -> None:
    """While its job runs an environment's recorded closure may be its roots only (recorded at
    the start, so a restart can resume): present roots must not read as a complete closure."""
    report = EnvironmentReport("acme/api", 2, "x86_64-linux", paths=1, paths_present=1,
                               closure_bytes=10, present_bytes=10, pinned_by=(), updated=0.0,
                               walked=True)
    assert report.complete
    walking = replace(report, prefetching=True)
    assert not walking.complete
    assert walking.to_json()["complete"] is False and walking.to_json()["prefetching"] is True
    # and after a restart, with no job running, a walk that never ended is not complete either
    assert not replace(report, walked=False).complete
