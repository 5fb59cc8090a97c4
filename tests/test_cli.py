"""The CLI as scripts and people use it: --help on every command, exit codes they can rely on,
and output that tells the truth (whole names in a pipe, full store paths, Ctrl-C that says what
happens to the job). Against the real agent process, through real CLI subprocesses."""

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import exits
from agent.flox.lockfile import node_system
from tests.support.agent import AgentProcess
from tests.support.nixenv import Closure
from tests.support.upstream import Fault, UpstreamServer

COMMANDS = ["run", "prewarm", "status", "pins", "unpin", "gc", "verify"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True,
                          text=True, timeout=60)


def cli(agent: AgentProcess, *args: str) -> subprocess.CompletedProcess:
    """A CLI command against `agent`, its stdout and stderr pipes (not a terminal)."""
    return run(*args, "--socket", str(agent.socket))


def admin(agent: AgentProcess, path: str) -> object:
    out = subprocess.run(["curl", "-s", "--unix-socket", str(agent.socket), "http://agent" + path],
                         capture_output=True, text=True, check=True, timeout=30)
    return json.loads(out.stdout)


@pytest.fixture
def agent(tmp_path: Path, upstream_server: UpstreamServer,
          signing_key: tuple[Path, str]) -> Iterator[AgentProcess]:
    # a long read timeout: a stalled upstream NAR keeps a job running until it is cancelled
    with AgentProcess(tmp_path / "agent", [upstream_server.url], [signing_key[1]],
                      "--upstream-read-timeout", "300") as a:
        yield a


# --- help and exit codes ---------------------------------------------------------------------

@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_documents_itself(command: str) -> None:
    r = run(command, "--help")
    assert r.returncode == 0
    assert "usage: flox-node-cache " + command in r.stdout
    assert "--socket" in r.stdout or "--store" in r.stdout


def test_top_level_help_lists_commands_and_every_exit_code() -> None:
    r = run("--help")
    assert r.returncode == 0
    for word in COMMANDS:
        assert word in r.stdout
    text = " ".join(r.stdout.split())
    for code, meaning in ((exits.UNREACHABLE, "agent unreachable"),
                          (exits.CLUSTER_ERROR, "cannot talk to the cluster"),
                          (exits.INTERRUPTED, "interrupted")):
        assert f"{code} {meaning}" in text


def test_configuration_errors_exit_2_with_a_message() -> None:
    r = run("run", "--listen", "bogus")
    assert r.returncode == exits.USAGE
    assert "configuration error" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("argv,message", [
    (["--negative-ttl", "abc"], "--negative-ttl: 'abc' is not a number"),
    (["--circuit-failures", "-1"], "--circuit-failures: must be at least 1, not -1"),
    (["--prefetch-concurrency", "0"], "--prefetch-concurrency: must be at least 1, not 0"),
])
def test_bad_flag_values_name_the_flag(argv: list[str], message: str) -> None:
    r = run("run", *argv)
    assert r.returncode == exits.USAGE
    assert r.stderr == f"flox-node-cache: configuration error: {message}\n"


def test_unreachable_agent_exits_3(tmp_path: Path) -> None:
    for args in (["status"], ["gc"], ["pins"], ["unpin", "acme/web"], ["prewarm", "acme/web"],
                 ["prewarm", "--cancel", "abc"]):
        r = run(*args, "--socket", str(tmp_path / "none.sock"))
        assert r.returncode == exits.UNREACHABLE, (args, r.stderr)
        assert "cannot reach the agent" in r.stderr


def test_verify_on_a_directory_that_is_not_a_store_is_a_usage_error(tmp_path: Path) -> None:
    r = run("verify", "--store", str(tmp_path))
    assert r.returncode == exits.USAGE


# --- prewarm: interruption, cancel, failures -------------------------------------------------

def _ctrl_c_as_in_a_terminal() -> None:
    """SIGINT at its default, as a command started from a terminal has it. A suite started in
    the background of a non-interactive shell (`make test &`) runs with SIGINT ignored; the CLI
    would inherit that, and rightly keep it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _running_job(agent: AgentProcess, proc: subprocess.Popen) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        jobs = [j for j in admin(agent, "/v1/prewarm") if j["state"] == "running"]  # type: ignore[union-attr]
        if jobs and jobs[0]["progress"]["paths_total"]:
            return jobs[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    pytest.fail("no prewarm job started")


def test_ctrl_c_leaves_the_job_running_and_it_can_be_followed_or_cancelled(
        agent: AgentProcess, upstream_server: UpstreamServer,
        big_path_closure: Closure) -> None:
    upstream_server.set_fault("/nar/*", Fault("stall"))  # the job runs until cancelled
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "prewarm", "--store-path", big_path_closure.roots[0],
         "--pin", "--socket", str(agent.socket)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_ctrl_c_as_in_a_terminal)
    job = _running_job(agent, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)

    assert proc.returncode == exits.INTERRUPTED
    assert out == ""
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"prewarm job {job['id']} continues in the agent" in err
    assert f"--follow {job['id']}" in err and f"--cancel {job['id']}" in err
    assert admin(agent, f"/v1/prewarm/{job['id']}")["state"] == "running"  # type: ignore[index]

    cancel = cli(agent, "prewarm", "--cancel", job["id"])
    assert cancel.returncode == exits.OK, cancel.stderr
    name = Path(big_path_closure.roots[0]).name.split("-", 1)[1]
    assert f"cancelled prewarm job {job['id']} (paths:{name}@" in cancel.stderr  # named
    ended = admin(agent, f"/v1/prewarm/{job['id']}")
    assert (ended["state"], ended["error"]) == ("failed", "cancelled")  # type: ignore[index]
    # the cancelled --pin prewarm left no pin behind
    assert json.loads(cli(agent, "pins", "--json").stdout) == []

    follow = cli(agent, "prewarm", "--follow", job["id"])
    assert follow.returncode == exits.FAILED
    assert "cancelled" in follow.stderr
    again = cli(agent, "prewarm", "--cancel", job["id"])
    assert again.returncode == exits.FAILED and "not running" in again.stderr
    assert cli(agent, "prewarm", "--cancel", "no-such-job").returncode == exits.USAGE


def test_a_failed_pinned_prewarm_names_full_store_paths_and_leaves_no_pin(
        agent: AgentProcess, upstream_server: UpstreamServer, small_closure: Closure) -> None:
    missing = small_closure.chain[1]  # a dependency: only its parent's narinfo names it
    hash_part = Path(missing).name.split("-")[0]
    upstream_server.set_fault(f"/{hash_part}.narinfo", Fault("status", code=404))
    r = cli(agent, "prewarm", "--store-path", small_closure.roots[0], "--pin")
    assert r.returncode == exits.FAILED
    assert f"  {missing}: not found in any upstream\n" in r.stderr
    assert "Traceback" not in r.stderr
    assert json.loads(cli(agent, "pins", "--json").stdout) == []
    assert admin(agent, "/v1/status")["pins"] == {}  # type: ignore[index]


def test_pins_and_unpin_with_whole_names_in_a_pipe(
        agent: AgentProcess, small_closure: Closure, big_path_closure: Closure,
        tmp_path: Path) -> None:
    ids = [f"a-package-with-a-name-long-enough-to-wrap-{i}" for i in range(3)]
    packages = [{"install_id": i, "store_path": root, "system": node_system()}
                for i, root in zip(ids, [*small_closure.roots, *big_path_closure.roots],
                                   strict=False)]
    lock = tmp_path / "manifest.lock"
    lock.write_text(json.dumps({"lockfile-version": 1, "manifest": {"version": 1},
                                "packages": packages}))
    r = cli(agent, "prewarm", "--lockfile", str(lock), "--pin")
    assert r.returncode == exits.OK, r.stderr
    name = json.loads(cli(agent, "pins", "--json").stdout)[0]["name"]
    assert name.startswith("lockfile:" + "+".join(ids[:len(packages)]) + "@")
    assert f"ready: {name}: " in r.stderr  # one line, the whole name
    assert "KiB" in r.stderr or "MiB" in r.stderr  # sizes in binary units, like the settings

    listing = cli(agent, "pins")
    assert listing.returncode == exits.OK
    assert any(name in line and "prewarm --pin" in line for line in listing.stdout.splitlines())
    status = cli(agent, "status")
    assert any(name in line for line in status.stdout.splitlines())

    assert cli(agent, "unpin", name).stdout == f"unpinned {name}\n"
    assert json.loads(cli(agent, "pins", "--json").stdout) == []
    again = cli(agent, "unpin", name)
    assert again.returncode == exits.FAILED and "not pinned" in again.stderr


def test_an_old_setting_spelling_starts_the_agent_with_a_deprecation_warning(
        tmp_path: Path, upstream_server: UpstreamServer, signing_key: tuple[Path, str]) -> None:
    env = {"FLOX_NODE_CACHE_UPSTREAMS": upstream_server.url}
    with AgentProcess(tmp_path / "agent", [], [signing_key[1]], env=env) as a:
        upstreams = admin(a, "/v1/status")["upstreams"]  # type: ignore[index]
        assert list(upstreams) == [upstream_server.url]
        warnings = [r["msg"] for r in a.log_records() if r["level"] == "warning"]
    assert ("FLOX_NODE_CACHE_UPSTREAMS is deprecated, use FLOX_NODE_CACHE_UPSTREAM"
            in warnings)
