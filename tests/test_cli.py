"""The CLI as scripts use it: --help on every command, exit codes they can rely on."""

import subprocess
import sys

import pytest


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("command", ["run", "prewarm", "status", "gc", "verify"])
def test_every_command_documents_itself(command: str) -> None:
    r = run(command, "--help")
    assert r.returncode == 0
    assert "usage: flox-node-cache " + command in r.stdout
    assert "--socket" in r.stdout or "--store" in r.stdout


def test_top_level_help_lists_commands_and_exit_codes() -> None:
    r = run("--help")
    assert r.returncode == 0
    for word in ("run", "prewarm", "status", "gc", "verify", "exit codes"):
        assert word in r.stdout


def test_configuration_errors_exit_2_with_a_message() -> None:
    r = run("run", "--listen", "bogus")
    assert r.returncode == 2
    assert "configuration error" in r.stderr and "Traceback" not in r.stderr


def test_unreachable_agent_exits_3(tmp_path) -> None:
    for args in (["status"], ["gc"], ["prewarm", "acme/web"]):
        r = run(*args, "--socket", str(tmp_path / "none.sock"))
        assert r.returncode == 3, (args, r.stderr)
        assert "cannot reach the agent" in r.stderr


def test_verify_on_a_directory_that_is_not_a_store_is_a_usage_error(tmp_path) -> None:
    r = run("verify", "--store", str(tmp_path))
    assert r.returncode == 2
