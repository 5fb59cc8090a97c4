"""Highly compressible signed paths through the real agent and `verify`, in bounded memory.

A GiB of zeros as Nix's zstd (33 kB) is fetched, scrubbed and verified; 256 MiB of zeros as xz
is fetched and re-encoded to zstd (whose check, scrub and verify then inflate a 256 MiB frame).
Before decoding was bounded, one zstd step inflated a whole frame: the agent peaked at 1.1 GB."""

import contextlib
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.store.test_recompress import narinfo, wait_reencoded
from tests.support.agent import AgentProcess
from tests.support.nixenv import add_to_store, nix_copy, path_valid_in, publish
from tests.support.upstream import UpstreamServer

GIB = 1 << 30
# Nix takes ~16 s to xz a GiB of zeros; 256 MiB is quicker, and its zstd re-encoding still
# inflated past the limit in one step before decoding was bounded.
XZ_SIZE = 256 << 20
PEAK_LIMIT = 300 << 20


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """Room for the GiB-sized stores, removed at teardown (pytest keeps recent tmp dirs)."""
    d = tmp_path / "big"
    d.mkdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def zeros_path(store: Path, name: str, size: int) -> str:
    """A store path (in the chroot store at `store`) holding one sparse file of zeros."""
    src = store.parent / name
    src.mkdir()
    with (src / "zeros").open("wb") as f:
        f.truncate(size)
    return add_to_store(src, store)


def peak_rss(pid: int) -> int:
    """VmHWM: the most resident memory the live process `pid` ever had, in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    kib = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(kib) << 10


def run_measured(args: list[str]) -> tuple[int, str, int]:
    """Run a command to its end: exit code, stdout and peak RSS in bytes.

    The peak is the process's own VmHWM, sampled until it exits (it only grows). Not wait4's
    ru_maxrss: Linux counts into it the memory the process had before exec, a copy of this
    test process (hundreds of MB late in a full suite)."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    peak = 0
    reader = threading.Thread(target=lambda: setattr(proc, "output", proc.stdout.read()))
    reader.start()
    while proc.poll() is None:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, StopIteration):
            peak = max(peak, peak_rss(proc.pid))
        time.sleep(0.01)
    reader.join()
    return proc.returncode, proc.output, peak  # type: ignore[attr-defined]


def wait_scrubbed(agent: AgentProcess, timeout: float = 60) -> None:
    """Until the scrub has read every stored NAR at least once from now on: twice the bytes of
    all of them, as a pass may already be under way."""
    start = agent.metric("flox_node_cache_scrubbed_bytes_total")
    need = 2 * sum(f.stat().st_size for f in (agent.store / "nar").iterdir())
    deadline = time.monotonic() + timeout
    while agent.metric("flox_node_cache_scrubbed_bytes_total") < start + need:
        assert time.monotonic() < deadline, "the scrub did not get through the store"
        time.sleep(0.2)


@pytest.mark.slow
async def test_a_gib_of_zeros_passes_through_fetch_reencode_verify_and_scrub_in_bounded_memory(
        tmp_path: Path, scratch: Path, signing_key: tuple[Path, str]) -> None:
    source = scratch / "source"
    gib = zeros_path(source, "gib-of-zeros", GIB)
    xz = zeros_path(source, "zeros-xz", XZ_SIZE)
    cache = tmp_path / "cache"
    publish([gib], cache, signing_key[0], "zstd", store=source)
    publish([xz], cache, signing_key[0], "xz", store=source)
    shutil.rmtree(source)
    key = signing_key[1]

    with UpstreamServer(cache) as upstream, \
            AgentProcess(tmp_path / "a", [upstream.url], [key], "--recompress", "zstd",
                         "--scrub-interval", "2", "--scrub-rate", "10G") as agent:
        assert agent.proc is not None
        # A real Nix client fetches both through the agent, which verifies them as they pass.
        r = nix_copy(agent.url, scratch / "client", [gib, xz], [key])
        assert r.returncode == 0, r.stderr
        assert path_valid_in(scratch / "client", gib) and path_valid_in(scratch / "client", xz)
        shutil.rmtree(scratch / "client")
        # The xz NAR is re-encoded to zstd, and the result checked against its NarHash.
        await wait_reencoded(agent, [xz])
        assert (await narinfo(agent, xz))["Compression"] == ["zstd"]
        assert agent.metric("flox_node_cache_recompressions_total", outcome="ok") == 1
        wait_scrubbed(agent)
        assert agent.metric("flox_node_cache_verify_failures_total") == 0
        agent_peak = peak_rss(agent.proc.pid)

    code, out, verify_peak = run_measured(
        [sys.executable, "-m", "agent", "verify", "--store", str(agent.store), "--json"])
    report = json.loads(out)
    # Both zstd NARs, and the xz one the re-encoded NAR replaces after a grace period.
    assert code == 0 and report["ok"] and report["checked"] == 3, out
    assert agent_peak < PEAK_LIMIT, f"agent peak RSS {agent_peak >> 20} MiB"
    assert verify_peak < PEAK_LIMIT, f"verify peak RSS {verify_peak >> 20} MiB"
