"""The peer tier of one agent, built from its configuration: membership (static and
discovered), the PeerSource the read-through path asks, and the shared token."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import Config
from agent.peers.membership import Membership, peer_url, watch_endpoint_slices
from agent.peers.protocol import PeerToken
from agent.peers.source import PeerSource
from agent.upstream.client import Timeouts, Upstream

log = logging.getLogger(__name__)
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


@dataclass
class PeerTier:
    config: Config
    token: PeerToken
    membership: Membership
    source: PeerSource

    @classmethod
    def build(cls, config: Config, upstreams: Sequence[Upstream]) -> PeerTier | None:
        if not (config.peers_enabled or config.peer_listen) or config.peer_token_file is None:
            return None
        addr = config.peer_addr
        self_id = peer_url(*addr) if addr else None
        membership = Membership(self_id, config.peers)
        token = PeerToken(config.peer_token_file)
        timeouts = Timeouts(connect=config.peer_timeout, read=config.upstream_read_timeout,
                            narinfo=config.upstream_narinfo_timeout + config.peer_timeout)
        source = PeerSource(membership, timeouts, config.circuit_cooldown, token, upstreams)
        return cls(config, token, membership, source)

    def jobs(self, kubernetes: bool) -> list[Callable[[], Coroutine[Any, Any, None]]]:
        if not self.config.peer_service:
            return []
        if not kubernetes:
            log.warning("peer-service is set but there is no cluster to watch (not in a "
                        "cluster, no --kubeconfig): only --peer peers are used")
            return []
        return [self._discover]

    async def _discover(self) -> None:
        cfg = self.config
        addr = cfg.peer_addr
        await watch_endpoint_slices(
            self.membership, kubeconfig=str(cfg.kubeconfig) if cfg.kubeconfig else None,
            namespace=own_namespace(cfg.peer_namespace), service=cfg.peer_service or "",
            own_hosts={addr[0]} if addr else set(), node_name=cfg.node_name)

    def status(self) -> dict[str, str]:
        return self.source.status()


def own_namespace(configured: str | None) -> str:
    if configured:
        return configured
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    except OSError:
        return "default"
