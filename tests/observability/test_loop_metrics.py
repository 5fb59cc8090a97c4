"""The lock-free hot-path metrics export exactly what prometheus-client's own would."""

from __future__ import annotations

import threading

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from agent.loop_metrics import LoopCounter, LoopHistogram
from agent.metrics import LATENCY

# On a bound, between bounds, below the first, past the last, zero.
OBSERVED = [0.0005, 0.0005, 0.0007, 0.0001, 301.0, 0.0, 2.5, 1e-9, 60.0]


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in registry.collect() for s in family.samples
            if not s.name.endswith("_created")}


def test_a_loop_histogram_exports_what_a_prometheus_histogram_does() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    mine = LoopHistogram("t_seconds", "help", ["endpoint"], LATENCY, registry=ours)
    reference = Histogram("t_seconds", "help", ["endpoint"], buckets=LATENCY, registry=theirs)
    for value in OBSERVED:
        mine.labels("narinfo").observe(value)
        reference.labels("narinfo").observe(value)
    mine.labels("nar")
    reference.labels("nar")
    assert _samples(ours) == _samples(theirs)
    assert _samples(ours)[("t_seconds_bucket", (("endpoint", "narinfo"), ("le", "0.0005")))] == 5


def test_a_loop_counter_exports_what_a_prometheus_counter_does() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    labelled = LoopCounter("t_total", "help", ["kind", "source"], registry=ours)
    plain = LoopCounter("u_total", "help", registry=ours)
    ref_labelled = Counter("t_total", "help", ["kind", "source"], registry=theirs)
    ref_plain = Counter("u", "help", registry=theirs)
    for counter in (labelled, ref_labelled):
        counter.labels("nar", "local").inc(3)
        counter.labels("nar", "local").inc()
        counter.labels("narinfo", "local")
    assert _samples(ours) == {**_samples(theirs), ("u_total", ()): 0.0}
    plain.inc(2.5)
    ref_plain.inc(2.5)
    assert _samples(ours) == _samples(theirs)
    assert generate_latest(ours).count(b"# TYPE") == 2


def test_labels_must_match_the_names() -> None:
    counter = LoopCounter("t_total", "help", ["kind"], registry=CollectorRegistry())
    with pytest.raises(ValueError, match="expected labels"):
        counter.labels("nar", "local")


def test_a_scrape_from_another_thread_does_not_race_new_series() -> None:
    registry = CollectorRegistry()
    counter = LoopCounter("t_total", "help", ["n"], registry=registry)
    done = threading.Event()

    def add_series() -> None:
        for n in range(20_000):
            counter.labels(str(n)).inc()
        done.set()
    writer = threading.Thread(target=add_series)
    writer.start()
    while not done.is_set():
        generate_latest(registry)  # would raise "dictionary changed size during iteration"
    writer.join()
    assert len(next(iter(registry.collect())).samples) == 20_000
