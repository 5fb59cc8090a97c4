"""The soak test at a small size in the suite: 100 clients for 8 seconds, all checks passing."""

import json
import subprocess
import sys
from pathlib import Path

from tests.support.nixenv import missing_tools

REPO = Path(__file__).resolve().parents[2]


def test_soak_help() -> None:
    out = subprocess.run([sys.executable, "-m", "loadtest.soak", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=30, check=True).stdout
    assert "--clients" in out and "--max-rss-mb" in out


def test_short_soak_passes_its_checks(nix_available: None, tmp_path: Path) -> None:
    assert not missing_tools()
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.soak", "--clients", "100", "--seconds", "8",
         "--paths", "12", "--workdir", str(tmp_path), "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=180, check=False)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0, (report, proc.stderr[-2000:])
    assert all(report["checks"].values()), report
    # It really ran: hits, misses and 404s, over both listeners' worth of clients.
    assert report["requests"] > 1000 and report["not_found"] > 0
    assert report["upstream_nar_requests"] == report["paths"] == 12
    assert report["errors"] == 0 and report["p99_ms"] > 0
