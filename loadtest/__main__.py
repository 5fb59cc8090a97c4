"""python -m loadtest: benchmark flox-node-cache against nginx and direct upstream fetches."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import textwrap
import time
from pathlib import Path

from loadtest import closures, compare, report, runner
from loadtest.scenarios import SCENARIOS

REPO = Path(__file__).resolve().parents[1]

DESCRIPTION = """\
Builds realistic closures with the real Nix (three environments sharing a base: hundreds of
paths at the default size, 1 KiB to hundreds of MB), publishes them as an xz upstream cache and
an uncompressed file:// cache, serves the upstream on loopback with per-request latency and
bandwidth, then runs each scenario for each --recompress mode on fresh agents (the real CLI).

Every comparison runs interleaved (A B A B ..., --repeats rounds): a ratio is the median of the
per-round ratios with a 95 % confidence interval of that median (the range up to 8 rounds; from 9
the order statistics leave the extremes out), and a target is met only when the whole interval
meets it ("inconclusive" when it straddles the target). The serving process's CPU time (from
/proc/<pid>/stat) is reported per request beside the wall-clock rates.

Scenarios (--scenario, default all):
""" + "\n".join(textwrap.fill(s.summary, 94, initial_indent=f"  {s.name:<11} ",
                                subsequent_indent=" " * 14) for s in SCENARIOS.values()) + """

Prints a table and writes JSON (every sample, baseline, ratio, target, verdict, the machine and
its load average) and the same table as Markdown beside it. All load goes to 127.0.0.1 or Unix
sockets; every loop is bounded in count and time. Needs root, nix (nix-bin), nginx
(/usr/sbin/nginx)."""


def _weak_verdicts(repeats: int) -> str:
    """What a verdict of `repeats` rounds is worth, when less than CONFIDENCE; "" otherwise."""
    confidence = compare.median_interval(repeats)[1]
    if confidence >= compare.CONFIDENCE:
        return ""
    return (f"--repeats {repeats}: the range of so few rounds bounds a median with "
            f"{confidence:.0%} confidence; verdicts are indicative (6 rounds reach 95 %)")


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
    a("--nodes-dir", type=Path, default=runner.Options.nodes_dir,
      help="where the cold nodes (real Nix clients) write their fresh stores; a tmpfs keeps the "
      "disk's writeback, the same for every substituter compared, out of the timings "
      "(default %(default)s)")
    a("--json", type=Path, default=REPO / "loadtest" / "results" / "latest.json",
      help="where to write the JSON results (default loadtest/results/latest.json)")
    a("--scenario", action="append", choices=sorted(SCENARIOS), metavar="NAME",
      help="run only this scenario (repeatable; default all): " + ", ".join(SCENARIOS))
    a("--repeats", type=int, default=3, help="interleaved rounds of every comparison "
      "(default 3, a quick look; a verdict at 95 %% confidence needs at least 6)")
    a("--recompress", default="zstd",
      help="comma-separated agent --recompress modes (zstd, uncompressed, none) to run every "
      "scenario with (default zstd, the agent's default)")
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
    a("--nodes", type=int, default=4, help="nodes (agents) of the peer-rollout scenario "
      "(default 4)")
    a("--pods-per-node", type=int, default=2, help="concurrent pods per node in the "
      "peer-rollout scenario (default 2)")
    a("--throughput-seconds", type=float, default=runner.Options.throughput_seconds,
      help="each NAR throughput sample repeats whole passes over the closure for at least this "
      "long: a pass over 16 connections takes a fraction of a second, too short to average out "
      "the scheduler of a shared machine (default %(default)s)")
    a("--settle-limit", type=float, default=300.0, help="longest wait for the agent to serve "
      "re-encoded narinfos before a warm measurement (default 300 s)")
    return p


def options(args: argparse.Namespace) -> runner.Options:
    prof = closures.PROFILES[args.size]
    modes = [m.strip() for m in args.recompress.split(",") if m.strip()]
    if not modes or any(m not in ("zstd", "uncompressed", "none") for m in modes):
        raise SystemExit("--recompress takes a comma-separated list of zstd, uncompressed, none")
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    return runner.Options(
        profile=prof, workdir=(args.workdir or REPO / "var" / "loadtest" / args.size).resolve(),
        modes=modes, repeats=args.repeats, latency=args.latency,
        bandwidth=args.bandwidth * 1e6 if args.bandwidth > 0 else None,
        clients=args.clients or prof.clients, rss_clients=args.rss_clients or prof.rss_clients,
        storm_seconds=args.storm_seconds or prof.storm_seconds,
        storm_connections=args.storm_connections, open_loop_rate=args.open_loop_rate,
        nginx_workers=args.nginx_workers, xz_level=args.xz_level,
        settle_limit=args.settle_limit, nodes_dir=args.nodes_dir.resolve(), nodes=args.nodes,
        pods_per_node=args.pods_per_node, throughput_seconds=args.throughput_seconds)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    opts = options(args)
    chosen = [SCENARIOS[n] for n in (args.scenario or SCENARIOS)]
    started, load_before = time.monotonic(), os.getloadavg()
    envs, caches = runner.prepare(opts)
    setup_s = time.monotonic() - started

    def save(r: runner.Run) -> None:
        """Write the results so far: JSON and the Markdown table beside it."""
        meta = {"size": opts.profile.name, "scenarios": [s.name for s in chosen],
                "completed": list(r.seconds), "closures": envs.describe(),
                "unique_paths": len(envs.all_paths), "notes": r.notes,
                "options": {k: str(v) for k, v in vars(opts).items()},
                "load_average": {"before": load_before, "after": os.getloadavg()},
                "setup_seconds": round(setup_s, 1), "scenario_seconds": r.seconds,
                "host_steal": r.steal, "host_steal_per_round": r.round_steal,
                "total_seconds": round(time.monotonic() - started, 1)}
        report.write_json(args.json, r.out, meta)
        args.json.with_suffix(".md").write_text(report.markdown(r.out))

    weak = _weak_verdicts(opts.repeats)
    if weak:
        print(f"note: {weak}")
    r = asyncio.run(runner.run(opts, envs, caches, chosen, save))
    if weak:
        r.notes.append(weak)
    save(r)
    report.print_table(r.out)
    for note in r.notes:
        print(f"note: {note}")
    print(f"results: {args.json} and {args.json.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
