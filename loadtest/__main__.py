"""python -m loadtest: benchmark flox-node-cache against nginx and direct upstream fetches."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from loadtest import closures, report, runner

REPO = Path(__file__).resolve().parents[1]

DESCRIPTION = """\
Builds realistic closures with the real Nix (three environments sharing a base: hundreds of
paths at the default size, 1 KiB to hundreds of MB), publishes them as an xz upstream cache and
an uncompressed file:// cache, serves the upstream on loopback with per-request latency and
bandwidth, starts the real agent and runs, for each --recompress mode on fresh agents:

  1 narinfo storm: sequential on one keep-alive connection, concurrent over many, and p99 at a
    fixed open-loop rate; over the Unix socket and loopback TCP; vs nginx serving the upstream
  2 NAR throughput of the whole ml closure with 1 and 16 connections, warm; Unix and TCP; vs
    nginx serving the agent's own store directory (the same files)
  3 N concurrent real `nix copy` clients of the web closure against a cold agent then a warm
    one: wall time, upstream requests and bytes per unique NAR; vs N clients direct
  4 rollout: prewarm the web environment (POST /v1/prewarm) then N pods start
  cold starts: the ml closure through a cold agent (vs direct from the upstream) and through a
    warm agent (vs `nix copy` from the file:// uncompressed cache on the same disk)
  RSS: the agent's peak RSS while many clients stream the ml closure through a cold agent
  5 rollout to N nodes: N agents on their own loopback addresses, M pods each start the web
    environment at once, without then with peers: upstream bytes / closure bytes (N without
    peers, 1.00 with) and the pods' wall time (first --recompress mode only)

Prints a table and writes JSON with every measurement, its baseline, ratio, target and the
machine. All load goes to 127.0.0.1 or Unix sockets; every loop is bounded in count and time.
Needs root, nix (nix-bin), nginx (/usr/sbin/nginx)."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--size", choices=sorted(closures.PROFILES), default="medium",
      help="closure sizes (tiny: a few MB for the smoke test; small ~100 MB; medium ~450 MB, "
      "~300 paths; large ~1.4 GB with an ml closure >= 1 GB, the RSS target's size); "
      "default medium")
    a("--workdir", type=Path, help="closures, caches and agent stores; reused between runs of "
      "the same size (default var/loadtest/<size>)")
    a("--json", type=Path, default=REPO / "loadtest" / "results" / "latest.json",
      help="where to write the JSON results (default loadtest/results/latest.json)")
    a("--recompress", default="zstd,none",
      help="comma-separated agent --recompress modes (zstd, uncompressed, none) to run every "
      "agent scenario with (default zstd,none)")
    a("--latency", type=float, default=0.02, help="upstream per-request latency, seconds "
      "(default 0.02)")
    a("--bandwidth", type=float, default=200.0, help="upstream per-request bandwidth, MB/s; "
      "0 for unlimited (default 200)")
    a("--clients", type=int, help="N concurrent nix copy clients for scenarios 3 and 4 "
      "(default by size: 50 at medium and large)")
    a("--rss-clients", type=int, help="clients streaming during the RSS measurement "
      "(default by size: 100 at medium and large)")
    a("--storm-seconds", type=float, help="time bound of each narinfo storm phase "
      "(default by size)")
    a("--storm-connections", type=int, default=64, help="connections of the concurrent "
      "narinfo storm (default 64)")
    a("--open-loop-rate", type=float, default=1000.0, help="fixed narinfo request rate for the "
      "p99 measurement (default 1000/s)")
    a("--nginx-workers", type=int, default=1, help="nginx worker_processes (default 1, like "
      "the agent's single event loop)")
    a("--xz-level", type=int, default=1, help="xz level of the upstream cache (default 1: "
      "publishing at -6 runs ~2 MB/s here; decoding speed barely depends on it)")
    a("--nodes", type=int, default=4, help="nodes (agents) of the rollout-to-N-nodes scenario "
      "(default 4)")
    a("--pods-per-node", type=int, default=2, help="concurrent nix copy clients per node in "
      "the rollout-to-N-nodes scenario (default 2)")
    a("--settle-limit", type=float, default=300.0, help="longest wait for the agent to serve "
      "re-encoded narinfos before a warm measurement (default 300 s)")
    return p


def options(args: argparse.Namespace) -> runner.Options:
    prof = closures.PROFILES[args.size]
    modes = [m.strip() for m in args.recompress.split(",") if m.strip()]
    if not modes or any(m not in ("zstd", "uncompressed", "none") for m in modes):
        raise SystemExit("--recompress takes a comma-separated list of zstd, uncompressed, none")
    return runner.Options(
        profile=prof, workdir=(args.workdir or REPO / "var" / "loadtest" / args.size).resolve(),
        modes=modes, latency=args.latency,
        bandwidth=args.bandwidth * 1e6 if args.bandwidth > 0 else None,
        clients=args.clients or prof.clients, rss_clients=args.rss_clients or prof.rss_clients,
        storm_seconds=args.storm_seconds or prof.storm_seconds,
        storm_connections=args.storm_connections, open_loop_rate=args.open_loop_rate,
        nginx_workers=args.nginx_workers, xz_level=args.xz_level,
        settle_limit=args.settle_limit, nodes=args.nodes, pods_per_node=args.pods_per_node)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    opts = options(args)
    started = time.monotonic()
    envs, caches = runner.prepare(opts)
    setup_s = time.monotonic() - started
    r = asyncio.run(runner.run(opts, envs, caches))
    report.print_table(r.out)
    for note in r.notes:
        print(f"note: {note}")
    meta = {"size": opts.profile.name, "closures": envs.describe(),
            "unique_paths": len(envs.all_paths), "notes": r.notes,
            "options": {k: str(v) for k, v in vars(opts).items()},
            "setup_seconds": round(setup_s, 1),
            "total_seconds": round(time.monotonic() - started, 1)}
    report.write_json(args.json, r.out, meta)
    print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
