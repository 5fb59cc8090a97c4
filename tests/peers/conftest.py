"""A cluster of real agents on separate test hosts (network namespaces on one bridge), all
reading through one counting upstream that listens on the bridge address.

    def test_x(peer_cluster):
        cluster = peer_cluster(4)        # 4 agents, each knows the others with --peer
        cluster.agents[0].url            # its cache listener, reachable from the test process
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.peers.rendezvous import ranked
from tests.support.agent import AgentProcess, free_port
from tests.support.netns import Host, Network, unavailable
from tests.support.upstream import UpstreamServer

# Fail fast instead of Nix's default five-minute stall timeout.
QUICK = "stalled-download-timeout = 20\nconnect-timeout = 5\n"


class PeerCluster:
    def __init__(self, net: Network, workdir: Path, upstream: UpstreamServer, key: str) -> None:
        self.net, self.workdir, self.upstream, self.key = net, workdir, upstream, key
        self.token_file = workdir / "peer-token"
        self.token_file.write_text(secrets.token_hex(16) + "\n")
        self.agents: list[AgentProcess] = []
        self.hosts: list[Host] = []
        self.peer_ports: list[int] = []

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()

    def peer_url(self, i: int) -> str:
        return f"http://{self.hosts[i].address}:{self.peer_ports[i]}"

    def add_agents(self, n: int, *extra: str, extra_peers: tuple[str, ...] = ()) \
            -> list[AgentProcess]:
        """Start `n` more agents; each is told about every agent (the new ones included) and
        `extra_peers`."""
        first = len(self.agents)
        for _ in range(n):
            self.hosts.append(self.net.add_host())
            self.peer_ports.append(free_port())
        every = [*(self.peer_url(i) for i in range(len(self.hosts))), *extra_peers]
        started = []
        for i in range(first, first + n):
            host = self.hosts[i]
            agent = AgentProcess(
                self.workdir / f"agent{i}", [self.upstream.url], [self.key],
                "--peer-listen", f"{host.address}:{self.peer_ports[i]}",
                "--peer-token-file", str(self.token_file),
                *[a for p in every for a in ("--peer", p)], *extra,
                host=host.address, wrap=host.exec_prefix())
            self.agents.append(agent)
            started.append(agent.start())
        return started

    def owner(self, key: str, among: list[int] | None = None) -> int:
        """Index of the agent owning `key` among `among` (default: all)."""
        urls = {self.peer_url(i): i for i in (among if among is not None else
                                              range(len(self.agents)))}
        return urls[ranked(urls, key)[0]]

    def stop(self) -> None:
        for agent in self.agents:
            if agent.proc is not None:
                agent.stop()


@pytest.fixture
def peer_cluster(tmp_path: Path, published_cache: Path,
                 signing_key: tuple[Path, str]) -> Iterator[Callable[..., PeerCluster]]:
    reason = unavailable()
    if reason:
        pytest.skip(f"separate test hosts need network namespaces: {reason}")
    clusters: list[PeerCluster] = []
    with Network() as net:
        upstream = UpstreamServer(published_cache, host=net.gateway).start()

        def make(n: int, *extra: str, extra_peers: tuple[str, ...] = ()) -> PeerCluster:
            cluster = PeerCluster(net, tmp_path, upstream, signing_key[1])
            clusters.append(cluster)
            cluster.add_agents(n, *extra, extra_peers=extra_peers)
            return cluster
        try:
            yield make
        finally:
            for c in clusters:
                c.stop()
            upstream.stop()
