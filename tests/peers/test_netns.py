"""The test-host harness itself: hosts reach each other and the bridge, a cut host is a black
hole, and nothing is left behind, even when the test fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.netns import Network, leftovers, unavailable

pytestmark = pytest.mark.skipif(unavailable() is not None,
                                reason=f"network namespaces: {unavailable()}")

PROBE = "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), {})"


def test_hosts_reach_each_other_until_cut_and_everything_is_removed() -> None:
    with pytest.raises(RuntimeError, match="boom"), Network() as net:
        a, b = net.add_host(), net.add_host()
        assert a.address != b.address and a.address.startswith(net.prefix)
        listen = f"import socket; s = socket.create_server(('{b.address}', 7000)); s.accept()"
        proc = subprocess.Popen([*b.exec_prefix(), "python3", "-c", listen])
        try:
            ok = ""
            for _ in range(50):
                ok = net.run(a, ["python3", "-c", PROBE.format(2), b.address, "7000"]).stderr
                if not ok:
                    break
            assert ok == ""
            net.cut(b)
            cut = net.run(a, ["python3", "-c", PROBE.format(1), b.address, "7000"])
            assert "timed out" in cut.stderr  # dropped, not refused
        finally:
            proc.kill()
            proc.wait()
        raise RuntimeError("boom")  # a failing test still cleans up
    assert leftovers(net.tag) == []


def test_what_a_killed_run_left_behind_is_reaped_by_the_next() -> None:
    script = ("import os, signal, subprocess; from tests.support.netns import Network; "
              "net = Network().__enter__(); h = net.add_host(); "
              "subprocess.Popen([*h.exec_prefix(), 'sleep', '600'], stdout=subprocess.DEVNULL, "
              "stderr=subprocess.DEVNULL); print(net.tag, flush=True); "
              "os.kill(os.getpid(), signal.SIGKILL)")
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60, cwd=Path(__file__).resolve().parents[2])
    tag = killed.stdout.strip()
    assert tag and leftovers(tag), killed.stderr  # the namespace, bridge and link are there
    with Network():
        pass
    assert leftovers(tag) == []
