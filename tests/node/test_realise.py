"""Pinned closures realised into a real node's Nix store (nix-daemon on a chroot store),
through the node-relay as an untrusted client; a pod start is then the shim's untrusted
`nix-store -r` against that daemon."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from agent.prefetch import Target
from agent.serve.admin import env_pin_holder
from tests.node.conftest import NodeFactory, admin, eventually, holder_state, node_status, prewarm
from tests.support.nixenv import Closure
from tests.support.upstream import UpstreamServer


def holder_for(paths: list[str]) -> str:
    """The pin holder of `prewarm --store-path ... --pin` (admin.env_pin_holder of its name)."""
    return env_pin_holder(Target.parse(store_paths=paths).name)


def test_pinned_prewarm_makes_a_pod_start_copy_nothing(
        make_node: NodeFactory, small_closure: Closure, upstream_server: UpstreamServer) -> None:
    node = make_node()
    with node.agent:
        assert prewarm(node.agent, small_closure.roots)["state"] == "succeeded"
        holder = holder_for(small_closure.roots)
        holder_state(node.agent, holder, "rooted")
        # Every path is valid in the node's store, though no client asked for anything.
        assert all(node.daemon.valid(p) for p in small_closure.paths)
        env = next(e for e in admin(node.agent, "GET", "/v1/environments")
                   if e["ref"] == holder.removeprefix("env:"))
        assert env["node_realised"] is True
        assert env["node_rooted_bytes"] == small_closure.total_nar_size
        status = node_status(node.agent)
        assert status["state"] == "ok" and status["rooted_paths"] == len(small_closure.paths)
        assert node.agent.metric("flox_node_cache_node_realisations_total") == 1
        assert node.agent.metric("flox_node_cache_node_copied_paths_total") == \
            len(small_closure.paths)
        assert node.agent.metric("flox_node_cache_node_rooted_bytes") == \
            small_closure.total_nar_size
    # The pod starts with the agent stopped: nothing to copy, nobody asked.
    upstream_server.reset_counts()
    pod = node.daemon.realise(*small_closure.roots)
    assert pod.returncode == 0, pod.stderr
    assert "copying path" not in pod.stderr
    assert upstream_server.counts == {}


def test_gc_keeps_pinned_closures_and_frees_them_after_unpin(
        make_node: NodeFactory, small_closure: Closure) -> None:
    node = make_node()
    holder = holder_for(small_closure.roots)
    with node.agent:
        prewarm(node.agent, small_closure.roots)
        holder_state(node.agent, holder, "rooted")
        node.daemon.gc()
        assert all(node.daemon.valid(p) for p in small_closure.paths)

        admin(node.agent, "DELETE", f"/v1/pins/{holder.removeprefix('env:')}")
        eventually(lambda: holder not in node_status(node.agent)["holders"], "released")
        assert list(node.roots.iterdir()) == []
        assert node_status(node.agent)["rooted_paths"] == 0
        node.daemon.gc()
        assert not any(node.daemon.valid(p) for p in small_closure.paths)


def test_paths_already_valid_are_not_copied_again(
        make_node: NodeFactory, small_closure: Closure) -> None:
    node = make_node()
    with node.agent:
        prewarm(node.agent, small_closure.roots)
        holder_state(node.agent, holder_for(small_closure.roots), "rooted")
        # A second holder of an overlapping closure (its second path): one more root, no copy.
        tail = [small_closure.chain[1]]
        prewarm(node.agent, tail)
        holder_state(node.agent, holder_for(tail), "rooted")
        assert node.agent.metric("flox_node_cache_node_realisations_total") == 2
        assert node.agent.metric("flox_node_cache_node_copied_paths_total") == \
            len(small_closure.paths)
        links = sorted(p.name for p in node.roots.glob("*/*") if p.is_symlink())
        assert links == sorted(p.rsplit("/", 1)[1] for p in small_closure.roots + tail)


def test_restart_reconciles_roots_with_the_pins(
        make_node: NodeFactory, small_closure: Closure) -> None:
    node = make_node()
    holder = holder_for(small_closure.roots)
    with node.agent:
        prewarm(node.agent, small_closure.roots)
        holder_state(node.agent, holder, "rooted")
    # While the agent is down: its root is lost, and an orphan (a holder unpinned meanwhile,
    # e.g. a pod that ended) is left behind; a directory that is not ours must be kept.
    (link,) = [p for p in node.roots.glob("*/*") if p.is_symlink()]
    link.unlink()
    orphan = node.roots / "pod_gone-000000000000"
    orphan.mkdir()
    (orphan / ".holder").write_text(json.dumps({"holder": "pod:default/gone", "since": 1.0}))
    (orphan / small_closure.roots[0].rsplit("/", 1)[1]).symlink_to(small_closure.roots[0])
    foreign = node.roots / "someone-else"
    foreign.mkdir()
    with node.agent:
        holder_state(node.agent, holder, "rooted")
        eventually(lambda: not orphan.exists(), "orphan removed")
        assert link.is_symlink()
        assert foreign.is_dir()
        node.daemon.gc()
        assert all(node.daemon.valid(p) for p in small_closure.paths)


def test_budget_drops_the_oldest_pins_node_roots_first(
        make_node: NodeFactory, small_closure: Closure, big_path_closure: Closure) -> None:
    # Room for the big closure or the small one, not both.
    node = make_node("--node-realise-budget", str(big_path_closure.total_nar_size + 1000))
    small, big = holder_for(small_closure.roots), holder_for(big_path_closure.roots)
    with node.agent:
        prewarm(node.agent, small_closure.roots)
        holder_state(node.agent, small, "rooted")
        prewarm(node.agent, big_path_closure.roots)
        holder_state(node.agent, big, "rooted")
        status = node_status(node.agent)
        assert status["over_budget"] == [small]
        assert status["holders"][small] == "over_budget"
        assert status["rooted_bytes"] == big_path_closure.total_nar_size
        assert node.agent.metric("flox_node_cache_node_over_budget_holders") == 1
        envs = {e["ref"]: e for e in admin(node.agent, "GET", "/v1/environments")}
        assert envs[small.removeprefix("env:")]["node_realised"] is False
        # The agent's own cache still has (and pins) the small closure.
        assert envs[small.removeprefix("env:")]["complete"] is True
        shown = subprocess.run([sys.executable, "-m", "agent", "status", "--socket",
                                str(node.agent.socket)], capture_output=True, text=True,
                               timeout=60, env={**os.environ, "COLUMNS": "300"})
        assert shown.returncode == 0, shown.stderr
        assert f"over budget (not rooted): {small}" in shown.stdout
        node.daemon.gc()
        assert all(node.daemon.valid(p) for p in big_path_closure.paths)
        assert not any(node.daemon.valid(p) for p in small_closure.paths)
