"""Admin API bodies a JSON parser chokes on get a JSON 4xx, and the agent keeps serving."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.agent import AgentProcess
from tests.support.upstream import UpstreamServer


@pytest.fixture
def agent(tmp_path: Path, upstream_server: UpstreamServer,
          signing_key: tuple[Path, str]) -> Iterator[AgentProcess]:
    with AgentProcess(tmp_path / "agent", [upstream_server.url], [signing_key[1]]) as a:
        yield a


@pytest.mark.parametrize("body", [
    b"[" * 100_000,                                   # unterminated, deeper than the parser
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,         # well-formed, as deep
])
@pytest.mark.parametrize("path", ["/v1/prewarm", "/v1/gc"])
async def test_deeply_nested_json_is_a_json_400(agent: AgentProcess, path: str,
                                                body: bytes) -> None:
    async with agent.unix_session() as s:
        async with s.post("http://agent" + path, data=body) as r:
            assert r.status == 400
            assert r.content_type == "application/json"
            assert await r.json() == {"error": "body is nested too deeply"}
        async with s.get("http://agent/v1/status") as r:
            assert r.status == 200


async def test_cancelling_an_unknown_job_is_a_json_404(agent: AgentProcess) -> None:
    async with agent.unix_session() as s, s.delete("http://agent/v1/prewarm/nope") as r:
        assert r.status == 404
        assert await r.json() == {"error": "no such prewarm job"}
