"""What goes wrong between the agent and the node's nix-daemon is a status, a log line and a
metric with a reason, and the agent's cache keeps working."""

from __future__ import annotations

import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.node.conftest import Node, NodeFactory, eventually, holder_state, node_status, prewarm
from tests.node.test_realise import holder_for
from tests.support.nixenv import Closure, hash_part, make_keypair, nix_env


def _cache_still_serves(node: Node, closure: Closure) -> None:
    url = f"{node.agent.url}/{hash_part(closure.roots[0])}.narinfo"
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200


def _logged(node: Node, reason: str) -> bool:
    return any(r.get("msg") == "cannot realise into the node's store"
               and r.get("reason") == reason for r in node.agent.log_records())


def _global_error(node: Node, closure: Closure, reason: str) -> None:
    with node.agent:
        assert prewarm(node.agent, closure.roots)["state"] == "succeeded"
        eventually(lambda: node_status(node.agent)["reason"] == reason, reason)
        status = node_status(node.agent)
        assert status["state"] == "error" and status["error"]
        assert _logged(node, reason)
        assert node.agent.metric("flox_node_cache_node_realise_failures_total",
                                 reason=reason) >= 1
        _cache_still_serves(node, closure)
    assert not node.daemon.valid(closure.roots[0])


def test_daemon_socket_missing(make_node: NodeFactory, small_closure: Closure,
                               tmp_path: Path) -> None:
    _global_error(make_node(socket=tmp_path / "no-nix-here" / "socket"), small_closure,
                  "socket_missing")


def test_daemon_refusing_connections(make_node: NodeFactory, small_closure: Closure,
                                     tmp_path: Path) -> None:
    path = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX) as dead:  # bound, never listening: refused
        dead.bind(str(path))
        _global_error(make_node(socket=path), small_closure, "daemon_unreachable")


def test_a_root_agent_never_connects_to_the_daemon_itself(make_node: NodeFactory,
                                                          small_closure: Closure) -> None:
    # As root, straight to the daemon's socket, the agent would be a trusted client.
    _global_error(make_node(socket="daemon"), small_closure, "trusted_connection")


def test_daemon_without_the_agent_as_substituter(make_node: NodeFactory,
                                                 small_closure: Closure) -> None:
    node = make_node(substituters=[])
    holder = holder_for(small_closure.roots)
    with node.agent:
        prewarm(node.agent, small_closure.roots)
        holder_state(node.agent, holder, "failed: not_substitutable")
        assert "substituters" in node_status(node.agent)["holder_errors"][holder]
        assert _logged(node, "not_substitutable")
        assert node.agent.metric("flox_node_cache_node_realise_failures_total",
                                 reason="not_substitutable") >= 1
        _cache_still_serves(node, small_closure)


def test_a_path_the_daemon_refuses(make_node: NodeFactory, small_closure: Closure,
                                   tmp_path: Path) -> None:
    # The agent trusts the upstream's key; the node's daemon trusts another one only.
    _, other = make_keypair(tmp_path / "keys", "other-1")
    node = make_node(keys=[other])
    holder = holder_for(small_closure.roots)
    with node.agent:
        prewarm(node.agent, small_closure.roots)
        holder_state(node.agent, holder, "failed: refused")
        assert "not signed" in node_status(node.agent)["holder_errors"][holder]
        assert _logged(node, "refused")
        _cache_still_serves(node, small_closure)
    assert not node.daemon.valid(small_closure.roots[0])


@pytest.mark.parametrize("via_relay", [False, True])
def test_the_relay_makes_root_an_untrusted_client(make_node: NodeFactory,
                                                  small_closure: Closure,
                                                  via_relay: bool) -> None:
    """Importing a path without a signature the node trusts: root may, through the relay not."""
    node = make_node()
    target = node.relay.socket if via_relay else node.daemon.socket
    copy = subprocess.run(["nix", "copy", "--no-check-sigs", "--to", f"unix://{target}",
                           small_closure.chain[-1]], env=nix_env(), capture_output=True,
                          text=True, timeout=60, check=False)
    if via_relay:
        assert copy.returncode != 0 and "signature" in copy.stderr
        assert not node.daemon.valid(small_closure.chain[-1])
    else:
        assert copy.returncode == 0, copy.stderr
        assert node.daemon.valid(small_closure.chain[-1])
