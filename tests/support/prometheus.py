"""A real Prometheus (Debian `prometheus`) scraping the agent, for dashboard and alert tests.

    with PrometheusServer(tmp_path / "prom", agent.metrics_url, rules=rule_groups) as prom:
        prom.wait_for_scrape()
        prom.query('sum(up{job="flox-node-cache"})')

The scrape job mirrors the monitoring overlay's ServiceMonitor: job="flox-node-cache" and a
`node` label (the ServiceMonitor relabels the pod's node name into it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.support.agent import free_port
from tests.support.process import stop_process

JOB = "flox-node-cache"
NODE = "test-node"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def rule_groups(prometheus_rule: Path) -> list[dict[str, Any]]:
    """The `spec.groups` of a PrometheusRule manifest: exactly what a rules file holds."""
    doc = yaml.safe_load(Path(prometheus_rule).read_text())
    if doc.get("kind") != "PrometheusRule":
        raise ValueError(f"{prometheus_rule} is a {doc.get('kind')}, not a PrometheusRule")
    return doc["spec"]["groups"]


def write_rules_file(groups: list[dict[str, Any]], path: Path) -> Path:
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def scrape_config(target: str, rules_file: Path | None) -> dict[str, Any]:
    """Prometheus configuration: one 1 s scrape job for `target` (host:port)."""
    config: dict[str, Any] = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{
            "job_name": JOB,
            "static_configs": [{"targets": [target], "labels": {"node": NODE}}],
        }],
    }
    if rules_file is not None:
        config["rule_files"] = [str(rules_file)]
    return config


class PrometheusError(RuntimeError):
    pass


class PrometheusServer:
    """`prometheus` on a free loopback port, with its TSDB and config in `workdir`."""

    def __init__(self, workdir: Path, metrics_url: str,
                 rules: list[dict[str, Any]] | None = None) -> None:
        self.workdir = Path(workdir)
        self.target = urllib.parse.urlsplit(metrics_url).netloc
        self.rules = rules
        self.port = free_port()
        self.log_path = self.workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        rules_file = None
        if self.rules is not None:
            rules_file = write_rules_file(self.rules, self.workdir / "rules.yml")
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(scrape_config(self.target, rules_file)))
        return config

    def start(self, timeout: float = 5) -> PrometheusServer:
        config = self._write_config()
        args = [
            PROMETHEUS, f"--config.file={config}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--web.enable-lifecycle",
            # No lookback surprises: a stopped target's series go stale within seconds.
            "--query.lookback-delta=30s",
        ]
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=log)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise PrometheusError(f"prometheus exited {self.proc.returncode}:\n{self.logs()}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise PrometheusError(f"prometheus not ready after {timeout}s:\n{self.logs()}")

    def stop(self) -> None:
        stop_process(self.proc)

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # --- HTTP API ---------------------------------------------------------------------------

    def api(self, path: str, **params: str) -> dict[str, Any]:
        """GET /api/v1/<path>; the decoded JSON envelope, whatever its status (400s included)."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:  # bad queries answer 400/422 with a JSON error
            body = e.read()
            try:
                return json.loads(body)
            except ValueError:
                raise PrometheusError(f"{url}: HTTP {e.code}: {body[:200]!r}") from None

    def query(self, expr: str) -> dict[str, Any]:
        """An instant query: {"status": "success"|"error", "data": {...}, "error": ...}."""
        return self.api("query", query=expr)

    def series(self, expr: str) -> list[dict[str, Any]]:
        """The result vector of a query that must succeed."""
        answer = self.query(expr)
        if answer["status"] != "success":
            raise PrometheusError(f"{expr}: {answer.get('error')}")
        return answer["data"]["result"]

    def value(self, expr: str) -> float | None:
        """The single value of a query (None when it returns nothing)."""
        result = self.series(expr)
        return float(result[0]["value"][1]) if result else None

    def targets(self) -> list[dict[str, Any]]:
        return self.api("targets")["data"]["activeTargets"]

    def alerts(self) -> list[dict[str, Any]]:
        return self.api("alerts")["data"]["alerts"]

    def wait_for_scrape(self, timeout: float = 10) -> None:
        """Wait for a successful scrape that started after this call."""
        since = time.time()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t in self.targets():
                if t["health"] == "up" and _rfc3339(t["lastScrape"]) > since:
                    return
            time.sleep(0.2)
        raise PrometheusError(f"no successful scrape within {timeout}s: {self.targets()}")

    def wait_for_rules(self, timeout: float = 10) -> None:
        """Wait until every rule group has been evaluated at least once after this call."""
        since = time.time()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            groups = self.api("rules")["data"]["groups"]
            if all(_rfc3339(g["lastEvaluation"]) > since for g in groups):
                return
            time.sleep(0.2)
        raise PrometheusError(f"rules not evaluated within {timeout}s")


def _rfc3339(stamp: str) -> float:
    """Seconds since the epoch of Prometheus's RFC 3339 timestamps (nanoseconds, Z or offset)."""
    from datetime import datetime

    if stamp.startswith("0001-"):  # never
        return 0.0
    head, _, frac = stamp.partition(".")
    if frac:  # Python parses at most microseconds: trim the fraction, keep the zone
        digits = "".join(c for c in frac if c.isdigit())
        zone = frac[len(digits):]
        stamp = f"{head}.{digits[:6]}{zone}"
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
