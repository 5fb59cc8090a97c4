"""Interleaved comparisons: run variants A B A B ... and judge a ratio by its spread.

On a shared machine a single A-then-B measurement mostly measures what the neighbours did in
between. Interleaving puts each A next to a B under the same conditions; the ratio of each such
pair, repeated, gives a median and a spread. A target is "met" only when the whole spread is on
the right side of it, "missed" when the whole spread is on the wrong side, and "inconclusive"
otherwise: the run cannot tell.

The spread judged is a 95 % confidence interval of the median, from the samples' order statistics
alone (the sign test's interval: no assumption about how the noise is distributed): the k-th
smallest and the k-th largest sample, k = 1 up to 8 samples (the range), 2 from 9, 3 from 12.
Below 6 samples even the range bounds the median with less than 95 %; it is judged all the same,
and the JSON gives its confidence. From 9 samples up the interval leaves the extremes out: the
range could only widen with each round added, so a run of many rounds on a noisy machine could
never conclude, however clear its figures; the interval narrows instead.
"""

from __future__ import annotations

import inspect
import math
import statistics
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from loadtest.procstat import StealMeter

Verdict = Literal["met", "missed", "inconclusive"]
CONFIDENCE = 0.95


def median_interval(n: int) -> tuple[int, float]:
    """(k, confidence): among `n` sorted samples, the k-th smallest and k-th largest (1-based)
    bound the median with `confidence`, the largest k reaching CONFIDENCE; (1, what the range
    gives) when none does."""
    def coverage(k: int) -> float:  # 1 - P(the median lies below the k-th or above the k-th last)
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2 ** n
    k = 1
    while k < (n + 1) // 2 and coverage(k + 1) >= CONFIDENCE:
        k += 1
    return k, coverage(k)


@dataclass(frozen=True)
class Spread:
    """The median of some samples, the interval judged (lo to hi: the median's confidence
    interval, `median_interval`) with its confidence, and the range (min to max)."""

    median: float
    lo: float
    hi: float
    n: int
    min: float
    max: float
    confidence: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Spread:
        if not samples:
            raise ValueError("no samples")
        s = sorted(samples)
        k, confidence = median_interval(len(s))
        return cls(statistics.median(s), s[k - 1], s[-k], len(s), s[0], s[-1], confidence)


@dataclass(frozen=True)
class Target:
    """`value` (or the ratio to the baseline when on_ratio) must be <= or >= `bound`."""

    op: Literal["<=", ">="]
    bound: float
    on_ratio: bool = False
    text: str = ""

    def holds(self, x: float) -> bool:
        return x <= self.bound if self.op == "<=" else x >= self.bound

    def verdict(self, s: Spread) -> Verdict:
        lo, hi = self.holds(s.lo), self.holds(s.hi)
        if lo and hi:
            return "met"
        if not lo and not hi:
            return "missed"
        return "inconclusive"


@dataclass
class Sample:
    """One run of one variant: its figure, and the serving process's CPU time if measured."""

    value: float
    cpu_s: float | None = None  # CPU time (user + system) of the server during the run
    requests: int | None = None  # requests the run made, for CPU per request
    details: dict[str, object] = field(default_factory=dict)

    @property
    def cpu_per_request_us(self) -> float | None:
        if self.cpu_s is None or not self.requests:
            return None
        return self.cpu_s / self.requests * 1e6


Variant = Callable[[], Sample | Awaitable[Sample]]


async def interleave(variants: Mapping[str, Variant], repeats: int, warmup: bool = False,
                     steal: list[float] | None = None) -> dict[str, list[Sample]]:
    """Run every variant once per round, in the given order, for `repeats` rounds; with
    `warmup`, after one unmeasured round (which reads each variant's files into the page
    cache, as the later rounds find them). `steal`, when given, gets the share of the machine's
    CPU time its host took during each measured round: which rounds to distrust."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    out: dict[str, list[Sample]] = {name: [] for name in variants}
    for i in range(-1 if warmup else 0, repeats):
        with StealMeter() as meter:
            for name, run in variants.items():
                result = run()
                sample = await result if inspect.isawaitable(result) else result
                if i >= 0:
                    out[name].append(sample)
        if i >= 0 and steal is not None:
            steal.append(round(meter.fraction, 4))
    return out


def pair_ratios(values: Sequence[float], baselines: Sequence[float]) -> list[float]:
    """value/baseline of each round (the two ran next to each other); rounds with a zero
    baseline are left out."""
    if len(values) != len(baselines):
        raise ValueError("ratios need one baseline per sample")
    return [v / b for v, b in zip(values, baselines, strict=True) if b]


def values(samples: Sequence[Sample]) -> list[float]:
    return [s.value for s in samples]


def cpu_per_request_us(samples: Sequence[Sample]) -> list[float] | None:
    """CPU µs per request of each sample, or None unless every sample measured it."""
    out = [s.cpu_per_request_us for s in samples]
    return None if any(x is None for x in out) else out  # type: ignore[return-value]
