"""What a serving process costs, read from /proc: CPU time (steady on a shared machine, unlike
wall-clock rates) and resident memory."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of `pid` so far (0 once it has gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # Fields after the command name, which may contain spaces and parentheses: state is
    # field 3, utime and stime are fields 14 and 15.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def children(pid: int) -> list[int]:
    """The direct children of `pid` (e.g. nginx's workers)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


class CpuMeter:
    """CPU seconds that the processes `pids()` names spent inside the `with` block."""

    def __init__(self, pids: Callable[[], Iterable[int]]) -> None:
        self.pids = pids
        self.seconds = 0.0
        self._start: dict[int, float] = {}

    def __enter__(self) -> CpuMeter:
        self._start = {p: cpu_seconds(p) for p in self.pids()}
        return self

    def __exit__(self, *exc: object) -> None:
        # Only the processes seen at the start: one that exits in between reads as 0.
        self.seconds = sum(max(0.0, cpu_seconds(p) - t) for p, t in self._start.items())


def host_ticks() -> tuple[int, int]:
    """(steal, total) clock ticks of every CPU since boot, from /proc/stat's first line: user,
    nice, system, idle, iowait, irq, softirq, steal (guest time is counted in user)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return fields[7], sum(fields)


class StealMeter:
    """The share of this machine's CPU time its host (hypervisor) took for others inside the
    `with` block: rounds measured while it was high compare the neighbours, not the servers."""

    def __init__(self) -> None:
        self.fraction = 0.0
        self._start = (0, 0)

    def __enter__(self) -> StealMeter:
        self._start = host_ticks()
        return self

    def __exit__(self, *exc: object) -> None:
        steal, total = (now - then for now, then in zip(host_ticks(), self._start, strict=True))
        self.fraction = steal / total if total else 0.0


# Says it is ready, sleeps 1 ms at a time until its stdin closes, then prints how late each
# wake-up was (ms).
_HICCUP_PROBE = """
import json, select, sys, time
late = []
print("ready", flush=True)
while True:
    t = time.perf_counter()
    if select.select([sys.stdin], [], [], 0.001)[0]:
        break
    late.append((time.perf_counter() - t - 0.001) * 1000)
print(json.dumps(late))
"""


class HiccupMeter:
    """How late this machine wakes a process that sleeps 1 ms, inside the `with` block (the idea
    of jHiccup): latency no server can beat here. A process of its own, so that neither the load
    generator's work nor its GIL is in it. `late_ms`: one value per wake-up."""

    def __init__(self) -> None:
        self.late_ms: list[float] = []
        self._probe: subprocess.Popen[str] | None = None

    def __enter__(self) -> HiccupMeter:
        self._probe = subprocess.Popen([sys.executable, "-c", _HICCUP_PROBE], text=True,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self._probe.stdout is not None
        self._probe.stdout.readline()  # sleeping from here on: the block is measured whole
        return self

    @property
    def pid(self) -> int:
        """The probe's process (a test stops it to stand for a stalled machine)."""
        assert self._probe is not None
        return self._probe.pid

    def __exit__(self, *exc: object) -> None:
        assert self._probe is not None
        out, _ = self._probe.communicate(timeout=30)
        if self._probe.returncode != 0:  # no figure rather than a lateness of zero
            raise RuntimeError(f"the hiccup probe exited {self._probe.returncode}")
        self.late_ms = json.loads(out)


class RssSampler:
    """Samples VmRSS of a process every `every` seconds in a thread; keeps the maximum."""

    def __init__(self, pid: int, every: float = 0.05) -> None:
        self.pid, self.every = pid, every
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _field(self, name: str) -> int:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith(name + ":"):
                    return int(line.split()[1])
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, self._field("VmRSS"))
            self._stop.wait(self.every)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def hwm_kib(self) -> int:
        return self._field("VmHWM")
