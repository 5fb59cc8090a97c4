"""Per-watcher health: when each watcher last listed and watched successfully, and how many
times in a row it has failed. Shown in /readyz, `status` and a gauge."""

from __future__ import annotations

import time
from dataclasses import dataclass

from agent.metrics import KUBE_WATCH_FAILURES, KUBE_WATCH_LAST_SUCCESS

FAILING_AFTER = 3  # consecutive failures before a watcher counts as failing

_watchers: dict[tuple[str, str], WatcherHealth] = {}  # (node, resource) -> health


@dataclass
class WatcherHealth:
    resource: str
    last_list: float | None = None
    last_watch: float | None = None
    consecutive_failures: int = 0
    last_error: str = ""

    def listed(self) -> None:
        self.last_list = time.time()
        self._ok()

    def watched(self) -> None:
        self.last_watch = time.time()
        self._ok()

    def failed(self, error: str) -> None:
        self.consecutive_failures += 1
        self.last_error = error[:300]
        KUBE_WATCH_FAILURES.labels(resource=self.resource).set(self.consecutive_failures)

    def _ok(self) -> None:
        self.consecutive_failures = 0
        KUBE_WATCH_FAILURES.labels(resource=self.resource).set(0)
        KUBE_WATCH_LAST_SUCCESS.labels(resource=self.resource).set(time.time())

    def to_json(self) -> dict[str, object]:
        return {"last_list": self.last_list, "last_watch": self.last_watch,
                "consecutive_failures": self.consecutive_failures,
                "last_error": self.last_error}


def register(node: str, resource: str) -> WatcherHealth:
    """A fresh health record for one watcher of the agent on `node`."""
    h = _watchers[(node, resource)] = WatcherHealth(resource)
    KUBE_WATCH_FAILURES.labels(resource=resource).set(0)
    return h


def forget(node: str, resource: str) -> None:
    _watchers.pop((node, resource), None)


def unregister(node: str) -> None:
    for key in [k for k in _watchers if k[0] == node]:
        del _watchers[key]


def snapshot() -> dict[str, dict[str, dict[str, object]]]:
    """{node: {resource: health}} of the running watchers (one node outside of tests)."""
    out: dict[str, dict[str, dict[str, object]]] = {}
    for (node, resource), h in sorted(_watchers.items()):
        out.setdefault(node, {})[resource] = h.to_json()
    return out


def healthy() -> bool:
    """False while some watcher has failed FAILING_AFTER times in a row."""
    return all(h.consecutive_failures < FAILING_AFTER for h in _watchers.values())


def status() -> dict[str, object]:
    """What /readyz and `status` show: {"healthy": bool, "watchers": snapshot()}."""
    return {"healthy": healthy(), "watchers": snapshot()}
