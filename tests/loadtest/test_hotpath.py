"""Smoke test of `python -m loadtest.hotpath` at the tiny size (real Nix, nginx and agent):
the run completes and charges a sane CPU time per request to each server. Never a target:
timing on a shared machine is not a test result."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.baselines import NGINX
from tests.support.nixenv import missing_tools

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(bool(missing_tools()) or not Path(NGINX).exists(),
                                reason="needs nix-bin and nginx")


def test_cpu_per_request_of_agent_and_nginx_for_each_scenario(tmp_path: Path) -> None:
    out = tmp_path / "hotpath.json"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.hotpath", "--size", "tiny", "--workdir",
         str(tmp_path / "work"), "--pairs", "1", "--requests", "1000", "--nar-passes", "2",
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())["results"]
    assert [r["scenario"] for r in results] == [
        "narinfo tcp", "nar tcp x16", "narinfo unix", "nar unix x16", "nix copy ml"]
    for r in results:
        # Far less than a second of CPU per request (a short run may stay under a 10 ms tick).
        assert 0 <= r["agent_cpu_us"] < 1e6 and 0 <= r["nginx_cpu_us"] < 1e6, r
        assert r["agent_rate"] > 0 and r["nginx_rate"] > 0, r
    # 1,000 narinfo requests cost the agent at least a tick of CPU.
    assert all(r["agent_cpu_us"] > 0 for r in results if r["scenario"].startswith("narinfo"))
