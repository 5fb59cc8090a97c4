"""The agent's exposition and the alert rules, checked by the real promtool.

`promtool check metrics` lints a real scrape taken after real traffic (so labelled series
exist); `promtool check rules` checks the PrometheusRule's groups; `promtool test rules`
proves what the alerts do with synthetic series (edge cases a live run cannot reach).
"""

from __future__ import annotations

import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.support.agent import AgentProcess
from tests.support.nixenv import Closure, nix_copy
from tests.support.prometheus import PROMTOOL, rule_groups, write_rules_file
from tests.support.upstream import UpstreamServer

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_RULE = ROOT / "daemonset" / "components" / "monitoring" / "prometheusrule.yaml"
QUICK = "download-attempts = 1\nstalled-download-timeout = 10\nconnect-timeout = 5\n"


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.fixture
def agent(tmp_path: Path, upstream_server: UpstreamServer,
          signing_key: tuple[Path, str]) -> Iterator[AgentProcess]:
    with AgentProcess(tmp_path / "agent", [upstream_server.url], [signing_key[1]]) as a:
        yield a


def test_real_scrape_passes_promtool_check_metrics(
        agent: AgentProcess, small_closure: Closure, signing_key: tuple[Path, str],
        tmp_path: Path) -> None:
    for node in ("node1", "node2"):  # a cold copy (upstream) and a warm one (local)
        copy = nix_copy(agent.url, tmp_path / node, small_closure.roots, [signing_key[1]],
                        extra_config=QUICK)
        assert copy.returncode == 0, copy.stderr
    with pytest.raises(urllib.error.HTTPError) as miss:  # a miss: no upstream has it
        urllib.request.urlopen(f"{agent.url}/{'0' * 32}.narinfo", timeout=5)
    assert miss.value.code == 404
    with urllib.request.urlopen(agent.metrics_url + "/metrics", timeout=5) as r:
        exposition = r.read().decode()
    # The scrape holds the series the traffic made, not just HELP lines.
    assert 'flox_node_cache_lookups_total{kind="nar",source="local"}' in exposition
    assert "flox_node_cache_upstream_request_duration_seconds_bucket{" in exposition
    assert "process_resident_memory_bytes " in exposition
    result = promtool("check", "metrics", stdin=exposition)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_prometheusrule_groups_pass_promtool_check_rules(tmp_path: Path) -> None:
    groups = rule_groups(PROMETHEUS_RULE)
    assert {r["alert"] for g in groups for r in g["rules"]} >= {
        "FloxNodeCacheDown", "FloxNodeCacheStoreNearBudget", "FloxNodeCacheUpstreamErrors",
        "FloxNodeCacheVerificationFailures", "FloxNodeCacheLowHitRatio",
        "FloxNodeCacheDiskFull", "FloxNodeCacheNodeRealiseFailing"}
    for g in groups:
        for rule in g["rules"]:
            assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
            assert rule["labels"]["severity"] in ("info", "warning", "critical")
    rules = write_rules_file(groups, tmp_path / "rules.yml")
    result = promtool("check", "rules", str(rules))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {sum(len(g['rules']) for g in groups)} rules found" in result.stdout


# --- alert behaviour, with promtool's rule unit tests ---------------------------------------

L = 'job="flox-node-cache", node="n1", instance="10.0.0.1:37516"'
ALERT_LABELS = {"job": "flox-node-cache", "node": "n1", "instance": "10.0.0.1:37516"}


def _case(series: list[tuple[str, str]], alerts: list[tuple[str, str, list[dict]]],
          interval: str = "1m") -> dict:
    return {"interval": interval,
            "input_series": [{"series": s, "values": v} for s, v in series],
            "alert_rule_test": [{"alertname": name, "eval_time": at, "exp_alerts": exp}
                                for name, at, exp in alerts]}


def _alert(severity: str, **labels: str) -> dict:
    return {"exp_labels": {**ALERT_LABELS, "severity": severity, **labels}}


CASES = {
    "agent down for 5m": _case(
        [(f"up{{{L}}}", "1 1 0x10")],
        [("FloxNodeCacheDown", "5m", []), ("FloxNodeCacheDown", "8m", [_alert("warning")])]),
    "store near budget for 15m, an unset budget never": _case(
        [(f"flox_node_cache_store_used_bytes{{{L}}}", "99x30"),
         (f"flox_node_cache_store_budget_bytes{{{L}}}", "100x30"),
         ('flox_node_cache_store_used_bytes{job="flox-node-cache", node="n2"}', "99x30"),
         ('flox_node_cache_store_budget_bytes{job="flox-node-cache", node="n2"}', "0x30")],
        [("FloxNodeCacheStoreNearBudget", "10m", []),
         ("FloxNodeCacheStoreNearBudget", "20m", [_alert("warning")])]),
    "verification failure: the first one of a new series alerts": _case(
        [(f'flox_node_cache_verification_failures_total{{{L}, reason="nar_hash"}}',
          "_x5 1x20")],
        [("FloxNodeCacheVerificationFailures", "4m", []),
         ("FloxNodeCacheVerificationFailures", "7m",
          [_alert("critical", reason="nar_hash")]),
         # Quiet again once the window has passed without a new failure.
         ("FloxNodeCacheVerificationFailures", "24m", [])]),
    "verification failure: an increase of an existing series alerts": _case(
        [(f'flox_node_cache_verification_failures_total{{{L}, reason="file_hash"}}',
          "3x20 4x20")],
        [("FloxNodeCacheVerificationFailures", "19m", []),
         ("FloxNodeCacheVerificationFailures", "22m",
          [_alert("critical", reason="file_hash")])]),
    "upstream error ratio above 5% for 10m": _case(
        [(f'flox_node_cache_upstream_requests_total{{{L}, upstream="u", kind="nar", '
          f'code="200"}}', "0+100x40"),
         (f'flox_node_cache_upstream_errors_total{{{L}, upstream="u", reason="timeout"}}',
          "0+1x10 10+20x30")],
        [("FloxNodeCacheUpstreamErrors", "9m", []),
         ("FloxNodeCacheUpstreamErrors", "35m", [_alert("warning", upstream="u")])]),
    "low hit ratio alerts under load, an idle node does not": _case(
        [(f'flox_node_cache_lookups_total{{{L}, kind="nar", source="local"}}', "0+60x150"),
         (f'flox_node_cache_lookups_total{{{L}, kind="nar", source="upstream"}}',
          "0+120x150"),
         ('flox_node_cache_lookups_total{job="flox-node-cache", node="idle", kind="nar", '
          'source="local"}', "0+1x150"),
         ('flox_node_cache_lookups_total{job="flox-node-cache", node="idle", kind="nar", '
          'source="upstream"}', "0+5x150")],
        [("FloxNodeCacheLowHitRatio", "140m", [_alert("info")])]),
    "reads straight from the store directory are hits: no low hit ratio alert": _case(
        [(f'flox_node_cache_lookups_total{{{L}, kind="nar", source="local"}}', "0+6x150"),
         (f'flox_node_cache_lookups_total{{{L}, kind="nar", source="upstream"}}',
          "0+12x150"),
         (f'flox_node_cache_direct_reads_total{{{L}, kind="nar"}}', "0+600x150")],
        [("FloxNodeCacheLowHitRatio", "140m", [])]),
    "node realisation failing for 15m alerts, one failed attempt does not": _case(
        [(f'flox_node_cache_node_realise_failures_total{{{L}, reason="not_substitutable"}}',
          "0+2x60"),
         ('flox_node_cache_node_realise_failures_total{job="flox-node-cache", node="n2", '
          'reason="refused"}', "0 1x60")],
        [("FloxNodeCacheNodeRealiseFailing", "10m", []),
         ("FloxNodeCacheNodeRealiseFailing", "40m",
          [_alert("warning", reason="not_substitutable")])]),
    "disk full for 2m": _case(
        [(f"flox_node_cache_store_disk_full{{{L}}}", "0 0 1x10")],
        [("FloxNodeCacheDiskFull", "3m", []),
         ("FloxNodeCacheDiskFull", "6m", [_alert("critical")])]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_alert_behaviour_with_promtool_test_rules(name: str, tmp_path: Path) -> None:
    # promtool compares annotations too; these cases are about when alerts fire (the live
    # test renders the annotations), so the rules are tested without them.
    groups = rule_groups(PROMETHEUS_RULE)
    for g in groups:
        for rule in g["rules"]:
            rule.pop("annotations", None)
    rules = write_rules_file(groups, tmp_path / "rules.yml")
    case = CASES[name]
    tests = {"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": [case]}
    spec = tmp_path / "test.yml"
    spec.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = promtool("test", "rules", str(spec))
    assert result.returncode == 0, result.stdout + result.stderr

