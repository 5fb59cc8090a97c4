"""`prewarm --cluster --wait`: the rollout gate's exit codes and messages."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from agent.exits import USAGE as EXIT_USAGE
from agent.kube.rollout import (
    EXIT_CLUSTER,
    EXIT_FAILED,
    EXIT_NO_NODES,
    EXIT_OK,
    EXIT_TIMEOUT,
    prewarm_cluster,
    resource_name,
)
from tests.kube import Agents, FakePrewarmer, eventually, node, prewarm_resource
from tests.support.agent import free_port
from tests.support.kubeapi import FakeKubeAPI

REFS = ["flox/quotes-app:3", "flox/redis"]


async def gate(kubeconfig: str, *, timeout: float = 5.0, selector: dict[str, str] | None = None,
               wait: bool = True) -> tuple[int, str]:
    out = io.StringIO()
    code = await prewarm_cluster(refs=REFS, selector=selector or {}, pin=True, wait=wait,
                                 timeout=timeout, kubeconfig=kubeconfig, name=None,
                                 console=Console(file=out, width=200), poll=0.1)
    return code, out.getvalue()


def three_nodes(kubeapi: FakeKubeAPI) -> None:
    for n in ("n1", "n2", "n3"):
        kubeapi.create(node(n))
    kubeapi.create(node("no-flox", flox=False))  # no agent runs there: never waited for


async def test_exits_0_when_every_node_is_ready(kubeapi: FakeKubeAPI, kubeconfig: str,
                                                agents: Agents) -> None:
    three_nodes(kubeapi)
    for n in ("n1", "n2", "n3"):
        agents.start(n)
    code, out = await gate(kubeconfig)
    assert code == EXIT_OK, out
    assert "all 3 node(s) ready" in out
    obj = kubeapi.get("EnvironmentPrewarm", resource_name(REFS))
    assert obj["spec"]["environments"] == REFS and obj["spec"]["pin"] is True
    assert obj["spec"]["deadline"].endswith("Z")


async def test_exits_1_naming_the_failed_node_and_why(kubeapi: FakeKubeAPI, kubeconfig: str,
                                                      agents: Agents) -> None:
    three_nodes(kubeapi)
    broken = FakePrewarmer()
    broken.fail_with["flox/redis"] = "upstream returned 500 for nar/abc"
    agents.start("n1")
    agents.start("n2", broken)
    agents.start("n3")
    code, out = await gate(kubeconfig)
    assert code == EXIT_FAILED, out
    assert "n2: failed" in out and "upstream returned 500 for nar/abc" in out
    assert "n1:" not in out and "n3:" not in out


async def test_exits_2_naming_the_late_node(kubeapi: FakeKubeAPI, kubeconfig: str,
                                            agents: Agents) -> None:
    three_nodes(kubeapi)
    slow = FakePrewarmer()
    slow.hold = set(REFS)
    agents.start("n1")
    agents.start("n2", slow)  # n2 never finishes, n3 has no agent at all
    code, out = await gate(kubeconfig, timeout=1.5)
    assert code == EXIT_TIMEOUT, out
    assert "n2: " in out and "n3: not ready" in out and "n1:" not in out


async def test_exits_3_when_no_node_matches(kubeapi: FakeKubeAPI, kubeconfig: str) -> None:
    three_nodes(kubeapi)
    code, out = await gate(kubeconfig, selector={"pool": "gpu"})
    assert code == EXIT_NO_NODES
    assert "no Flox node matches" in out and "pool=gpu" in out


async def test_update_replaces_spec_and_stale_ready_does_not_count(
        kubeapi: FakeKubeAPI, kubeconfig: str) -> None:
    kubeapi.create(node("n1", {"pool": "a"}))
    old = prewarm_resource(resource_name(REFS), ["flox/old"], selector={"pool": "a", "x": "y"})
    created = kubeapi.create(old)
    created["status"] = {"nodes": {"n1": {"phase": "Ready", "observedGeneration": 1}}}
    kubeapi.update(created, status=True)
    # no agent runs: the leftover Ready of generation 1 must not open the gate
    code, out = await gate(kubeconfig, timeout=1.0, selector={"pool": "a"})
    assert code == EXIT_TIMEOUT, out
    obj = kubeapi.get("EnvironmentPrewarm", resource_name(REFS))
    assert obj["metadata"]["generation"] == 2
    assert obj["spec"]["nodeSelector"] == {"pool": "a"}  # the dropped key is gone
    assert obj["spec"]["environments"] == REFS


async def test_without_wait_creates_and_returns(kubeapi: FakeKubeAPI, kubeconfig: str) -> None:
    code, out = await gate(kubeconfig, wait=False)
    assert code == EXIT_OK
    assert "nodes that join will act on it" in out
    assert kubeapi.get("EnvironmentPrewarm", resource_name(REFS))


def test_resource_names_are_dns_safe_and_stable() -> None:
    name = resource_name(["Flox/Quotes_App:7", "flox/redis"])
    assert name == resource_name(["flox/redis", "Flox/Quotes_App:7"])
    assert len(name) <= 63 and name.replace("-", "").isalnum() and name == name.lower()


async def test_timeout_bounds_the_whole_command_against_a_stalled_server(
        kubeapi: FakeKubeAPI, kubeconfig: str) -> None:
    three_nodes(kubeapi)
    kubeapi.inject(stall=120, times=None)  # every request hangs
    async with asyncio.timeout(20):  # a guard: without the fix this hangs for minutes
        code, out = await gate(kubeconfig, timeout=1.0)
    assert code == EXIT_CLUSTER, out
    assert "cannot reach the cluster" in out


async def test_transient_errors_are_retried_until_the_deadline(
        kubeapi: FakeKubeAPI, kubeconfig: str, agents: Agents) -> None:
    three_nodes(kubeapi)
    for n in ("n1", "n2", "n3"):
        agents.start(n)
    kubeapi.inject(429, retry_after=1, verb="create", resource="environmentprewarms")
    kubeapi.inject(reset=True, times=3, verb="list", resource="nodes")
    kubeapi.inject(503, times=2, verb="get", resource="environmentprewarms")
    code, out = await gate(kubeconfig, timeout=10)
    assert code == EXIT_OK, out


async def test_an_api_server_restart_during_wait_is_survived(
        kubeapi: FakeKubeAPI, kubeconfig: str, agents: Agents) -> None:
    three_nodes(kubeapi)
    slow = FakePrewarmer()
    slow.hold = set(REFS)
    for n in ("n1", "n2"):
        agents.start(n)
    agents.start("n3", slow)
    waiting = asyncio.get_running_loop().create_task(gate(kubeconfig, timeout=15))
    await eventually(lambda: kubeapi.requests_for("nodes", watch=False)
                     and slow.jobs.get("flox/redis"))
    kubeapi.inject(503, times=None, verb="get")  # restarting: the gate's reads fail a while
    kubeapi.restart()
    await asyncio.sleep(0.5)
    kubeapi.clear_faults()
    for job in slow.jobs.values():
        job.finish()
    code, out = await waiting
    assert code == EXIT_OK, out


async def test_forbidden_is_a_one_line_error_with_its_own_exit_code(
        kubeapi: FakeKubeAPI, tmp_path: Path) -> None:
    three_nodes(kubeapi)
    unbound = str(kubeapi.write_kubeconfig(tmp_path / "kc", service_account=("ci", "nobody")))
    code, out = await gate(unbound)
    assert code == EXIT_CLUSTER, out
    assert "forbidden" in out and 'cannot list resource "nodes"' in out
    assert len(out.strip().splitlines()) == 1


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "prewarm", "--cluster", *args],
                          capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items()
                               if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
                          | (env or {}))


def test_cli_errors_are_messages_with_documented_exit_codes(kubeapi: FakeKubeAPI,
                                                             kubeconfig: str) -> None:
    three_nodes(kubeapi)
    r = cli("acme/web:notanumber", "--kubeconfig", kubeconfig)  # the CRD's pattern: 422
    assert r.returncode == EXIT_USAGE, r.stderr
    assert "spec.environments[0]" in r.stderr and "Traceback" not in r.stderr
    port = free_port()
    Path(kubeconfig).write_text(Path(kubeconfig).read_text().replace(
        f":{kubeapi.port}", f":{port}"))  # nothing listens there
    r = cli("acme/web", "--kubeconfig", kubeconfig, "--timeout", "2s")
    assert r.returncode == EXIT_CLUSTER, r.stderr
    assert "cannot reach the cluster" in r.stderr and "Traceback" not in r.stderr


def test_kubeconfig_from_the_environment_then_home_then_in_cluster(
        kubeapi: FakeKubeAPI, kubeconfig: str, tmp_path: Path) -> None:
    three_nodes(kubeapi)
    r = cli("acme/web", "--name", "from-env", env={"KUBECONFIG": kubeconfig,
                                                   "HOME": str(tmp_path)})
    assert r.returncode == EXIT_OK, r.stderr
    assert kubeapi.get("EnvironmentPrewarm", "from-env")
    (tmp_path / ".kube").mkdir()
    (tmp_path / ".kube" / "config").write_text(Path(kubeconfig).read_text())
    r = cli("acme/web", "--name", "from-home", env={"HOME": str(tmp_path)})
    assert r.returncode == EXIT_OK, r.stderr
    assert kubeapi.get("EnvironmentPrewarm", "from-home")
    r = cli("acme/web", env={"HOME": str(tmp_path / "nowhere")})
    assert r.returncode == EXIT_CLUSTER, r.stderr
    assert "no kubeconfig" in r.stderr and "Traceback" not in r.stderr


def test_ttl_and_delete_from_the_command_line(kubeapi: FakeKubeAPI, kubeconfig: str) -> None:
    three_nodes(kubeapi)
    r = cli("acme/web", "--name", "web", "--ttl", "10m", "--kubeconfig", kubeconfig)
    assert r.returncode == EXIT_OK, r.stderr
    assert kubeapi.get("EnvironmentPrewarm", "web")["spec"]["ttlSecondsAfterFinished"] == 600
    r = cli("acme/web", "--name", "web", "--kubeconfig", kubeconfig)  # no --ttl: none
    assert "ttlSecondsAfterFinished" not in kubeapi.get("EnvironmentPrewarm", "web")["spec"]
    r = cli("--delete", "web", "--kubeconfig", kubeconfig)
    assert r.returncode == EXIT_OK, r.stderr
    assert "deleted" in r.stderr and not kubeapi.list("EnvironmentPrewarm")
    r = cli("--delete", "web", "--kubeconfig", kubeconfig)
    assert r.returncode == EXIT_USAGE and "not found" in r.stderr, r.stderr
