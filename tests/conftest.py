"""Suite-wide fixtures backed by the real Nix (Debian nix-bin) on this machine.

Session-scoped (built once, shared; treat as read-only):
  nix_available      -- fails the test with a clear message when Nix is not installed.
  nix_workdir        -- scratch dir for derivation sources and GC-root links.
  signing_key        -- (secret key file, public key text "upstream-test-1:base64").
  small_closure      -- Closure of 4 chained paths: 200 kB, 50 kB, 3 kB, 10 bytes of data.
  big_path_closure   -- Closure of an 8 MB path plus 2 small ones (stream-through/kill tests).
  published_cache    -- dir holding both closures as an xz, signed file binary cache
                        (nix-cache-info, <hash>.narinfo, nar/<filehash>.nar.xz).

Function-scoped:
  upstream_server    -- a started UpstreamServer over published_cache (fresh counts, no
                        faults), stopped after the test.
  cold_root          -- an empty dir to use as a cold node's chroot store (nix_copy dest).

Be a pod: `nix_copy(upstream_server.url, cold_root, small_closure.roots, [signing_key[1]])`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kube import BOOKMARK_INTERVAL
from tests.support.kubeapi import FakeKubeAPI
from tests.support.nixenv import (
    Closure,
    build_closure,
    ensure_store,
    make_keypair,
    missing_tools,
    publish,
)
from tests.support.upstream import UpstreamServer

SMALL_SIZES = [200_000, 50_000, 3_000, 10]
BIG_SIZES = [8_000_000, 4_000, 10]


@pytest.fixture(scope="session")
def nix_available() -> None:
    missing = missing_tools()
    if missing:
        pytest.fail(
            f"the test suite needs the real Nix; missing {', '.join(missing)}: "
            "run `apt-get install -y nix-bin`", pytrace=False)
    ensure_store()


@pytest.fixture(scope="session")
def nix_workdir(nix_available: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("nix-work")


@pytest.fixture(scope="session")
def signing_key(nix_workdir: Path) -> tuple[Path, str]:
    return make_keypair(nix_workdir / "keys", "upstream-test-1")


@pytest.fixture(scope="session")
def small_closure(nix_workdir: Path) -> Closure:
    return build_closure(nix_workdir, "small", SMALL_SIZES)


@pytest.fixture(scope="session")
def big_path_closure(nix_workdir: Path) -> Closure:
    return build_closure(nix_workdir, "big", BIG_SIZES)


@pytest.fixture(scope="session")
def published_cache(nix_workdir: Path, signing_key: tuple[Path, str], small_closure: Closure,
                    big_path_closure: Closure) -> Path:
    cache = nix_workdir / "published-cache"
    publish(small_closure.roots + big_path_closure.roots, cache, signing_key[0], "xz")
    return cache


@pytest.fixture
def upstream_server(published_cache: Path) -> Iterator[UpstreamServer]:
    with UpstreamServer(published_cache) as server:
        yield server


@pytest.fixture
def cold_root(tmp_path: Path) -> Path:
    root = tmp_path / "cold-node"
    root.mkdir()
    return root


# --- the in-process Kubernetes API server (tests/kube, tests/peers) ------------------------

@pytest.fixture
def kubeapi() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI(bookmark_interval=BOOKMARK_INTERVAL) as api:
        yield api


@pytest.fixture
def kubeconfig(kubeapi: FakeKubeAPI, tmp_path: Path) -> str:
    return str(kubeapi.write_kubeconfig(tmp_path / "kubeconfig"))
