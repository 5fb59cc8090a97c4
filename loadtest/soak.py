"""Soak test: many concurrent clients mixing hits and misses against the real agent.

    python -m loadtest.soak --clients 500 --seconds 60

Builds a closure with the real Nix, publishes it as a signed xz cache served by a loopback
upstream with some latency, starts the agent, warms half of the paths, then runs N clients (half
over the Unix socket, half over TCP) that loop for the duration: fetch a narinfo, then its NAR
(hits for warm paths, misses for the others until fetched once), or an unknown hash (404).
Every NAR body is checked against the narinfo's FileHash.

Checks, each failing the run (exit 1): no errors besides the expected 404s; no leaked file
descriptors in the agent (/proc/<pid>/fd before and after, small slack; the upstream
connection pool and the NAR files the store keeps open, one descriptor each, are bounded
pools); nothing left in <store>/.tmp; the agent's peak RSS (VmHWM) under --max-rss-mb.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from agent.nix import narinfo
from agent.nix.hashes import Hash
from agent.store.openfiles import MAX_OPEN_FILES
from tests.support.agent import AgentProcess
from tests.support.nixenv import build_closure, hash_part, make_keypair, publish
from tests.support.upstream import UpstreamServer

# NAR sizes cycled over the closure's paths: mostly small, some medium.
SIZES = [40_000, 3_000, 300, 150_000, 12_000, 700]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=500, help="concurrent clients (default 500)")
    p.add_argument("--seconds", type=float, default=60, help="duration (default 60)")
    p.add_argument("--paths", type=int, default=36, help="store paths in the closure")
    p.add_argument("--latency", type=float, default=0.02,
                   help="upstream latency per request, seconds (default 0.02)")
    p.add_argument("--max-rss-mb", type=float, default=300, help="peak RSS limit (default 300)")
    p.add_argument("--fd-slack", type=int, default=10, help="fds the agent may gain (default 10)")
    p.add_argument("--workdir", type=Path, help="where to build (default: a temporary dir)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p.parse_args(argv)


@dataclass
class Stats:
    latencies: list[float] = field(default_factory=list)
    requests: int = 0
    not_found: int = 0
    nar_bytes: int = 0
    errors: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        if len(self.errors) < 1000:  # keep the report readable; the count is what matters
            self.errors.append(what)
        else:
            self.errors[-1] = f"... and more (last: {what})"


@dataclass
class Target:
    hash_part: str
    warm: bool


UPSTREAM_POOL_LIMIT = 64  # agent/upstream/client.py: TCPConnector(limit=64)


def _tcp_peers(pid: int) -> dict[str, int]:
    """Socket inode -> remote port, for the process's TCP sockets."""
    peers: dict[str, int] = {}
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            cols = line.split()
            peers[cols[9]] = int(cols[2].rsplit(":", 1)[1], 16)
    return peers


def fd_kinds(pid: int, upstream_port: int) -> dict[str, int]:
    """Open fds by kind: "upstream" (kept-alive connections to the upstream, a bounded pool),
    "socket", "pipe", "anon_inode", or the file path."""
    peers = _tcp_peers(pid)
    kinds: dict[str, int] = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = str(fd.readlink())
        except OSError:
            continue
        kind = target.split(":")[0] if ":[" in target else target
        if kind == "socket" and peers.get(target[8:-1]) == upstream_port:
            kind = "upstream"
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def _kept_nars(kinds: dict[str, int]) -> dict[str, int]:
    """The NAR files among `kinds`: once the clients are done, those the store keeps open."""
    return {kind: n for kind, n in kinds.items() if "/nar/" in kind}


def _pooled(kinds: dict[str, int]) -> int:
    """Descriptors of bounded pools: upstream connections, NAR files kept open."""
    return kinds.get("upstream", 0) + sum(_kept_nars(kinds).values())


def _kept_open_within_bounds(kinds: dict[str, int]) -> bool:
    """One descriptor per kept NAR file (a request's own duplicate left open would be a
    second), and no more files than the store keeps."""
    kept = _kept_nars(kinds)
    return all(n == 1 for n in kept.values()) and len(kept) <= MAX_OPEN_FILES


def _proc(pid: int) -> tuple[int, int]:
    """(open fds, VmHWM in kB) of a process."""
    fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    hwm = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    return fds, hwm


async def _timed(session: aiohttp.ClientSession, url: str, stats: Stats) -> tuple[int, bytes]:
    start = time.monotonic()
    async with session.get(url) as r:
        body = await r.read()
    stats.latencies.append(time.monotonic() - start)
    stats.requests += 1
    return r.status, body


async def _fetch_path(session: aiohttp.ClientSession, base: str, h: str, stats: Stats) -> None:
    status, body = await _timed(session, f"{base}/{h}.narinfo", stats)
    if status != 200:
        stats.error(f"narinfo {h}: HTTP {status}")
        return
    info = narinfo.parse(body.decode())
    status, nar = await _timed(session, f"{base}/{info.url}", stats)
    if status != 200:
        stats.error(f"nar {info.url}: HTTP {status}")
        return
    file_hash: Hash | None = info.file_hash
    if file_hash is None or hashlib.new(file_hash.algo, nar).digest() != file_hash.digest:
        stats.error(f"nar {info.url}: body does not match FileHash")
    stats.nar_bytes += len(nar)


async def _client(n: int, agent: AgentProcess, targets: list[Target], deadline: float,
                  stats: Stats) -> None:
    rng = random.Random(n)
    unix = n % 2 == 0
    session = agent.unix_session() if unix else aiohttp.ClientSession()
    base = "http://agent" if unix else agent.url
    async with session:
        while time.monotonic() < deadline:
            try:
                if rng.random() < 0.15:  # an unknown path: a well-formed miss
                    unknown = "".join(rng.choice("0123456789abcdfghijklmnpqrsvwxyz")
                                      for _ in range(32))
                    status, _ = await _timed(session, f"{base}/{unknown}.narinfo", stats)
                    if status == 404:
                        stats.not_found += 1
                    else:
                        stats.error(f"unknown {unknown}: HTTP {status}")
                else:
                    await _fetch_path(session, base, rng.choice(targets).hash_part, stats)
            except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                stats.error(f"{type(e).__name__}: {e}")


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _prepare(workdir: Path, paths: int) -> tuple[Path, str, list[str]]:
    """Build and publish the closure: (cache dir, public key, store paths)."""
    sizes = [SIZES[i % len(SIZES)] for i in range(paths)]
    closure = build_closure(workdir, f"soak{paths}", sizes)
    sk, pk = make_keypair(workdir / "keys", "soak-1")
    cache = workdir / "cache"
    publish(closure.roots, cache, sk, "xz")
    return cache, pk, closure.paths


async def _warm(agent: AgentProcess, targets: list[Target]) -> None:
    stats = Stats()
    async with aiohttp.ClientSession() as s:
        for t in targets:
            if t.warm:
                await _fetch_path(s, agent.url, t.hash_part, stats)
    if stats.errors:
        raise RuntimeError(f"warm-up failed: {stats.errors[:3]}")


async def soak(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    cache, pk, paths = _prepare(workdir, args.paths)
    rng = random.Random(0)
    targets = [Target(hash_part(p), warm=rng.random() < 0.5) for p in paths]
    with UpstreamServer(cache, latency=args.latency) as up, \
            AgentProcess(workdir / "agent", [up.url], [pk], "--log-level", "info") as agent:
        assert agent.proc is not None
        pid = agent.proc.pid
        await _warm(agent, targets)
        await asyncio.sleep(0.5)
        fds_before, _ = _proc(pid)
        kinds_before = fd_kinds(pid, up.port)
        stats = Stats()
        start = time.monotonic()
        deadline = start + args.seconds
        await asyncio.gather(*[_client(n, agent, targets, deadline, stats)
                               for n in range(args.clients)])
        elapsed = time.monotonic() - start
        await asyncio.sleep(1.0)  # let the agent close the clients' connections
        fds_after, hwm_kb = _proc(pid)
        kinds_after = fd_kinds(pid, up.port)
        leftovers = sorted(p.name for p in (agent.store / ".tmp").iterdir())
        upstream_nars = up.count("/nar/*")
    report = {
        "clients": args.clients, "seconds": round(elapsed, 2), "paths": len(paths),
        "requests": stats.requests, "rps": round(stats.requests / elapsed, 1),
        "not_found": stats.not_found, "errors": len(stats.errors),
        "error_samples": stats.errors[:10], "nar_bytes": stats.nar_bytes,
        "p50_ms": round(_percentile(stats.latencies, 0.50) * 1000, 2),
        "p99_ms": round(_percentile(stats.latencies, 0.99) * 1000, 2),
        "fds_before": fds_before, "fds_after": fds_after,
        "fds_gained": {k: v - kinds_before.get(k, 0) for k, v in kinds_after.items()
                       if v != kinds_before.get(k, 0)}, "tmp_leftovers": leftovers,
        "peak_rss_mb": round(hwm_kb / 1024, 1), "upstream_nar_requests": upstream_nars,
    }
    report["checks"] = {
        "no_errors": not stats.errors and stats.requests > 0,
        # Kept-alive upstream connections are a bounded pool, not a leak; all else must return.
        "no_fd_leak": (fds_after - _pooled(kinds_after)
                       <= fds_before - _pooled(kinds_before) + args.fd_slack)
        and kinds_after.get("upstream", 0) <= UPSTREAM_POOL_LIMIT
        and _kept_open_within_bounds(kinds_after),
        "no_tmp_files": not leftovers,
        "rss_bounded": hwm_kb / 1024 <= args.max_rss_mb,
        # Each NAR came from upstream once, however many clients asked (coalescing).
        "one_upstream_fetch_per_nar": upstream_nars == len(paths),
    }
    return report


def _print(report: dict[str, object]) -> None:
    for key, value in report.items():
        if key == "checks":
            assert isinstance(value, dict)
            for name, ok in value.items():
                print(f"  {'PASS' if ok else 'FAIL'}  {name}")
        else:
            print(f"{key:>22}: {value}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        report = asyncio.run(soak(args, args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
            report = asyncio.run(soak(args, Path(tmp)))
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        _print(report)
    checks = report["checks"]
    assert isinstance(checks, dict)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
