"""Shared by the FloxHub tests: each module's `floxmeta` served by git's own smart HTTP,
requiring that module's TOKEN."""

from collections.abc import Iterator

import pytest

from tests.support.floxmeta import Floxmeta
from tests.support.gitserver import GitHTTPServer


@pytest.fixture
def server(floxmeta: Floxmeta, request: pytest.FixtureRequest) -> Iterator[GitHTTPServer]:
    with GitHTTPServer(floxmeta.root, token=request.module.TOKEN) as srv:
        yield srv
