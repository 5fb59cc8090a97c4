"""The Kubernetes tests' fixtures: node agents run in the test's loop (the fake API server
and its kubeconfig are suite-wide, tests/conftest.py; tests/kube/__init__.py has the
helpers)."""

from collections.abc import AsyncIterator

import pytest

from tests.kube import Agents


@pytest.fixture
async def agents(kubeconfig: str) -> AsyncIterator[Agents]:
    a = Agents(kubeconfig)
    yield a
    await a.stop()
