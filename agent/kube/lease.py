"""Leader election with a coordination.k8s.io Lease: one agent at a time runs `lead()`.

The holder renews every `renew` seconds; a lease not renewed for `duration` seconds is taken
over. Writes are replaces with the read resourceVersion, so two agents racing for an expired
lease cannot both win (the loser gets 409). Losing the lease cancels `lead()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
from kubernetes_asyncio.client import ApiClient, CoordinationV1Api
from kubernetes_asyncio.client.exceptions import ApiException

log = logging.getLogger(__name__)
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
DEFAULT_NAMESPACE = "flox-node-cache"


def own_namespace() -> str:
    """The pod's namespace (service account mount), else the manifests' namespace."""
    try:
        return NAMESPACE_FILE.read_text().strip() or DEFAULT_NAMESPACE
    except OSError:
        return DEFAULT_NAMESPACE


def _micro(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Lease:
    def __init__(self, api: ApiClient, *, name: str, identity: str, namespace: str,
                 duration: float = 15.0, renew: float = 5.0, timeout: float = 10.0) -> None:
        self.api, self.name, self.identity, self.namespace = api, name, identity, namespace
        self.duration, self.renew, self.timeout = duration, renew, timeout
        self.coordination = CoordinationV1Api(api)

    async def run(self, lead: Callable[[], Coroutine[Any, Any, None]]) -> NoReturn:
        task: asyncio.Task[None] | None = None
        try:
            while True:
                held = await self._hold()
                if task is not None and task.done():  # lead() failed: log, start it again
                    if not task.cancelled() and task.exception():
                        log.error("%s failed", self.name, exc_info=task.exception())
                    task = None
                if held and task is None:
                    log.info("holding lease %s: aggregating prewarm status", self.name)
                    task = asyncio.get_running_loop().create_task(lead())
                elif not held and task is not None:
                    log.info("lost lease %s", self.name)
                    task.cancel()
                    task = None
                await asyncio.sleep(self.renew)
        finally:
            if task:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _hold(self) -> bool:
        """Acquire or renew; False when another holder's lease is live (or on any error)."""
        try:
            return await self._acquire_or_renew()
        except ApiException as e:
            if e.status != 409:  # 409: someone else won the race
                log.warning("lease %s: %s %s", self.name, e.status, e.reason)
        except (aiohttp.ClientError, TimeoutError) as e:
            log.warning("lease %s: %s", self.name, str(e) or type(e).__name__)
        except Exception:  # a malformed Lease must not stop the agent's watchers
            log.exception("lease %s", self.name)
        return False

    async def _acquire_or_renew(self) -> bool:
        now = datetime.now(UTC)
        spec = {"holderIdentity": self.identity, "leaseDurationSeconds": int(self.duration),
                "renewTime": _micro(now)}
        try:
            lease = await self.coordination.read_namespaced_lease(
                self.name, self.namespace, _request_timeout=self.timeout)
        except ApiException as e:
            if e.status != 404:
                raise
            await self.coordination.create_namespaced_lease(self.namespace, {
                "metadata": {"name": self.name}, "spec": {**spec, "acquireTime": _micro(now),
                                                          "leaseTransitions": 0}},
                _request_timeout=self.timeout)
            return True
        held = lease.spec.holder_identity
        renewed = lease.spec.renew_time
        live = renewed is not None and (now - renewed).total_seconds() < (
            lease.spec.lease_duration_seconds or self.duration)
        if held not in (None, "", self.identity) and live:
            return False
        transitions = lease.spec.lease_transitions or 0
        if held != self.identity:
            spec.update(acquireTime=_micro(now), leaseTransitions=transitions + 1)
        else:
            spec.update(acquireTime=_micro(lease.spec.acquire_time or now),
                        leaseTransitions=transitions)
        await self.coordination.replace_namespaced_lease(self.name, self.namespace, {
            "metadata": {"name": self.name, "resourceVersion": lease.metadata.resource_version},
            "spec": spec}, _request_timeout=self.timeout)
        return True
