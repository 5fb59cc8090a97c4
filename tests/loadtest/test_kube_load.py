"""Smoke test of the Kubernetes API load benchmark: a real run with three agents. It checks
the counts are sane, never a target (numbers on a shared machine are not a test result)."""

from loadtest.kube_load import measure


async def test_three_agents_report_requests_and_events_per_node() -> None:
    r = await measure(3, steps=2, step=0.2)
    assert r["nodes"] == 3
    assert r["requests_per_node"] >= 2  # at least Pending and Ready
    # every agent sees the prewarm created and at least one aggregated status
    assert r["watch_events_per_node"] >= 2
