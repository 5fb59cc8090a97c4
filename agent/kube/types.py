"""The contract between the Kubernetes code and the prefetcher (implemented in agent.prefetch)."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    paths_done: int
    paths_total: int
    bytes_done: int
    bytes_total: int


class Job(Protocol):
    id: str
    ref: str  # "owner/env" or "owner/env:N"
    state: str  # "pending" | "running" | "succeeded" | "failed"
    error: str | None
    progress: Progress

    async def wait(self) -> None:
        """Return when the state is succeeded or failed."""


class Prewarmer(Protocol):
    async def prewarm(self, ref: str, *, pin: str | None = None,
                      system: str | None = None) -> Job:
        """Start (or join an identical running) prefetch of the env's closure.

        `pin` names a holder that keeps the closure from eviction until `unpin(holder)`.
        """

    def unpin(self, holder: str) -> None: ...
