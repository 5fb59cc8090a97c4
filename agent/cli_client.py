"""CLI commands that talk to the running agent over its Unix socket, and `verify`.

Output to a terminal is rich (bars, tables); output to a pipe or file is plain and never
wrapped or truncated, so scripts see whole names and errors.
"""

import argparse
import asyncio
import json
import sqlite3
import sys
from typing import Any
from urllib.parse import quote

import aiohttp
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn
from rich.table import Column, Table

from agent import exits
from agent.config import Config

SHOWN_FAILURES = 20   # on a terminal; a pipe gets every failure


def console(stderr: bool = False) -> Console:
    """A console that wraps only on a terminal (a pipe gets each line whole)."""
    c = Console(stderr=stderr, soft_wrap=True, highlight=False)
    if not c.is_terminal:
        c.width = 1 << 16  # tables size to their content instead of 80 columns
    return c


err = console(stderr=True)


class AgentUnreachable(Exception):
    pass


async def _call(socket: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    try:
        connector = aiohttp.UnixConnector(path=socket)
        async with aiohttp.ClientSession(connector=connector) as s, \
                s.request(method, f"http://agent{path}", json=body) as r:
            text = await r.text()
    except (aiohttp.ClientConnectionError, FileNotFoundError) as e:
        raise AgentUnreachable(f"cannot reach the agent at {socket}: {e}") from None
    try:
        return r.status, json.loads(text)
    except ValueError:
        return r.status, {"error": f"HTTP {r.status}: {text.strip()[:500]}"}


def _unreachable(e: AgentUnreachable) -> int:
    err.print(f"[red]error:[/] {escape(str(e))} (is `flox-node-cache run` running? see --socket)")
    return exits.UNREACHABLE


def _error(message: str, code: int) -> int:
    err.print(f"[red]error:[/] {escape(message)}")
    return code


# --- prewarm ---------------------------------------------------------------------------------

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
        except (OSError, UnicodeDecodeError) as e:
            err.print(f"[red]error:[/] {escape(str(args.lockfile))}: "
                      f"{escape(getattr(e, 'strerror', None) or str(e))}")
            return None
    else:
        body["store_paths"] = args.store_paths
    return body


def _label(job: dict[str, Any]) -> str:
    """The target by name: `owner/env`, `lockfile:hello+curl@<digest>`, `paths:hello@<digest>`."""
    gen = job.get("generation")
    return str(job["target"]) + (f" (generation {gen})" if gen else "")


async def prewarm(args: argparse.Namespace) -> int:
    socket = str(args.socket)
    if args.cancel:
        return await _cancel(socket, args.cancel)
    job: dict[str, Any] | None = None
    try:
        if args.follow:
            status, job = await _call(socket, "GET", f"/v1/prewarm/{quote(args.follow)}")
            if status != 200:
                return _error(str(job.get("error", job)), exits.USAGE)
        else:
            body = _prewarm_body(args)
            if body is None:
                return exits.USAGE
            status, job = await _call(socket, "POST", "/v1/prewarm", body)
            if status != 202:
                return _error(str(job.get("error", job)),
                              exits.USAGE if status == 400 else exits.FAILED)
        job = await _follow(socket, job, quiet=args.json)
    except AgentUnreachable as e:
        return _unreachable(e)
    except asyncio.CancelledError:  # Ctrl-C: stop waiting; the agent keeps the job
        return _interrupted(job, args)
    if args.json:
        print(json.dumps(job, indent=1))
    return _report(job)


def _interrupted(job: dict[str, Any] | None, args: argparse.Namespace) -> int:
    if job is None or "id" not in job:
        err.print("interrupted")
    else:
        sock = "" if args.socket == Config.socket else f" --socket {args.socket}"
        err.print(f"interrupted: prewarm job {job['id']} continues in the agent; follow it "
                  f"with `flox-node-cache prewarm{sock} --follow {job['id']}`, cancel it with "
                  f"`flox-node-cache prewarm{sock} --cancel {job['id']}`", markup=False)
    return exits.INTERRUPTED


def _report(job: dict[str, Any]) -> int:
    p, label = job["progress"], _label(job)
    if job["state"] == "succeeded":
        err.print(f"[green]ready:[/] {escape(label)}: {p['paths_done']} paths, "
                  f"{human_size(p['bytes_total'])} ({human_size(p['bytes_fetched'])} fetched)")
        return exits.OK
    err.print(f"[red]failed:[/] {escape(label)}: {escape(str(job['error']))}")
    failures = list(p["failures"].items())
    shown = failures[:SHOWN_FAILURES] if err.is_terminal else failures
    for path, reason in shown:
        err.print(f"  {path}: {reason}", markup=False)
    if len(shown) < len(failures):
        err.print(f"  ... and {len(failures) - len(shown)} more (--json lists them all)")
    return exits.FAILED


async def _follow(socket: str, job: dict[str, Any], quiet: bool) -> dict[str, Any]:
    columns = (TextColumn("{task.description}", markup=False), BarColumn(),
               DownloadColumn(binary_units=True), TextColumn("{task.fields[speed]}"),
               TextColumn("{task.fields[paths]}"))
    with Progress(*columns, console=err, disable=quiet or not err.is_terminal) as bar:
        task = bar.add_task(_label(job), total=None, paths="", speed="")
        while job["state"] in ("pending", "running"):
            await asyncio.sleep(0.25)
            _, job = await _call(socket, "GET", f"/v1/prewarm/{job['id']}")
            p = job["progress"]
            bar.update(task, description=_label(job), total=p["bytes_total"] or None,
                       completed=p["bytes_done"],
                       speed=f"{human_size(p['rate_bytes_per_second'])}/s",
                       paths=f"{p['paths_done']}/{p['paths_total']} paths")
    return job


async def _cancel(socket: str, job_id: str) -> int:
    try:
        status, job = await _call(socket, "DELETE", f"/v1/prewarm/{quote(job_id)}")
    except AgentUnreachable as e:
        return _unreachable(e)
    if status == 200 and job["error"] == "cancelled":
        err.print(f"cancelled prewarm job {job_id} ({job['target']})", markup=False)
        return exits.OK
    if status == 200:
        return _error(f"prewarm job {job_id} is still {job['state']}", exits.FAILED)
    return _error(str(job.get("error", job)), exits.FAILED if status == 409 else exits.USAGE)


# --- status, pins, unpin, gc -----------------------------------------------------------------

async def status(args: argparse.Namespace) -> int:
    try:
        _, st = await _call(str(args.socket), "GET", "/v1/status")
        _, envs = await _call(str(args.socket), "GET", "/v1/environments")
    except AgentUnreachable as e:
        return _unreachable(e)
    if args.json:
        print(json.dumps({"store": st, "environments": envs}, indent=1))
        return exits.OK
    out = console()
    out.print(f"store {escape(st['store'])}: {human_size(st['used_bytes'])} of "
              f"{human_size(st['budget_bytes'])} budget, {st['entries']['narinfo']} paths, "
              f"{human_size(st['pinned_bytes'])} pinned"
              + (" [red]DISK FULL[/]" if st["disk_full"] else ""))
    u = st["usage"]
    out.print(f"  NARs {human_size(u['nars'])}, index {human_size(u['index'])}, listings and "
              f"narinfos {human_size(u['metadata'])}, temporary {human_size(u['temporary'])}"
              + (f", originals kept {human_size(u['originals_in_grace'])} while clients may "
                 "still read them (re-encoding grace period)" if u["originals_in_grace"] else ""))
    if st["budget_exceeds_disk"]:
        out.print("  [yellow]the budget is more than the disk can hold: it fills before "
                  "eviction starts (lower --store-budget)[/]")
    if st.get("peers"):
        out.print("peers: " + ", ".join(f"{p} ({state})" for p, state in st["peers"].items()),
                  markup=False)
    node = st.get("node_store") or {"mode": "off"}
    realising = node["mode"] != "off"
    if realising:
        out.print(_node_store_line(node))
    table = Table(_whole("environment"), "generation", "paths", "size", "present",
                  _whole("pinned by"), *(["in node store"] if realising else []))
    for e in envs:
        row = [escape(e["ref"]), str(e["generation"] or "-"),
               f"{e['paths_present']}/{e['paths']}", human_size(e["closure_bytes"]),
               "yes" if e["complete"] else human_size(e["present_bytes"]),
               escape(", ".join(e["pinned_by"]) or "-")]
        if realising:
            row.append("yes" if e.get("node_realised") else
                       human_size(e["node_rooted_bytes"]) if e.get("node_rooted_bytes")
                       else "no")
        table.add_row(*row)
    out.print(table)
    return exits.OK


def _whole(header: str) -> Column:
    """A column whose names fold onto more lines on a narrow terminal, never cut short."""
    return Column(header, overflow="fold")


# Pin holder prefixes (admin.py, kube/pods.py, kube/prewarm.py) -> what holds the pin.
_HOLDERS = {"env": "prewarm --pin (flox-node-cache unpin NAME)", "pod": "pods on this node",
            "prewarm": "EnvironmentPrewarm"}


def _pin_rows(holders: dict[str, int]) -> list[dict[str, Any]]:
    rows = []
    for holder, count in sorted(holders.items()):
        kind, sep, name = holder.partition(":")
        if not sep or kind not in _HOLDERS:
            kind, name = "", holder
        rows.append({"name": name, "holder": holder, "paths": count,
                     "kind": _HOLDERS.get(kind, "other")})
    return rows


async def pins(args: argparse.Namespace) -> int:
    try:
        _, st = await _call(str(args.socket), "GET", "/v1/status")
    except AgentUnreachable as e:
        return _unreachable(e)
    rows = _pin_rows(st["pins"])
    if args.json:
        print(json.dumps(rows, indent=1))
        return exits.OK
    table = Table(_whole("name"), "paths", "pinned by")
    for r in rows:
        table.add_row(escape(r["name"]), str(r["paths"]), escape(r["kind"]))
    console().print(table if rows else "no pins")
    return exits.OK


async def unpin(args: argparse.Namespace) -> int:
    name = args.name.removeprefix("env:")
    try:
        status, result = await _call(str(args.socket), "DELETE",
                                     f"/v1/pins/{quote(name, safe='/:@')}")
    except AgentUnreachable as e:
        return _unreachable(e)
    if status != 200:
        return _error(str(result.get("error", result)), exits.FAILED)
    print(f"unpinned {name}")
    return exits.OK


def _node_store_line(node: dict) -> str:
    """The node's own Nix store: rooted bytes of the budget, and what is wrong if anything."""
    line = (f"node store: {human_size(node['rooted_bytes'])} rooted of "
            f"{human_size(node['budget_bytes'])} budget, {node['rooted_paths']} paths")
    if node["over_budget"]:
        line += f", [yellow]over budget (not rooted): {escape(', '.join(node['over_budget']))}[/]"
    if node["state"] == "error":
        line += f" [red]{node['reason']}: {escape(node['error'])}[/]"
    for holder, error in node.get("holder_errors", {}).items():
        line += f"\n  [red]{escape(holder)}: {escape(error)}[/]"
    return line


async def gc(args: argparse.Namespace) -> int:
    try:
        _, result = await _call(str(args.socket), "POST", "/v1/gc", {"dry_run": args.dry_run})
    except AgentUnreachable as e:
        return _unreachable(e)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        verb = "would evict" if args.dry_run else "evicted"
        print(f"{verb} {len(result['evicted_files'])} entries, "
              f"{human_size(result['evicted_bytes'])}; used {human_size(result['used_before'])} "
              f"-> {human_size(result['used_after'])} of {human_size(result['budget_bytes'])}")
        for f in result["evicted_files"]:
            print(f"  {f}")
    return exits.OK


# --- verify ----------------------------------------------------------------------------------

def verify(args: argparse.Namespace) -> int:
    from agent.store.verify import verify_store

    if not (args.store / "nix-cache-info").exists():
        return _error(f"{args.store} is not a flox-node-cache store", exits.USAGE)
    try:
        report = verify_store(args.store, repair=args.repair, progress=not args.json)
    except sqlite3.DatabaseError as e:  # the agent rebuilds it at its next start
        return _error(f"the index of {args.store} is unusable ({e}); restart the agent to "
                      "rebuild it from the store's files", exits.FAILED)
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
    else:
        for problem in report.problems:
            print(f"{problem.kind}: {problem.file}: {problem.detail}", file=sys.stderr)
        print(f"checked {report.checked} NARs ({human_size(report.bytes)}): "
              f"{len(report.problems)} problem(s)" + (", repaired" if args.repair else ""))
    return exits.FAILED if report.problems else exits.OK


def human_size(n: float) -> str:
    """Binary units (KiB, MiB, ...), as the size settings use (1K = 1024): one unit system."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
