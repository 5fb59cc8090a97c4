"""Measurements, their baselines and targets: a rich table on stdout and a JSON file."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from rich.console import Console
from rich.table import Table

from loadtest.compare import Spread, Target, Verdict, pair_ratios

Better = Literal["higher", "lower"]


@dataclass
class Measurement:
    """A figure measured `len(samples)` times, optionally against a baseline measured in the
    same rounds (interleaved: samples[i] ran next to baseline_samples[i])."""

    scenario: str
    name: str
    samples: list[float]
    unit: str
    better: Better = "higher"
    transport: str | None = None  # tcp | unix | None (not a socket measurement)
    recompress: str | None = None  # the agent's --recompress
    baseline_name: str | None = None
    baseline_samples: list[float] | None = None
    target: Target | None = None
    details: dict[str, object] = field(default_factory=dict)

    @property
    def value(self) -> Spread:
        return Spread.of(self.samples)

    @property
    def baseline(self) -> Spread | None:
        return Spread.of(self.baseline_samples) if self.baseline_samples else None

    @property
    def ratio(self) -> Spread | None:
        """The ratio to the baseline, round by round."""
        if not self.baseline_samples:
            return None
        ratios = pair_ratios(self.samples, self.baseline_samples)
        return Spread.of(ratios) if ratios else None

    @property
    def verdict(self) -> Verdict | None:
        if self.target is None:
            return None
        judged = self.ratio if self.target.on_ratio else self.value
        return self.target.verdict(judged) if judged else None

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d["value"] = asdict(self.value)
        d["baseline"] = asdict(self.baseline) if self.baseline else None
        d["ratio"] = asdict(self.ratio) if self.ratio else None
        d["verdict"] = self.verdict
        return d


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean in the samples' unit (0 for no samples)."""
    if not samples:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0, "mean": 0.0, "count": 0}
    s = sorted(samples)

    def pct(q: float) -> float:
        return s[min(len(s) - 1, int(q * len(s)))]

    return {"p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99), "max": s[-1],
            "mean": statistics.fmean(s), "count": len(s)}


def machine() -> dict[str, object]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "memory_bytes": mem_kib * 1024, "cpu_model": model,
            "kernel": platform.release(), "python": platform.python_version()}


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def fmt_spread(s: Spread | None, suffix: str = "") -> str:
    """`median [lo-hi]` (the interval judged), `median [lo-hi; range min-max]` when that is
    narrower than the range, or the one value of a single sample."""
    if s is None:
        return "-"
    if s.n == 1 or s.min == s.max:
        return f"{_fmt(s.median)}{suffix}"
    judged = f"{_fmt(s.lo)}-{_fmt(s.hi)}"
    if (s.lo, s.hi) != (s.min, s.max):
        judged += f"; range {_fmt(s.min)}-{_fmt(s.max)}"
    return f"{_fmt(s.median)}{suffix} [{judged}]"


COLUMNS = ("scenario", "measurement", "via", "recompress", "value [spread]", "unit", "baseline",
           "baseline value", "ratio [spread]", "target", "verdict")


def rows(measurements: list[Measurement]) -> list[tuple[str, ...]]:
    return [(m.scenario, m.name, m.transport or "", m.recompress or "", fmt_spread(m.value),
             m.unit, m.baseline_name or "", fmt_spread(m.baseline), fmt_spread(m.ratio, "x"),
             m.target.text if m.target else "", m.verdict or "") for m in measurements]


def table(measurements: list[Measurement]) -> Table:
    t = Table(title="flox-node-cache loadtest", show_lines=False)
    for col in COLUMNS:
        t.add_column(col, overflow="fold")
    style = {"met": "[green]met[/]", "missed": "[red]MISSED[/]",
             "inconclusive": "[yellow]inconclusive[/]", "": ""}
    for row in rows(measurements):
        t.add_row(*row[:-1], style[row[-1]])
    return t


def markdown(measurements: list[Measurement]) -> str:
    """The same table as Markdown, for loadtest/README.md."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |"
              for row in rows(measurements)]
    return "\n".join(lines) + "\n"


def print_table(measurements: list[Measurement], console: Console | None = None) -> None:
    (console or Console(width=200)).print(table(measurements))


def write_json(path: Path, measurements: list[Measurement], meta: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": machine(), **meta,
           "measurements": [m.to_json() for m in measurements]}
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
