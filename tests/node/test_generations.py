"""A new live generation of a pinned FloxHub environment: its closure is rooted in the node's
store before the old generation's roots are released, and never the other way round."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.node.conftest import NodeFactory, eventually, holder_state, node_status, prewarm_ref
from tests.support.floxmeta import Floxmeta
from tests.support.gitserver import GitHTTPServer
from tests.support.lockfiles import lockfile_for
from tests.support.nixenv import Closure, build_closure, make_keypair, publish
from tests.support.upstream import UpstreamServer

HOLDER = "env:acme/web"


@pytest.fixture
def floxhub(tmp_path: Path) -> Iterator[tuple[Floxmeta, GitHTTPServer]]:
    meta = Floxmeta(tmp_path / "floxhub")
    with GitHTTPServer(meta.root) as server:
        yield meta, server


@pytest.fixture(scope="module")
def gen2(nix_workdir: Path) -> Closure:
    return build_closure(nix_workdir, "gen2", [30_000, 20])


def _links(roots: Path) -> set[str]:
    return {p.readlink().as_posix() for p in roots.glob("*/*") if p.is_symlink()}


@pytest.mark.parametrize("daemon_trusts_gen2", [True, False])
def test_generation_switch_roots_the_new_before_releasing_the_old(
        make_node: NodeFactory, tmp_path: Path, signing_key: tuple[Path, str],
        floxhub: tuple[Floxmeta, GitHTTPServer], small_closure: Closure, gen2: Closure,
        daemon_trusts_gen2: bool) -> None:
    # Generation 2 is signed by a second key the agent trusts; the node's daemon trusts it
    # too, or not (then gen 2 cannot be realised and gen 1 must stay rooted).
    sk2, pk2 = make_keypair(tmp_path / "keys", "second-1")
    cache = tmp_path / "cache"
    publish(small_closure.roots, cache, signing_key[0])
    publish(gen2.roots, cache, sk2)
    meta, git = floxhub
    meta.add_generation("acme", "web", lockfile_for(*small_closure.roots))
    with UpstreamServer(cache) as upstream:
        node = make_node("--floxhub-git-url", git.url, "--generation-watch-interval", "0.5",
                         upstream=upstream, agent_keys=[signing_key[1], pk2],
                         keys=[signing_key[1], pk2] if daemon_trusts_gen2 else None)
        with node.agent:
            assert prewarm_ref(node.agent, "acme/web")["state"] == "succeeded"
            holder_state(node.agent, HOLDER, "rooted")
            assert _links(node.roots) == set(small_closure.roots)

            meta.add_generation("acme", "web", lockfile_for(*gen2.roots))
            if daemon_trusts_gen2:
                eventually(lambda: _links(node.roots) == set(gen2.roots), "gen 2 rooted alone")
                kept, freed = gen2, small_closure
            else:
                holder_state(node.agent, HOLDER, "failed: refused")
                assert _links(node.roots) == set(small_closure.roots)
                kept, freed = small_closure, gen2
            assert node_status(node.agent)["rooted_paths"] == len(kept.paths)
            node.daemon.gc()
            assert all(node.daemon.valid(p) for p in kept.paths)
            assert not any(node.daemon.valid(p) for p in freed.paths)
