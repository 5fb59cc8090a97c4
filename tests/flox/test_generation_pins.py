"""An explicit generation pin (`owner/env:N`) stays on generation N when a new live generation
is pushed; only unpinned refs follow the live generation."""

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.flox.watch import holds_a_generation
from tests.support.agent import AgentProcess
from tests.support.floxmeta import Floxmeta
from tests.support.gitserver import GitHTTPServer
from tests.support.lockfiles import lockfile_for
from tests.support.nixenv import Closure, build_closure, publish
from tests.support.upstream import UpstreamServer


def environments(agent: AgentProcess) -> dict[str, dict]:
    out = subprocess.run([sys.executable, "-m", "agent", "status", "--json", "--socket",
                          str(agent.socket)], capture_output=True, text=True, check=True)
    return {e["ref"]: e for e in json.loads(out.stdout)["environments"]}


def prewarm(agent: AgentProcess, ref: str) -> None:
    r = subprocess.run([sys.executable, "-m", "agent", "prewarm", ref, "--pin", "--socket",
                        str(agent.socket)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.fixture
def agent(tmp_path: Path, upstream_server: UpstreamServer, signing_key: tuple[Path, str],
          small_closure: Closure) -> Iterator[tuple[AgentProcess, Floxmeta]]:
    meta = Floxmeta(tmp_path / "floxhub")
    meta.create_owner("acme")
    meta.add_generation("acme", "api", lockfile_for(*small_closure.roots))
    with GitHTTPServer(meta.root) as git, AgentProcess(
            tmp_path / "agent", [upstream_server.url], [signing_key[1]],
            "--floxhub-git-url", git.url + "/", "--generation-watch-interval", "0.3") as a:
        yield a, meta


def test_pinned_generation_stays_while_the_unpinned_ref_follows(
        agent: tuple[AgentProcess, Floxmeta], published_cache: Path, nix_workdir: Path,
        signing_key: tuple[Path, str]) -> None:
    proc, meta = agent
    prewarm(proc, "acme/api:1")
    prewarm(proc, "acme/api")  # the same closure today, tracked for new generations
    gen2 = build_closure(nix_workdir, "pins-gen2", [20_000, 100])
    publish(gen2.paths, published_cache, signing_key[0])
    meta.add_generation("acme", "api", lockfile_for(*gen2.roots))

    deadline = time.monotonic() + 30
    while (envs := environments(proc))["acme/api"]["generation"] != 2 \
            or not envs["acme/api"]["complete"]:
        assert time.monotonic() < deadline, envs
        time.sleep(0.3)
    assert envs["acme/api"]["pinned_by"] == ["env:acme/api"]
    assert envs["acme/api:1"]["pinned_by"] == ["env:acme/api:1"]  # still generation 1


def test_which_holders_name_a_generation() -> None:
    assert holds_a_generation("pod:acme/web:7")
    assert holds_a_generation("prewarm:rollout:acme/web:7")
    assert holds_a_generation("env:acme/web:12")
    assert not holds_a_generation("env:acme/web")
    assert not holds_a_generation("prewarm:web-2:acme/web")
