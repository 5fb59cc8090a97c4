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

Better = Literal["higher", "lower"]


@dataclass
class Target:
    """`value` (or `ratio` against the baseline when on_ratio) must be <= or >= `bound`."""

    op: Literal["<=", ">="]
    bound: float
    on_ratio: bool = False
    text: str = ""

    def met(self, value: float, ratio: float | None) -> bool | None:
        x = ratio if self.on_ratio else value
        if x is None:
            return None
        return x <= self.bound if self.op == "<=" else x >= self.bound


@dataclass
class Measurement:
    scenario: str
    name: str
    value: float
    unit: str
    better: Better = "higher"
    transport: str | None = None  # tcp | unix | None (not a socket measurement)
    recompress: str | None = None  # the agent's --recompress, None for baselines
    baseline_name: str | None = None
    baseline_value: float | None = None
    target: Target | None = None
    details: dict[str, object] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.baseline_value in (None, 0):
            return None
        return self.value / self.baseline_value  # type: ignore[operator]

    @property
    def met(self) -> bool | None:
        return self.target.met(self.value, self.ratio) if self.target else None

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d["ratio"] = self.ratio
        d["met"] = self.met
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


def table(measurements: list[Measurement]) -> Table:
    t = Table(title="flox-node-cache loadtest", show_lines=False)
    for col in ("scenario", "measurement", "via", "recompress", "value", "unit", "baseline",
                "baseline value", "ratio", "target", "met"):
        t.add_column(col, overflow="fold")
    for m in measurements:
        met = {True: "[green]yes[/]", False: "[red]NO[/]", None: ""}[m.met]
        t.add_row(m.scenario, m.name, m.transport or "", m.recompress or "", _fmt(m.value),
                  m.unit, m.baseline_name or "", _fmt(m.baseline_value), _fmt(m.ratio),
                  m.target.text if m.target else "", met)
    return t


def print_table(measurements: list[Measurement], console: Console | None = None) -> None:
    (console or Console(width=200)).print(table(measurements))


def write_json(path: Path, measurements: list[Measurement], meta: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": machine(), **meta,
           "measurements": [m.to_json() for m in measurements]}
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
