"""python -m loadtest.hotpath: server CPU time per request, the agent's HTTP path vs nginx.

A warm agent (the loadtest's web and ml closures prewarmed) and nginx serving the agent's own
store directory (the very same files) answer the same requests, interleaved (agent, nginx,
agent, nginx, ...). For each run the server's CPU time (utime + stime of the whole process from
/proc/<pid>/stat: every thread, sendfile's kernel copies included; nginx's one worker) is
divided by the requests answered. On a shared machine CPU time per request is steady where
wall-clock rates are noise; the rates are printed beside it.

  narinfo  one keep-alive connection, GET <hash>.narinfo of every path in turn (a Nix client's
           query loop), over TCP and the Unix socket
  nar      every NAR of the ml closure over 16 keep-alive connections, TCP and Unix
  copy     a real `nix copy` of the ml closure into a fresh root (a warm node's cold start),
           over TCP; charged per store path (a narinfo and a NAR each)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loadtest import closures
from loadtest import load as ld
from loadtest.baselines import Nginx
from loadtest.http import Conn, Target
from tests.support.agent import AgentProcess
from tests.support.nixenv import hash_part, nix_copy
from tests.support.upstream import UpstreamServer

REPO = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process (all its threads, live and exited), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def nginx_worker(master: int) -> int:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    if len(children) != 1:
        raise RuntimeError(f"expected one nginx worker, found {children}")
    return int(children[0])


@dataclass
class Sample:
    cpu_us: float  # server CPU time per request, microseconds
    sys_us: float  # of which in the kernel
    rate: float  # requests per second (wall clock)
    mib_s: float  # body MiB per second (wall clock)


def measure(pid: int, load: Callable[[], tuple[int, int]]) -> Sample:
    """Run `load` (returns requests, body bytes) and charge the server's CPU time to it."""
    c0, t0 = cpu_seconds(pid), time.perf_counter()
    requests, nbytes = load()
    elapsed, c1 = time.perf_counter() - t0, cpu_seconds(pid)
    user, system = c1[0] - c0[0], c1[1] - c0[1]
    return Sample((user + system) / requests * 1e6, system / requests * 1e6,
                  requests / elapsed, nbytes / elapsed / 2**20)


def narinfo_load(target: Target, hashes: list[str], requests: int) -> Callable[[], tuple[int, int]]:
    def run() -> tuple[int, int]:
        conn, total = Conn(target), 0
        try:
            conn.get(f"/{hashes[0]}.narinfo")
            for i in range(requests):
                status, n = conn.get(f"/{hashes[i % len(hashes)]}.narinfo")
                if status != 200:
                    raise RuntimeError(f"narinfo {hashes[i % len(hashes)]}: {status}")
                total += n
        finally:
            conn.close()
        return requests + 1, total
    return run


def nar_load(target: Target, files: list[str], passes: int,
             connections: int) -> Callable[[], tuple[int, int]]:
    def run() -> tuple[int, int]:
        total = 0
        for _ in range(passes):
            n, errors = ld._one_pass(target, files, connections)
            if errors:
                raise RuntimeError(f"{errors} NAR requests failed")
            total += n
        return passes * len(files), total
    return run


def copy_load(url: str, root: str, paths: int, keys: list[str],
              scratch: Path) -> Callable[[], tuple[int, int]]:
    def run() -> tuple[int, int]:
        scratch.mkdir(parents=True, exist_ok=True)
        dest = Path(tempfile.mkdtemp(prefix="node-", dir=scratch))
        try:
            r = nix_copy(url, dest, [root], keys, timeout=1800)
            if r.returncode != 0:
                raise RuntimeError(f"nix copy from {url} failed: {r.stderr[-2000:]}")
        finally:
            shutil.rmtree(dest, ignore_errors=True)
        return paths, 0
    return run


def compare(name: str, pairs: int, agent_pid: int, nginx_pid: int,
            agent_load: Callable[[], tuple[int, int]],
            nginx_load: Callable[[], tuple[int, int]]) -> dict[str, object]:
    """`pairs` interleaved runs of each; medians and spreads."""
    agent, nginx = [], []
    for _ in range(pairs):
        agent.append(measure(agent_pid, agent_load))
        nginx.append(measure(nginx_pid, nginx_load))
    # A run shorter than a clock tick (10 ms) of a server's CPU has no ratio.
    ratios = sorted(a.cpu_us / n.cpu_us for a, n in zip(agent, nginx, strict=True) if n.cpu_us)
    rates = sorted(a.rate / n.rate for a, n in zip(agent, nginx, strict=True))
    out = {
        "scenario": name,
        "agent_cpu_us": round(statistics.median(s.cpu_us for s in agent), 1),
        "agent_cpu_us_range": [round(min(s.cpu_us for s in agent), 1),
                               round(max(s.cpu_us for s in agent), 1)],
        "agent_sys_us": round(statistics.median(s.sys_us for s in agent), 1),
        "nginx_sys_us": round(statistics.median(s.sys_us for s in nginx), 1),
        "nginx_cpu_us": round(statistics.median(s.cpu_us for s in nginx), 1),
        "nginx_cpu_us_range": [round(min(s.cpu_us for s in nginx), 1),
                               round(max(s.cpu_us for s in nginx), 1)],
        "cpu_ratio": round(statistics.median(ratios), 2) if ratios else None,
        "cpu_ratio_range": [round(ratios[0], 2), round(ratios[-1], 2)] if ratios else None,
        "agent_rate": round(statistics.median(s.rate for s in agent)),
        "nginx_rate": round(statistics.median(s.rate for s in nginx)),
        "rate_ratio": round(statistics.median(rates), 2),
        "agent_mib_s": round(statistics.median(s.mib_s for s in agent)),
        "nginx_mib_s": round(statistics.median(s.mib_s for s in nginx)),
    }
    print(f"{name:<14} agent {out['agent_cpu_us']:>7} us/req {out['agent_cpu_us_range']} "
          f"(sys {out['agent_sys_us']})  nginx {out['nginx_cpu_us']:>6} us/req "
          f"{out['nginx_cpu_us_range']} (sys {out['nginx_sys_us']})  cpu x{out['cpu_ratio']} "
          f"{out['cpu_ratio_range']}  wall rate x{out['rate_ratio']} "
          f"({out['agent_rate']} vs {out['nginx_rate']}/s)", flush=True)
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest.hotpath", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--size", choices=sorted(closures.PROFILES), default="medium")
    a("--workdir", type=Path, help="default var/loadtest/<size> (shared with python -m loadtest)")
    a("--scenario", choices=("narinfo", "nar", "copy", "all"), default="all")
    a("--transport", choices=("tcp", "unix", "all"), default="all")
    a("--pairs", type=int, default=3, help="interleaved agent/nginx pairs (default 3)")
    a("--requests", type=int, default=20_000, help="narinfo requests per run (default 20000)")
    a("--nar-passes", type=int, default=3, help="passes over the ml closure's NARs per run")
    a("--connections", type=int, default=16, help="connections of the NAR scenario")
    a("--json", type=Path, help="write the results here")
    return p


async def _warm(agent: AgentProcess, roots: list[str]) -> None:
    state = await ld.prewarm(agent, roots, timeout=1800)
    if state.get("state") != "succeeded":
        raise RuntimeError(f"prewarm did not succeed: {state}")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    workdir = (args.workdir or REPO / "var" / "loadtest" / args.size).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    envs = closures.build(workdir, closures.PROFILES[args.size])
    caches = closures.publish(workdir, envs, xz_level=1)
    paths = sorted(set(envs.web.paths) | set(envs.ml.paths))
    hashes = [hash_part(p) for p in paths]
    agent_dir = workdir / "tmp" / "hotpath-agent"
    with UpstreamServer(caches.upstream, latency=0, bandwidth=None) as up, \
            AgentProcess(agent_dir, [up.url], [caches.public_key], "--recompress", "none",
                         "--log-level", "info") as agent:
        asyncio.run(_warm(agent, [envs.web.roots[0], envs.ml.roots[0]]))
        with Nginx([agent.store]) as nginx:
            assert nginx.proc is not None and agent.proc is not None
            npid, apid = nginx_worker(nginx.proc.pid), agent.proc.pid
            targets = {"tcp": (Target(port=agent.port), nginx.targets[agent.store.resolve()][0]),
                       "unix": (Target(unix=str(agent.socket)),
                                nginx.targets[agent.store.resolve()][1])}
            print(f"agent pid {apid}, nginx worker pid {npid}", flush=True)  # for a profiler
            nar_urls = ld.agent_nar_files(agent, envs.ml.paths)
            results = []
            for transport in ("tcp", "unix"):
                if args.transport not in ("all", transport):
                    continue
                mine, theirs = targets[transport]
                if args.scenario in ("narinfo", "all"):
                    results.append(compare(
                        f"narinfo {transport}", args.pairs, apid, npid,
                        narinfo_load(mine, hashes, args.requests),
                        narinfo_load(theirs, hashes, args.requests)))
                if args.scenario in ("nar", "all"):
                    results.append(compare(
                        f"nar {transport} x{args.connections}", args.pairs, apid, npid,
                        nar_load(mine, nar_urls, args.nar_passes, args.connections),
                        nar_load(theirs, nar_urls, args.nar_passes, args.connections)))
            if args.scenario in ("copy", "all") and args.transport in ("all", "tcp"):
                mine, theirs = targets["tcp"]
                scratch = workdir / "tmp" / "hotpath-copies"
                results.append(compare(
                    "nix copy ml", args.pairs, apid, npid,
                    copy_load(f"http://127.0.0.1:{mine.port}", envs.ml.roots[0],
                              len(envs.ml.paths), [caches.public_key], scratch),
                    copy_load(f"http://127.0.0.1:{theirs.port}", envs.ml.roots[0],
                              len(envs.ml.paths), [caches.public_key], scratch)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"size": args.size, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
