"""Smoke test of the loadtest tool: a real run at the tiny size (real Nix, nginx and agent).

It asserts the run is complete and its numbers are sane, never that they meet a target:
timing on a shared CI machine is not a test result.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.baselines import NGINX
from tests.support.nixenv import missing_tools

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = {"baseline", "1 narinfo storm", "2 NAR throughput", "3 N clients", "4 rollout",
             "cold start", "RSS", "recompress", "pod start on a prewarmed node",
             "5 rollout to N nodes"}
ONE_MODE = {"baseline", "recompress", "pod start on a prewarmed node", "5 rollout to N nodes"}

pytestmark = pytest.mark.skipif(bool(missing_tools()) or not Path(NGINX).exists(),
                                reason="needs nix-bin and nginx")


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loadtest", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_help_documents_every_scenario_and_option() -> None:
    out = _run("--help").stdout
    for word in ("narinfo storm", "NAR throughput", "rollout", "RSS", "--size", "--json",
                 "--nodes", "--pods-per-node",
                 "--recompress", "--latency", "--bandwidth", "--clients", "nginx"):
        assert word in out


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("loadtest")
    out = tmp / "results.json"
    proc = _run("--size", "tiny", "--workdir", str(tmp / "work"), "--json", str(out),
                "--settle-limit", "2", "--storm-seconds", "0.3", "--latency", "0.005",
                timeout=300)  # scenario 5 starts 8 agents
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "flox-node-cache loadtest" in proc.stdout  # the table
    return json.loads(out.read_text())


def test_json_describes_the_machine_and_sizes(results: dict) -> None:
    m = results["machine"]
    assert m["nproc"] >= 1 and m["memory_bytes"] > 0 and m["cpu_model"]
    assert results["size"] == "tiny"
    assert set(results["closures"]) == {"base", "web", "ml"}
    # Shared base: the union is smaller than the sum of the environments.
    c = results["closures"]
    assert results["unique_paths"] < c["web"]["paths"] + c["ml"]["paths"]


def test_every_scenario_runs_with_both_recompress_modes(results: dict) -> None:
    ms = results["measurements"]
    assert {m["scenario"] for m in ms} == SCENARIOS
    for scenario in SCENARIOS - ONE_MODE:
        modes = {m["recompress"] for m in ms if m["scenario"] == scenario}
        assert modes == {"zstd", "none"}, scenario
    for scenario in ("1 narinfo storm", "2 NAR throughput"):
        assert {m["transport"] for m in ms if m["scenario"] == scenario} == {"tcp", "unix"}


def test_numbers_are_sane(results: dict) -> None:
    for m in results["measurements"]:
        assert math.isfinite(m["value"]) and m["value"] >= 0, m
        if m["baseline_value"]:
            assert m["ratio"] == pytest.approx(m["value"] / m["baseline_value"]), m
        if m["unit"] in ("req/s", "MiB/s"):
            assert m["value"] > 0 and m["baseline_value"] > 0, m
            assert m["details"]["agent"]["errors"] == 0, m
    by_name = {(m["name"], m["recompress"]): m for m in results["measurements"]}
    for mode in ("zstd", "none"):
        cold = by_name[("4 clients web, cold agent: upstream NAR requests per unique NAR", mode)]
        assert cold["value"] == 1.0 and cold["met"] is True
        assert by_name[("4 pods: upstream NAR requests during start", mode)]["value"] == 0
    # Peers: the closure crosses the upstream once for the 4 nodes, 4 times without them.
    nodes = {m["name"]: m for m in results["measurements"]
             if m["scenario"] == "5 rollout to N nodes"}
    assert nodes["4 nodes x 2 pods, with peers: upstream bytes / closure bytes"]["value"] == 1.0
    assert nodes["4 nodes x 2 pods, no peers: upstream bytes / closure bytes"]["value"] == 4.0
    rss = [m for m in results["measurements"] if m["scenario"] == "RSS"]
    assert all(10 < m["value"] < 4096 and m["details"]["errors"] == 0 for m in rss)
    assert not [n for n in results["notes"] if "failures" in n]
