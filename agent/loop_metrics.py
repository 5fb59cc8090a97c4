"""Counters and histograms for the metrics every cache hit updates, without a lock.

A prometheus-client child takes a lock per update (about 1 us per inc, 2 per observe: a tenth
of a narinfo hit's Python). These are updated only by the event loop's thread, and exported
with the same names, labels and buckets by a collector at scrape time (app.py scrapes in the
event loop too).
"""

import threading
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from itertools import accumulate
from typing import Generic, TypeVar

from prometheus_client import REGISTRY
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString


class _Count:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _Distribution:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, the last one +Inf; not cumulative
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bucket with value <= le
        self.sum += value


C = TypeVar("C", _Count, _Distribution)


class _LoopMetric(Collector, Generic[C]):
    """A labelled metric updated without a lock, by the event loop's thread only. Only a new
    series takes one (rare), so that a scrape from another thread, as tests do, copies the
    series without racing their creation."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 new_child: Callable[[], C], registry: CollectorRegistry) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self._new_child = new_child
        self._children: dict[tuple[str, ...], C] = {}
        self._lock = threading.Lock()
        if not self.labelnames:
            self.labels()  # exported at zero from the start, as prometheus-client's are
        registry.register(self)

    def labels(self, *values: str) -> C:
        """The child for these label values: a dict lookup, cheap enough per request."""
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
        child = self._children.get(values)
        if child is None:
            with self._lock:
                child = self._children.setdefault(values, self._new_child())
        return child

    def children(self) -> list[tuple[tuple[str, ...], C]]:
        with self._lock:
            return list(self._children.items())


class LoopCounter(_LoopMetric[_Count]):
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 registry: CollectorRegistry = REGISTRY) -> None:
        super().__init__(name, documentation, labelnames, _Count, registry)

    def inc(self, amount: float = 1.0) -> None:
        """inc() of a counter without labels."""
        self.labels().inc(amount)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in self.children():
            family.add_metric(values, child.value)
        yield family


class LoopHistogram(_LoopMetric[_Distribution]):
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 buckets: Sequence[float], registry: CollectorRegistry = REGISTRY) -> None:
        bounds = tuple(sorted(buckets))
        super().__init__(name, documentation, labelnames, lambda: _Distribution(bounds),
                         registry)
        self.les = [floatToGoString(b) for b in (*bounds, float("inf"))]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in self.children():
            cumulative = list(accumulate(child.counts))
            family.add_metric(values, list(zip(self.les, cumulative, strict=True)), child.sum)
        yield family
