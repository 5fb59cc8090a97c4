"""The benchmark's judgement: interleaving order, per-round ratios, spreads and verdicts, and the
CPU time read from /proc. Synthetic samples: what is tested is the arithmetic and the logic."""

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from loadtest import procstat
from loadtest.compare import (
    Sample,
    Spread,
    Target,
    cpu_per_request_us,
    interleave,
    median_interval,
    pair_ratios,
)
from loadtest.procstat import CpuMeter, HiccupMeter, StealMeter, cpu_seconds, host_ticks
from loadtest.report import Measurement, fmt_spread, markdown
from loadtest.runner import steal_notes

AT_MOST_1_1 = Target("<=", 1.1, on_ratio=True)
AT_LEAST_0_7 = Target(">=", 0.7, on_ratio=True)


def test_spread_is_median_and_range() -> None:
    assert Spread.of([3.0, 1.0, 2.0, 10.0]) == Spread(2.5, 1.0, 10.0, 4, 1.0, 10.0, 0.875)
    assert Spread.of([5.0]) == Spread(5.0, 5.0, 5.0, 1, 5.0, 5.0, 0.0)
    with pytest.raises(ValueError):
        Spread.of([])


@pytest.mark.parametrize(("n", "k", "confidence"), [
    (3, 1, 0.75), (5, 1, 0.9375), (6, 1, 0.96875), (8, 1, 0.9921875),
    # 1 - 2 * (C(9,0) + C(9,1)) / 2**9: the 2nd smallest and largest of 9 bound the median.
    (9, 2, 1 - 2 * 10 / 512), (11, 2, 1 - 2 * 12 / 2048), (12, 3, 1 - 2 * 79 / 4096),
])
def test_the_median_interval_is_the_widest_reaching_95_percent(
        n: int, k: int, confidence: float) -> None:
    assert median_interval(n) == (k, pytest.approx(confidence))


def test_one_outlier_in_nine_rounds_does_not_decide() -> None:
    # Eight rounds well within 1.1x and one disturbed round: the range straddles the target,
    # the median's 95 % interval does not.
    rounds = [0.95, 0.97, 0.99, 1.0, 1.01, 1.02, 1.03, 1.05, 1.4]
    spread = Spread.of(rounds)
    assert (spread.lo, spread.hi, spread.min, spread.max) == (0.97, 1.05, 0.95, 1.4)
    assert AT_MOST_1_1.verdict(spread) == "met"
    # Two disturbed rounds, one on each side, do not decide either; two on the same side do.
    assert AT_MOST_1_1.verdict(Spread.of([0.5, *rounds[1:-1], 1.4])) == "met"
    assert AT_MOST_1_1.verdict(Spread.of([*rounds[:-2], 1.3, 1.4])) == "inconclusive"
    assert fmt_spread(spread, "x") == "1.01x [0.97-1.05; range 0.95-1.40]"


@pytest.mark.parametrize(("target", "samples", "verdict"), [
    (AT_MOST_1_1, [0.9, 1.0, 1.05], "met"),
    (AT_MOST_1_1, [1.2, 1.3, 1.15], "missed"),
    # The median (1.05) meets the target but one round does not: the run cannot tell.
    (AT_MOST_1_1, [0.9, 1.05, 1.2], "inconclusive"),
    (AT_MOST_1_1, [1.1, 1.1, 1.1], "met"),  # the bound itself meets "<="
    (AT_LEAST_0_7, [0.75, 0.8, 0.9], "met"),
    (AT_LEAST_0_7, [0.2, 0.3, 0.25], "missed"),
    (AT_LEAST_0_7, [0.65, 0.8, 0.9], "inconclusive"),
    (AT_LEAST_0_7, [0.6], "missed"),  # one sample: no spread, a plain verdict
])
def test_verdict_is_met_only_when_the_whole_spread_meets_the_target(
        target: Target, samples: list[float], verdict: str) -> None:
    assert target.verdict(Spread.of(samples)) == verdict


def test_interleave_runs_the_variants_in_rounds() -> None:
    calls: list[str] = []

    def sync(name: str, value: float):
        def run() -> Sample:
            calls.append(name)
            return Sample(value + len(calls))
        return run

    async def later() -> Sample:
        calls.append("C")
        await asyncio.sleep(0)
        return Sample(0.5)

    res = asyncio.run(interleave({"A": sync("A", 0), "B": sync("B", 100), "C": later}, 3))
    assert calls == ["A", "B", "C"] * 3
    assert [s.value for s in res["A"]] == [1, 4, 7]
    assert [s.value for s in res["B"]] == [102, 105, 108]
    assert [s.value for s in res["C"]] == [0.5] * 3
    with pytest.raises(ValueError):
        asyncio.run(interleave({"A": sync("A", 0)}, 0))
    # A warm-up round runs every variant once more, first, and is not counted.
    calls.clear()
    res = asyncio.run(interleave({"A": sync("A", 0), "B": sync("B", 100)}, 2, warmup=True))
    assert calls == ["A", "B"] * 3
    assert [s.value for s in res["A"]] == [3, 5]
    assert [s.value for s in res["B"]] == [104, 106]


def test_interleave_gives_the_host_steal_of_each_measured_round(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each round's share of the machine's CPU time the host took, from /proc/stat's ticks
    (faked here: a variant of the second measured round is descheduled)."""
    ticks = [0, 0]  # steal, total
    monkeypatch.setattr(procstat, "host_ticks", lambda: (ticks[0], ticks[1]))
    rounds = iter(range(100))

    def run() -> Sample:
        stolen = 30 if next(rounds) == 4 else 0  # warm-up A B, A B, then A (stolen) B, A B
        ticks[0] += stolen
        ticks[1] += 100
        return Sample(1.0)

    steal: list[float] = []
    asyncio.run(interleave({"A": run, "B": run}, 3, warmup=True, steal=steal))
    assert steal == [0.0, 0.15, 0.0]


def test_ratios_pair_each_sample_with_the_baseline_of_its_round() -> None:
    # The machine slowed down in round 2 for both: per-round ratios stay at 2.
    assert pair_ratios([2, 20, 4], [1, 10, 2]) == [2, 2, 2]
    assert pair_ratios([1, 2], [0, 1]) == [2]  # a zero baseline says nothing
    with pytest.raises(ValueError):
        pair_ratios([1, 2], [1])


def test_measurement_judges_the_per_round_ratio() -> None:
    # Ratio of medians would be 20/10 = 2.0; the rounds say 2.0 every time: met at <= 2.
    m = Measurement("s", "n", [2, 20, 40], "s", baseline_samples=[1, 10, 20],
                    target=Target("<=", 2.0, on_ratio=True))
    assert m.ratio == Spread(2.0, 2.0, 2.0, 3, 2.0, 2.0, 0.75) and m.verdict == "met"
    noisy = Measurement("s", "n", [1.0, 1.3, 0.9], "s", baseline_samples=[1.0, 1.0, 1.0],
                        target=AT_MOST_1_1)
    assert noisy.value.median == 1.0 and noisy.verdict == "inconclusive"
    absolute = Measurement("s", "p99", [1.5, 1.9, 1.7], "ms", target=Target("<=", 2.0))
    assert absolute.ratio is None and absolute.verdict == "met"
    assert Measurement("s", "n", [1.0], "s").verdict is None
    d = noisy.to_json()
    assert d["verdict"] == "inconclusive" and d["ratio"]["hi"] == pytest.approx(1.3)
    assert d["samples"] == [1.0, 1.3, 0.9]


def test_report_shows_median_and_range() -> None:
    assert fmt_spread(Spread.of([1.0, 2.0, 3.0]), "x") == "2.00x [1.00-3.00]"
    assert fmt_spread(Spread.of([4.0])) == "4.00"
    md = markdown([Measurement("warm start", "ml", [1.0, 1.2, 1.1], "s",
                               baseline_samples=[1.0, 1.0, 1.0], target=AT_MOST_1_1,
                               baseline_name="file://")])
    header, rule, row = md.strip().splitlines()
    assert "verdict" in header and rule.count("---") == header.count("|") - 1
    assert "1.10x [1.00-1.20]" in row and row.rstrip(" |").endswith("inconclusive")


def test_cpu_per_request_needs_every_sample() -> None:
    assert cpu_per_request_us([Sample(1, 0.002, 1000), Sample(1, 0.004, 1000)]) == [2.0, 4.0]
    assert cpu_per_request_us([Sample(1, 0.002, 1000), Sample(1)]) is None


def _child(code: str) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline() == "ready\n"
    return p


BURN = """
import sys, time
print("ready", flush=True)
sys.stdin.readline()
t = time.process_time()
while time.process_time() - t < 0.3:
    pass
print("done", flush=True)
sys.stdin.readline()
"""


def test_cpu_meter_charges_the_process_its_own_cpu_time() -> None:
    busy, idle = _child(BURN), _child(BURN)
    try:
        with CpuMeter(lambda: [busy.pid, idle.pid]) as both, CpuMeter(lambda: [idle.pid]) as one:
            busy.stdin.write("go\n")
            busy.stdin.flush()
            assert busy.stdout.readline() == "done\n"
        # /proc counts in clock ticks (usually 10 ms).
        assert 0.25 <= both.seconds < 1.0
        assert one.seconds < 0.05
        assert cpu_seconds(busy.pid) >= 0.25
    finally:
        for p in (busy, idle):
            p.kill()
            p.wait()
    assert cpu_seconds(busy.pid) == 0.0  # gone: nothing to read


def test_steal_is_a_share_of_the_machine_s_cpu_time() -> None:
    steal, total = host_ticks()
    assert 0 <= steal <= total and total > 0
    with StealMeter() as meter:
        time.sleep(0.2)  # clock ticks advance on every CPU, idle or not
    assert 0.0 <= meter.fraction <= 1.0
    assert host_ticks()[1] > total


def test_the_hiccup_meter_sees_a_process_the_machine_did_not_run() -> None:
    """A probe stopped for 100 ms (as a descheduled VM would leave it) wakes that much late."""
    with HiccupMeter() as meter:
        time.sleep(0.1)
        os.kill(meter.pid, signal.SIGSTOP)
        time.sleep(0.1)
        os.kill(meter.pid, signal.SIGCONT)
        time.sleep(0.1)
    assert len(meter.late_ms) > 20  # one value per 1 ms sleep
    assert max(meter.late_ms) >= 80
    assert sorted(meter.late_ms)[len(meter.late_ms) // 2] < 50  # the others were not stopped


def teststeal_notes_name_the_disturbed_rounds() -> None:
    assert steal_notes("narinfo (zstd)", 0.01, {"tcp": [0.0, 0.01], "unix": [0.02, 0.0]}) == []
    notes = steal_notes("narinfo (zstd)", 0.05, {"tcp": [0.0, 0.12], "unix": [0.04, 0.0]})
    assert notes[0].startswith("narinfo (zstd): the host took 5% of this machine's CPU time")
    assert notes[1] == ("narinfo (zstd): host steal above 3% in 2 of 4 rounds: tcp round 2 "
                        "(12.0%), unix round 1 (4.0%)")
    assert steal_notes("warm start (none)", 0.0, {"": [0.0, 0.0, 0.2]}) == [
        "warm start (none): host steal above 3% in 1 of 3 rounds: round 3 (20.0%)"]
