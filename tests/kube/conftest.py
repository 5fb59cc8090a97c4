"""The Kubernetes tests' fixtures: the fake API server, a kubeconfig for it, and node agents
run in the test's loop (tests/kube/__init__.py has the helpers)."""

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.kube import BOOKMARK_INTERVAL, Agents
from tests.support.kubeapi import FakeKubeAPI


@pytest.fixture
def kubeapi() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI(bookmark_interval=BOOKMARK_INTERVAL) as api:
        yield api


@pytest.fixture
def kubeconfig(kubeapi: FakeKubeAPI, tmp_path: Path) -> str:
    return str(kubeapi.write_kubeconfig(tmp_path / "kubeconfig"))


@pytest.fixture
async def agents(kubeconfig: str) -> AsyncIterator[Agents]:
    a = Agents(kubeconfig)
    yield a
    await a.stop()
