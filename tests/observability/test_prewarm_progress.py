"""The prewarm progress gauges, scraped from the real agent while a real prewarm runs: they move
during the job (the dashboard's progress panels) and go away when the job is forgotten."""

import asyncio
import urllib.request
from pathlib import Path

from tests.support.agent import AgentProcess
from tests.support.nixenv import Closure, nar_request_path
from tests.support.upstream import Fault, UpstreamServer

PROGRESS = "flox_node_cache_prewarm_progress_ratio"
REMAINING = "flox_node_cache_prewarm_remaining_bytes"
JOBS_KEPT = 500  # finished jobs the agent remembers (Prefetcher._forget_old_jobs)


async def _admin(agent: AgentProcess, method: str, path: str, body: object = None) -> dict:
    async with agent.unix_session() as s, \
            s.request(method, f"http://agent{path}", json=body) as r:
        return await r.json()


def _scrape(agent: AgentProcess) -> str:
    with urllib.request.urlopen(agent.metrics_url + "/metrics", timeout=5) as r:
        return r.read().decode()


async def test_progress_gauges_move_while_a_prewarm_runs_and_go_when_it_is_forgotten(
        tmp_path: Path, upstream_server: UpstreamServer, published_cache: Path,
        signing_key: tuple[Path, str], small_closure: Closure) -> None:
    root = small_closure.roots[0]  # 200 kB; its three small references arrive at once
    nar = nar_request_path(published_cache, root)
    size = (published_cache / nar.lstrip("/")).stat().st_size
    upstream_server.set_fault(nar, Fault("drip", chunk=size // 30 + 1, delay=0.1))  # ~3 s
    with AgentProcess(tmp_path / "a", [upstream_server.url], [signing_key[1]]) as agent:
        job = await _admin(agent, "POST", "/v1/prewarm", {"store_paths": [root]})
        target = job["target"]
        seen: list[float] = []
        while job["state"] in ("pending", "running"):
            seen.append(await asyncio.to_thread(agent.metric, PROGRESS, environment=target))
            await asyncio.sleep(0.1)
            job = await _admin(agent, "GET", f"/v1/prewarm/{job['id']}")
        assert job["state"] == "succeeded", job
        assert any(0 < v < 1 for v in seen), seen  # the gauge moved before the job ended
        assert agent.metric(PROGRESS, environment=target) == 1
        assert agent.metric(REMAINING, environment=target) == 0
        assert f'environment="{target}"' in _scrape(agent)

        # As many later jobs (of paths no upstream has, quick to fail) as are remembered:
        # the next one makes the agent forget the first job, and its gauges with it.
        gone = [f"/nix/store/{str(i).zfill(32)}-gone" for i in range(JOBS_KEPT + 1)]
        for batch in range(0, JOBS_KEPT, 50):
            await asyncio.gather(*(_admin(agent, "POST", "/v1/prewarm", {"store_paths": [p]})
                                   for p in gone[batch:batch + 50]))
        while (await _admin(agent, "GET", "/v1/status"))["jobs_running"]:
            await asyncio.sleep(0.1)
        assert (await _admin(agent, "GET", f"/v1/prewarm/{job['id']}"))["id"] == job["id"]
        await _admin(agent, "POST", "/v1/prewarm", {"store_paths": [gone[-1]]})
        assert "error" in await _admin(agent, "GET", f"/v1/prewarm/{job['id']}")
        text = _scrape(agent)
        assert f'environment="{target}"' not in text
