"""A node for the realisation tests: a real nix-daemon on a chroot store (substituting from the
agent), the agent's node-relay in front of it as a non-root uid, and the real agent process
realising into it (`--realise-into-node pinned`)."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent import AgentProcess
from tests.support.nixdaemon import NixDaemon, NodeRelay, scratch_dir
from tests.support.upstream import UpstreamServer


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("agent", timeout=30)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(self.unix_path))


def admin(agent: AgentProcess, method: str, path: str, body: Any = None) -> Any:
    """Call the agent's admin API on its Unix socket; the decoded JSON answer."""
    conn = _UnixHTTP(agent.socket)
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None)
        return json.loads(conn.getresponse().read() or b"null")
    finally:
        conn.close()


def eventually(check: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} after {timeout}s")
        time.sleep(0.1)


def _prewarmed(agent: AgentProcess, request: dict[str, Any]) -> dict[str, Any]:
    job = admin(agent, "POST", "/v1/prewarm", request)
    return eventually(lambda: (j := admin(agent, "GET", f"/v1/prewarm/{job['id']}"))
                      ["finished"] and j, "prewarmed")


def prewarm(agent: AgentProcess, paths: list[str], *, pin: bool = True) -> dict[str, Any]:
    """Prewarm `paths` (pinned by `env:paths:<digest>`) and wait for the job; the job."""
    return _prewarmed(agent, {"store_paths": paths, "pin": pin})


def prewarm_ref(agent: AgentProcess, ref: str) -> dict[str, Any]:
    """Prewarm a FloxHub environment, pinned by `env:<ref>`; the finished job."""
    return _prewarmed(agent, {"ref": ref, "pin": True})


def node_status(agent: AgentProcess) -> dict[str, Any]:
    return admin(agent, "GET", "/v1/status")["node_store"]


def holder_state(agent: AgentProcess, holder: str, state: str, timeout: float = 60) -> None:
    eventually(lambda: node_status(agent)["holders"].get(holder) == state,
               f"{holder} {state}", timeout)


@dataclass
class Node:
    daemon: NixDaemon
    relay: NodeRelay
    agent: AgentProcess
    roots: Path


class NodeFactory:
    """`make_node(*agent_args)`: a started daemon (substituting from the agent's URL only)
    and relay, and an agent (not started) pointed at the relay (`socket="daemon"`: at the
    daemon itself; a path: there)."""

    def __init__(self, tmp_path: Path, key: str, upstream: UpstreamServer,
                 stack: contextlib.ExitStack) -> None:
        self.tmp_path, self.key, self.upstream, self.stack = tmp_path, key, upstream, stack

    def __call__(self, *agent_args: str, socket: str | Path = "relay",
                 substituters: list[str] | None = None, keys: list[str] | None = None,
                 agent_keys: list[str] | None = None,
                 upstream: UpstreamServer | None = None) -> Node:
        roots = self.tmp_path / "roots"
        agent = AgentProcess(self.tmp_path / "agent", [(upstream or self.upstream).url],
                             agent_keys or [self.key], "--realise-into-node", "pinned",
                             "--node-gcroots-dir", str(roots), *agent_args)
        daemon = NixDaemon(self.stack.enter_context(scratch_dir("realise-node-")),
                           substituters=[agent.url] if substituters is None else substituters,
                           keys=keys or [self.key])
        self.stack.enter_context(daemon)
        relay = self.stack.enter_context(NodeRelay(daemon))
        sockets = {"relay": relay.socket, "daemon": daemon.socket}
        agent.args += ["--nix-daemon-socket", str(sockets.get(str(socket), socket))]
        self.stack.callback(lambda: agent.proc and agent.stop())
        return Node(daemon, relay, agent, roots)


@pytest.fixture
def make_node(tmp_path: Path, signing_key: tuple[Path, str],
              upstream_server: UpstreamServer) -> Iterator[NodeFactory]:
    with contextlib.ExitStack() as stack:
        yield NodeFactory(tmp_path, signing_key[1], upstream_server, stack)
