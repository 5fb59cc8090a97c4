"""Load generators: narinfo storms, NAR downloads, real Nix clients, streaming clients.

Every loop is bounded in count and in time; all load goes to 127.0.0.1 or a Unix socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import queue
import resource
import shutil
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.closures import Caches, nar_files
from loadtest.http import AsyncConn, Conn, Target
from loadtest.report import percentiles
from tests.support.agent import AgentProcess
from tests.support.nixenv import hash_part, run_nix_async
from tests.support.upstream import UpstreamServer


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No garbage collection in the load generator while it measures: a full pass over this
    process's heap takes tens of milliseconds, and every request scheduled meanwhile would be
    charged to the server as latency (the open loop counts from the scheduled send)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


# --- narinfo storms --------------------------------------------------------------------------


@dataclass
class Storm:
    rate: float  # requests per second achieved
    latencies_ms: dict[str, float]
    requests: int
    errors: int
    details: dict[str, object] = field(default_factory=dict)


def storm_sequential(target: Target, hashes: list[str], seconds: float,
                     max_requests: int = 200_000) -> Storm:
    """One keep-alive connection, one request after the other (a Nix client's query loop)."""
    conn, lat, errors = Conn(target), [], 0
    conn.get(f"/{hashes[0]}.narinfo")  # connect outside the clock
    start = time.perf_counter()
    deadline = start + seconds
    i = 0
    while i < max_requests and (i < len(hashes) or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        status, _ = conn.get(f"/{hashes[i % len(hashes)]}.narinfo")
        lat.append((time.perf_counter() - t0) * 1000)
        errors += status != 200
        i += 1
    elapsed = time.perf_counter() - start
    conn.close()
    return Storm(i / elapsed, percentiles(lat), i, errors)


async def _storm_worker(target: Target, hashes: list[str], offset: int, deadline: float,
                        budget: list[int], lat: list[float], errors: list[int]) -> None:
    conn, i = AsyncConn(target), offset
    try:
        while budget[0] > 0 and time.perf_counter() < deadline:
            budget[0] -= 1
            t0 = time.perf_counter()
            status, _ = await conn.get(f"/{hashes[i % len(hashes)]}.narinfo")
            lat.append((time.perf_counter() - t0) * 1000)
            errors[0] += status != 200
            i += 7
    finally:
        await conn.close()


async def storm_concurrent(target: Target, hashes: list[str], connections: int,
                           seconds: float, max_requests: int = 500_000) -> Storm:
    """`connections` keep-alive connections, each in a closed loop."""
    lat: list[float] = []
    errors, budget = [0], [max_requests]
    start = time.perf_counter()
    await asyncio.gather(*(
        _storm_worker(target, hashes, k * 13, start + seconds, budget, lat, errors)
        for k in range(connections)))
    elapsed = time.perf_counter() - start
    return Storm(len(lat) / elapsed, percentiles(lat), len(lat), errors[0],
                 {"connections": connections})


async def storm_open_loop(target: Target, hashes: list[str], rate: float, seconds: float,
                          pool_size: int = 32) -> Storm:
    """Requests scheduled at a fixed rate whatever the answers do (no coordinated omission):
    latency counts from the scheduled send time, so a stall shows up in every later request."""
    pool: asyncio.Queue[AsyncConn] = asyncio.Queue()
    for _ in range(pool_size):
        c = AsyncConn(target)
        await c.get(f"/{hashes[0]}.narinfo")
        pool.put_nowait(c)
    lat: list[float] = []
    errors = [0]
    total = int(rate * seconds)

    async def one(i: int, scheduled: float) -> None:
        conn = await pool.get()
        try:
            status, _ = await conn.get(f"/{hashes[i % len(hashes)]}.narinfo")
            errors[0] += status != 200
        finally:
            pool.put_nowait(conn)
        lat.append((time.perf_counter() - scheduled) * 1000)

    start = time.perf_counter()
    tasks = []
    for i in range(total):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, scheduled)))
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=seconds + 30)
    elapsed = time.perf_counter() - start
    while not pool.empty():
        await pool.get_nowait().close()
    return Storm(len(lat) / elapsed, percentiles(lat), len(lat), errors[0],
                 {"offered_rate": rate, "pool": pool_size})


# --- NAR throughput --------------------------------------------------------------------------


@dataclass
class Throughput:
    bytes_per_s: float
    seconds: float
    total_bytes: int
    passes: int
    errors: int


def nar_throughput(target: Target, files: list[str], connections: int, min_seconds: float,
                   max_passes: int = 1000) -> Throughput:
    """Download every file of `files` over `connections` keep-alive connections (work-stealing
    threads; recv releases the GIL), repeating whole passes until `min_seconds` have passed."""
    total, errors, passes = 0, 0, 0
    start = time.perf_counter()
    while passes < max_passes and (passes == 0 or time.perf_counter() - start < min_seconds):
        n, e = _one_pass(target, files, connections)
        total, errors, passes = total + n, errors + e, passes + 1
    elapsed = time.perf_counter() - start
    return Throughput(total / elapsed, elapsed, total, passes, errors)


def _one_pass(target: Target, files: list[str], connections: int) -> tuple[int, int]:
    work: queue.SimpleQueue[str] = queue.SimpleQueue()
    for f in files:
        work.put(f)
    counts = [[0, 0] for _ in range(connections)]

    def worker(slot: list[int]) -> None:
        conn = Conn(target)
        try:
            while True:
                try:
                    f = work.get_nowait()
                except queue.Empty:
                    return
                status, n = conn.get(f)
                slot[0] += n
                slot[1] += status != 200
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(c,)) for c in counts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


# --- real Nix clients ------------------------------------------------------------------------


@dataclass
class Copies:
    wall_s: float
    client_s: dict[str, float]
    failures: int
    first_error: str = ""
    client_cpu_s: float = 0.0  # CPU time of the Nix clients (user + system)


def children_cpu_s() -> float:
    """CPU time of this process's waited-for children so far (the Nix clients)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


async def nix_realises(substituters: list[str], root: str, keys: list[str], dest_dir: Path,
                       n: int = 1, timeout: float = 900) -> Copies:
    """`n` cold nodes each realise `root` from `substituters` (in that order of priority), as
    a node's Nix does with the substituters of its nix.conf: a path missing from one is looked
    up in the next."""
    return await _clients(dest_dir, n, lambda d: realise(substituters, root, keys, d, timeout))


async def _clients(dest_dir: Path, n: int, client: Callable[
        [Path], Awaitable[subprocess.CompletedProcess[str]]]) -> Copies:
    dest_dir.mkdir(parents=True, exist_ok=True)
    durations: list[float] = []

    async def one(i: int) -> subprocess.CompletedProcess[str]:
        t0 = time.perf_counter()
        r = await client(dest_dir / f"node-{i}")
        durations.append(time.perf_counter() - t0)
        return r

    cpu0, start = children_cpu_s(), time.perf_counter()
    try:
        results = await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        shutil.rmtree(dest_dir, ignore_errors=True)
    wall = time.perf_counter() - start
    failed = [r for r in results if r.returncode != 0]
    return Copies(wall, {k: v / 1000 for k, v in percentiles(
        [d * 1000 for d in durations]).items() if k != "count"}, len(failed),
        failed[0].stderr[-2000:] if failed else "", children_cpu_s() - cpu0)


def substituter_config(substituters: list[str], keys: list[str]) -> str:
    """nix.conf lines of a node whose Nix substitutes from `substituters`, first one first."""
    urls = [f"{u}{'&' if '?' in u else '?'}priority={10 * (i + 1)}"
            for i, u in enumerate(substituters)]
    return (f"substituters = {' '.join(urls)}\n"
            f"trusted-public-keys = {' '.join(keys)}\n"
            "require-sigs = true\n"
            "narinfo-cache-negative-ttl = 0\n"
            "narinfo-cache-positive-ttl = 0\n")


async def realise(substituters: list[str], root: str, keys: list[str], dest: Path,
                  timeout: float) -> subprocess.CompletedProcess[str]:
    """`nix-store --store DEST --realise ROOT` with only `substituters` configured."""
    args = ["nix-store", "--store", str(dest.resolve()), "--realise", root]
    return await run_nix_async(args, substituter_config(substituters, keys), timeout)


# --- upstream accounting ---------------------------------------------------------------------


def upstream_usage(up: UpstreamServer, caches: Caches, paths: list[str]) -> dict[str, float]:
    """Upstream requests and bytes per unique NAR and narinfo of `paths` since the last reset."""
    counts = up.counts
    nars = nar_files(caches.upstream, paths)
    nar_reqs = sum(counts.get(url, 0) for url, _ in nars)
    nar_bytes = sum(counts.get(url, 0) * size for url, size in nars)
    hashes = {hash_part(p) for p in paths}
    narinfo_reqs = sum(counts.get(f"/{h}.narinfo", 0) for h in hashes)
    return {"unique_nars": len(nars), "nar_requests": nar_reqs,
            "nar_requests_per_unique_nar": nar_reqs / len(nars) if nars else 0.0,
            "upstream_bytes_per_unique_nar": nar_bytes / len(nars) if nars else 0.0,
            "nar_bytes_unique": sum(s for _, s in nars),
            "narinfo_requests_per_unique_path": narinfo_reqs / len(hashes) if hashes else 0.0}


# --- the agent -------------------------------------------------------------------------------


def agent_targets(agent: AgentProcess) -> tuple[Target, Target]:
    return Target(port=agent.port), Target(unix=str(agent.socket))


def served_compressions(agent: AgentProcess, paths: list[str]) -> dict[str, int]:
    """Compression of each narinfo the agent serves now (over TCP), counted by value."""
    conn, out = Conn(Target(port=agent.port)), {}
    try:
        for p in paths:
            status, text = conn.text(f"/{hash_part(p)}.narinfo")
            comp = "missing"
            if status == 200:
                fields = dict(ln.split(": ", 1) for ln in text.splitlines() if ": " in ln)
                comp = fields.get("Compression", "bzip2")
            out[comp] = out.get(comp, 0) + 1
    finally:
        conn.close()
    return out


# The narinfo Compressions each agent --recompress mode serves once re-encoding is done (zstd
# leaves a NAR uncompressed where zstd barely shrinks it).
REENCODED = {"zstd": {"zstd", "none"}, "uncompressed": {"none"}}


def settle_recompression(agent: AgentProcess, paths: list[str], mode: str,
                         limit: float) -> dict[str, object]:
    """Wait (bounded) until the agent serves every narinfo re-encoded, or nothing changes for a
    while (min(15 s, limit): re-encoding that stalls that long is not making progress)."""
    quiet = min(15.0, limit)
    start = time.monotonic()
    seen = served_compressions(agent, paths)
    if mode == "none":
        return {"compressions": seen, "settle_s": 0.0, "effective": None}

    def reencoded() -> int:
        return sum(n for c, n in seen.items() if c in REENCODED[mode])
    last_change = start
    while reencoded() < len(paths) and time.monotonic() - start < limit \
            and time.monotonic() - last_change < quiet:
        time.sleep(0.5)
        now = served_compressions(agent, paths)
        if now != seen:
            seen, last_change = now, time.monotonic()
    return {"compressions": seen, "settle_s": round(time.monotonic() - start, 2),
            "effective": reencoded() > 0, "all_reencoded": reencoded() == len(paths)}


def agent_nar_files(agent: AgentProcess, paths: list[str]) -> list[str]:
    """The NAR request paths the (warm) agent's store lists for `paths`."""
    return [url for url, _ in nar_files(agent.store, paths)]


async def prewarm(agent: AgentProcess, roots: list[str], timeout: float) -> dict[str, object]:
    """POST /v1/prewarm on the Unix socket and wait for it; {"api": False} when absent."""
    async with agent.unix_session() as s:
        async with s.post("http://agent/v1/prewarm", json={"store_paths": roots}) as r:
            if r.status in (404, 405):
                return {"api": False}
            r.raise_for_status()
            pid = (await r.json())["id"]
        deadline = time.monotonic() + timeout
        state: dict[str, object] = {}
        while time.monotonic() < deadline:
            async with s.get(f"http://agent/v1/prewarm/{pid}") as r:
                state = await r.json()
            if state.get("state") in ("succeeded", "failed"):
                break
            await asyncio.sleep(0.1)
        return {"api": True, "id": pid, **state}


def stream_clients(target: Target, paths: list[str], clients: int,
                   timeout: float) -> dict[str, object]:
    """`clients` threads each GET every narinfo then the NAR it names, each starting at another
    path, so that they overlap on the same (cold: stream-through) transfers."""
    results = [[0, 0] for _ in range(clients)]
    hashes = sorted(hash_part(p) for p in paths)
    deadline = time.monotonic() + timeout

    def worker(k: int) -> None:
        conn = Conn(target)
        order = hashes[k % len(hashes):] + hashes[:k % len(hashes)]
        try:
            for h in order:
                if time.monotonic() > deadline:
                    return
                status, text = conn.text(f"/{h}.narinfo")
                url = next((ln[5:] for ln in text.splitlines() if ln.startswith("URL: ")), "")
                s2, n = conn.get("/" + url) if status == 200 else (0, 0)
                results[k][0] += n
                results[k][1] += (status != 200) + (s2 != 200)
        except OSError:
            results[k][1] += 1
        finally:
            conn.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 60)
    elapsed = time.perf_counter() - start
    total = sum(r[0] for r in results)
    return {"seconds": round(elapsed, 3), "bytes": total, "errors": sum(r[1] for r in results),
            "bytes_per_s": total / elapsed if elapsed else 0.0}
