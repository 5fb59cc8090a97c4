"""Smoke test of the loadtest tool: real runs at the tiny size (real Nix, nginx and agents).

They assert the report is complete and well formed and its numbers sane, never that a target is
met: timing on a shared CI machine is not a test result. The verdict logic itself is unit-tested
in test_compare.py.
"""

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.baselines import NGINX
from loadtest.scenarios import SCENARIOS
from tests.support.nixenv import missing_tools

REPO = Path(__file__).resolve().parents[2]
# The scenario label of each registry entry's measurements.
LABELS = {"warm-start": "warm start", "cold-start": "cold start", "narinfo": "narinfo",
          "throughput": "NAR throughput", "clients": "N clients", "rollout": "rollout",
          "rss": "RSS", "pod-start": "pod start on a prewarmed node",
          "peer-rollout": "rollout to N nodes"}
VERDICTS = {"met", "missed", "inconclusive"}

pytestmark = pytest.mark.skipif(bool(missing_tools()) or not Path(NGINX).exists(),
                                reason="needs nix-bin and nginx")


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loadtest", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=False)


def _tiny(tmp: Path, *args: str) -> dict:
    out = tmp / "results.json"
    proc = _run("--size", "tiny", "--workdir", str(tmp / "work"), "--json", str(out),
                "--settle-limit", "5", "--storm-seconds", "0.3", "--latency", "0.005",
                "--clients", "3", "--rss-clients", "6", "--throughput-seconds", "0.2", *args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "flox-node-cache loadtest" in proc.stdout  # the table
    doc = json.loads(out.read_text())
    doc["markdown"] = out.with_suffix(".md").read_text()
    return doc


def test_help_documents_every_scenario_and_option() -> None:
    out = _run("--help").stdout
    for word in ("--scenario", "--repeats", "interleaved", "inconclusive", "/proc/<pid>/stat",
                 "--size", "--json", "--recompress", "--latency", "--bandwidth", "--clients",
                 "nginx", *SCENARIOS):
        assert word in out, word
    assert set(LABELS) == set(SCENARIOS)


def test_an_unknown_scenario_is_a_usage_error() -> None:
    proc = _run("--scenario", "nope")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _tiny(tmp_path_factory.mktemp("loadtest"))


def test_json_describes_the_machine_load_and_sizes(results: dict) -> None:
    m = results["machine"]
    assert m["nproc"] >= 1 and m["memory_bytes"] > 0 and m["cpu_model"]
    assert len(results["load_average"]["before"]) == 3
    assert results["size"] == "tiny" and results["scenarios"] == list(SCENARIOS)
    assert results["completed"] == [f"{name} (zstd)" for name in SCENARIOS]
    assert set(results["closures"]) == {"base", "web", "ml"}
    # Shared base: the union is smaller than the sum of the environments.
    c = results["closures"]
    assert results["unique_paths"] < c["web"]["paths"] + c["ml"]["paths"]


def test_every_scenario_reports_with_the_default_mode(results: dict) -> None:
    ms = results["measurements"]
    assert {m["scenario"] for m in ms} == set(LABELS.values())
    assert {m["recompress"] for m in ms} == {"zstd"}
    for scenario in ("narinfo", "NAR throughput"):
        assert {m["transport"] for m in ms if m["scenario"] == scenario} >= {"tcp", "unix"}


def test_every_comparison_is_interleaved_and_judged_on_its_spread(results: dict) -> None:
    compared = [m for m in results["measurements"] if m["baseline_samples"]]
    assert len(compared) >= 20
    for m in compared:
        assert len(m["samples"]) == len(m["baseline_samples"]) == 3, m["name"]
        # A round whose baseline is 0 (CPU time below one clock tick) has no ratio.
        pairs = sorted(a / b for a, b in zip(m["samples"], m["baseline_samples"], strict=True)
                       if b)
        r = m["ratio"]
        if not pairs:
            assert r is None and m["unit"] == "µs CPU", m["name"]
            continue
        # Three rounds: no interval is narrower than the range, which is judged.
        assert r["min"] == r["lo"] == pairs[0] and r["max"] == r["hi"] == pairs[-1], m["name"]
        assert r["n"] == len(pairs), m["name"]
        assert r["median"] == pytest.approx(statistics.median(pairs)), m["name"]
    for m in results["measurements"]:
        if m["target"] is None:
            assert m["verdict"] is None
            continue
        judged = m["ratio"] if m["target"]["on_ratio"] else m["value"]
        ok = [(x <= m["target"]["bound"]) if m["target"]["op"] == "<=" else
              (x >= m["target"]["bound"]) for x in (judged["lo"], judged["hi"])]
        assert m["verdict"] == ("met" if all(ok) else "missed" if not any(ok)
                                else "inconclusive"), m["name"]


def test_the_warm_start_has_its_three_baselines_and_the_overlay(results: dict) -> None:
    warm = {(m["name"], m["baseline_name"]): m for m in results["measurements"]
            if m["scenario"] == "warm start"}
    targets = {k: m["target"]["text"] for k, m in warm.items() if m["target"]}
    assert targets == {
        ("ml: overlay config (file:// agent's store, then agent HTTP)", "file:// uncompressed"):
            "<= 1.1x file:// uncompressed",
        ("ml: agent HTTP", "nginx on agent's store"): "<= 1.1x nginx"}
    assert {("ml: agent HTTP", "file:// uncompressed"),
            ("ml: file:// agent's store", "file:// uncompressed"),
            ("ml: nginx on agent's store", "file:// agent's store"),
            ("ml: Nix client CPU, agent HTTP", "nginx on agent's store")} <= set(warm)
    assert all(warm[k]["verdict"] in VERDICTS for k in targets)
    overlay = warm[next(iter(targets))]
    assert all(run["server_cpu_s"] is not None for run in overlay["details"]["runs"])
    assert all(run["server_cpu_s"] is None for run in overlay["details"]["baseline_runs"])
    # The overlay's node reads the warm agent's store directly: only nix-cache-info reaches
    # the agent, while through HTTP alone every narinfo and NAR does.
    reached = warm[("ml: overlay config: requests that reached the agent", "agent HTTP alone")]
    paths = results["closures"]["ml"]["paths"]
    assert reached["samples"] == [1.0] * 3
    assert all(n >= 2 * paths for n in reached["baseline_samples"])


def test_cpu_per_request_is_reported_beside_the_rates(results: dict) -> None:
    cpu = [m for m in results["measurements"] if m["unit"] == "µs CPU"]
    assert {m["scenario"] for m in cpu} >= {"narinfo", "NAR throughput", "warm start"}
    # Thousands of narinfo requests per round: the agent's CPU time is measurable.
    seq = [m for m in cpu if m["name"].startswith("1 keep-alive")]
    assert len(seq) == 2 and all(m["value"]["median"] > 0 for m in seq)


def test_numbers_are_sane(results: dict) -> None:
    for m in results["measurements"]:
        assert all(math.isfinite(x) and x >= 0 for x in m["samples"]), m
        if m["unit"] in ("req/s", "MiB/s"):
            assert m["value"]["lo"] > 0 and m["baseline"]["lo"] > 0, m
            assert all(r["errors"] == 0 for r in m["details"]["agent"]), m
    by_name = {m["name"]: m for m in results["measurements"]}
    cold = by_name["3 clients web, cold agent: upstream NAR requests per unique NAR"]
    assert cold["samples"] == [1.0] * 3 and cold["verdict"] == "met"
    assert by_name["3 pods: upstream NAR requests during start"]["samples"] == [0.0] * 3
    rss = [m for m in results["measurements"] if m["scenario"] == "RSS"]
    assert all(10 < m["value"]["median"] < 4096 and m["details"]["errors"] == 0 for m in rss)
    assert not [n for n in results["notes"] if "failures" in n or "prewarm ended" in n]


def test_peers_take_a_rollout_to_one_download_and_realised_pods_copy_nothing(
        results: dict) -> None:
    by_name = {m["name"]: m for m in results["measurements"]}
    peers = by_name["4 nodes x 2 pods, with peers: upstream bytes / closure bytes"]
    assert peers["samples"] == [1.0] * 3 and peers["verdict"] == "met"
    assert peers["baseline_samples"] == [4.0] * 3  # without peers: every node downloads
    realised = [m for m in results["measurements"]
                if m["scenario"] == "pod start on a prewarmed node" and "realised" in m["name"]]
    assert {m["name"] for m in realised} == {"web closure, realised", "ml closure, realised"}


def test_the_markdown_table_has_a_row_per_measurement(results: dict) -> None:
    lines = results["markdown"].strip().splitlines()
    assert len(lines) == 2 + len(results["measurements"])


def test_one_scenario_runs_alone(tmp_path: Path) -> None:
    doc = _tiny(tmp_path, "--scenario", "throughput", "--repeats", "1")
    assert doc["scenarios"] == ["throughput"]
    assert {m["scenario"] for m in doc["measurements"]} == {"NAR throughput"}
    assert all(len(m["samples"]) == 1 for m in doc["measurements"])
    assert any("verdicts are indicative" in n for n in doc["notes"])
    # the host's share of the CPU during the scenario, for a reader to judge the figures by
    assert list(doc["host_steal"]) == ["throughput (zstd)"]
    assert 0 <= doc["host_steal"]["throughput (zstd)"] <= 1
    # ... and during each round of each of its comparisons (one per transport, one round each)
    rounds = doc["host_steal_per_round"]["throughput (zstd)"]
    assert sorted(rounds) == ["tcp", "unix"]
    assert all(len(r) == 1 and 0 <= r[0] <= 1 for r in rounds.values())
