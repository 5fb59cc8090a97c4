"""API calls under one deadline, for commands: each call's timeout is what is left of it,
transient errors (429 with Retry-After, 5xx, resets, timeouts) are retried with backoff until
it passes, and every other error becomes a one-line `ClusterError` with an exit code."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
from kubernetes_asyncio.client.exceptions import ApiException

from agent import exits
from agent.kube.watch import Backoff, retry_after

T = TypeVar("T")
# Matches the README's exit codes (the CLI's shared table): cannot talk to the cluster, or
# not allowed to.
EXIT_CLUSTER, EXIT_USAGE = exits.CLUSTER_ERROR, exits.USAGE
PER_CALL = 30.0  # no single request waits longer than this, deadline permitting
TRANSIENT = {429, 500, 502, 503, 504}


class ClusterError(Exception):
    def __init__(self, message: str, code: int = EXIT_CLUSTER, status: int = 0) -> None:
        super().__init__(message)
        self.code, self.status = code, status  # exit code; HTTP status if the server answered


class DeadlineExceeded(ClusterError):
    """The deadline passed while the cluster could not be reached (last error in the text)."""


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.end - time.monotonic()

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kw: Any) -> T:
        backoff, last = Backoff(0.2, 5.0), "timed out"
        while (remaining := self.remaining()) > 0:
            try:
                return await fn(*args, **kw, _request_timeout=min(remaining, PER_CALL))
            except ApiException as e:
                if e.status not in TRANSIENT:
                    raise ClusterError(describe(e), _code(e.status), e.status) from None
                last = describe(e)
                wait = retry_after((e.headers or {}).get("Retry-After"))
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                last, wait = str(e) or type(e).__name__, 0.0
            await asyncio.sleep(min(max(wait, backoff.next_delay()), max(self.remaining(), 0)))
        raise DeadlineExceeded(f"cannot reach the cluster within the timeout: {last}")


def describe(e: ApiException) -> str:
    """The API server's own message (a Status), else the HTTP status line."""
    try:
        message = json.loads(e.body or "")["message"]
    except (ValueError, KeyError, TypeError):
        message = f"{e.status} {e.reason}"
    if e.status in (401, 403):
        return f"not allowed: {message}"
    return f"the API server refused the request ({e.status}): {message}"


def _code(status: int) -> int:
    return EXIT_USAGE if status in (400, 422) else EXIT_CLUSTER
