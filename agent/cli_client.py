"""CLI commands that talk to the running agent over its Unix socket, and `verify`."""

import argparse
import asyncio
import json
import sys
from typing import Any

import aiohttp
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
err = Console(stderr=True)


class AgentUnreachable(Exception):
    pass


async def _call(socket: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    try:
        connector = aiohttp.UnixConnector(path=socket)
        async with aiohttp.ClientSession(connector=connector) as s, \
                s.request(method, f"http://agent{path}", json=body) as r:
            return r.status, await r.json(content_type=None)
    except (aiohttp.ClientConnectionError, FileNotFoundError) as e:
        raise AgentUnreachable(f"cannot reach the agent at {socket}: {e}") from None


def _unreachable(e: AgentUnreachable) -> int:
    err.print(f"[red]error:[/] {e} (is `flox-node-cache run` running? see --socket)")
    return EXIT_UNREACHABLE


def _prewarm_body(args: argparse.Namespace) -> dict[str, Any] | None:
    given = sum(map(bool, (args.refs, args.lockfile, args.store_paths)))
    if given != 1 or len(args.refs) > 1:
        err.print("[red]error:[/] give one environment, or --lockfile, or --store-path")
        return None
    body: dict[str, Any] = {"pin": bool(args.pin)}
    if args.system:
        body["system"] = args.system
    if args.refs:
        body["ref"] = args.refs[0]
    elif args.lockfile:
        try:
            body["lockfile"] = args.lockfile.read_text()
        except OSError as e:
            err.print(f"[red]error:[/] {args.lockfile}: {e.strerror}")
            return None
    else:
        body["store_paths"] = args.store_paths
    return body


async def prewarm(args: argparse.Namespace) -> int:
    body = _prewarm_body(args)
    if body is None:
        return EXIT_USAGE
    socket = str(args.socket)
    try:
        status, job = await _call(socket, "POST", "/v1/prewarm", body)
        if status != 202:
            err.print(f"[red]error:[/] {job.get('error', job)}")
            return EXIT_USAGE if status == 400 else EXIT_FAILED
        job = await _follow(socket, job, quiet=args.json)
    except AgentUnreachable as e:
        return _unreachable(e)
    if args.json:
        print(json.dumps(job, indent=1))
    p = job["progress"]
    if job["state"] == "succeeded":
        err.print(f"[green]ready:[/] {job['target']}: {p['paths_done']} paths, "
                  f"{_size(p['bytes_total'])} ({_size(p['bytes_fetched'])} fetched)")
        return EXIT_OK
    err.print(f"[red]failed:[/] {job['target']}: {job['error']}")
    for path, reason in list(p["failures"].items())[:20]:
        err.print(f"  {path}: {reason}")
    return EXIT_FAILED


async def _follow(socket: str, job: dict[str, Any], quiet: bool) -> dict[str, Any]:
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TextColumn("{task.fields[paths]}"))
    with Progress(*columns, console=err, disable=quiet, transient=False) as bar:
        task = bar.add_task(job["target"], total=None, paths="")
        while job["state"] in ("pending", "running"):
            await asyncio.sleep(0.25)
            _, job = await _call(socket, "GET", f"/v1/prewarm/{job['id']}")
            p = job["progress"]
            bar.update(task, total=p["bytes_total"] or None, completed=p["bytes_done"],
                       paths=f"{p['paths_done']}/{p['paths_total']} paths")
    return job


async def status(args: argparse.Namespace) -> int:
    try:
        _, st = await _call(str(args.socket), "GET", "/v1/status")
        _, envs = await _call(str(args.socket), "GET", "/v1/environments")
    except AgentUnreachable as e:
        return _unreachable(e)
    if args.json:
        print(json.dumps({"store": st, "environments": envs}, indent=1))
        return EXIT_OK
    out = Console()
    out.print(f"store {st['store']}: {_size(st['used_bytes'])} of {_size(st['budget_bytes'])} "
              f"budget, {st['entries']['narinfo']} paths, {_size(st['pinned_bytes'])} pinned"
              + (" [red]DISK FULL[/]" if st["disk_full"] else ""))
    if st.get("peers"):
        out.print("peers: " + ", ".join(f"{p} ({state})" for p, state in st["peers"].items()))
    table = Table("environment", "generation", "paths", "size", "present", "pinned by")
    for e in envs:
        table.add_row(e["ref"], str(e["generation"] or "-"),
                      f"{e['paths_present']}/{e['paths']}", _size(e["closure_bytes"]),
                      "yes" if e["complete"] else f"{_size(e['present_bytes'])}",
                      ", ".join(e["pinned_by"]) or "-")
    out.print(table)
    return EXIT_OK


async def gc(args: argparse.Namespace) -> int:
    try:
        _, result = await _call(str(args.socket), "POST", "/v1/gc", {"dry_run": args.dry_run})
    except AgentUnreachable as e:
        return _unreachable(e)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        verb = "would evict" if args.dry_run else "evicted"
        print(f"{verb} {len(result['evicted_files'])} entries, {_size(result['evicted_bytes'])}; "
              f"used {_size(result['used_before'])} -> {_size(result['used_after'])} of "
              f"{_size(result['budget_bytes'])}")
        for f in result["evicted_files"]:
            print(f"  {f}")
    return EXIT_OK


def verify(args: argparse.Namespace) -> int:
    from agent.store.verify import verify_store

    if not (args.store / "nix-cache-info").exists():
        err.print(f"[red]error:[/] {args.store} is not a flox-node-cache store")
        return EXIT_USAGE
    report = verify_store(args.store, repair=args.repair, progress=not args.json)
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
    else:
        for problem in report.problems:
            print(f"{problem.kind}: {problem.file}: {problem.detail}", file=sys.stderr)
        print(f"checked {report.checked} NARs ({_size(report.bytes)}): "
              f"{len(report.problems)} problem(s)" + (", repaired" if args.repair else ""))
    return EXIT_FAILED if report.problems else EXIT_OK


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
