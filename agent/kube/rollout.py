"""CLI side of `prewarm --cluster`: create or update an EnvironmentPrewarm and wait for it.

The rollout gate: `flox-node-cache prewarm --cluster owner/env --wait && kubectl rollout ...`.

Exit codes of `prewarm_cluster` (the README's table):
  0  every matching node reported Ready for the current generation (or wait=False);
  1  at least one node reported Failed (for a reason other than the deadline);
  2  the API server rejected the EnvironmentPrewarm (e.g. the CRD's schema: a bad ref);
  4  timeout: some nodes were not Ready by the deadline (none failed otherwise);
  5  no node matches (label flox.dev/enabled=true plus the selector) while waiting;
  6  cannot talk to the cluster (no kubeconfig, unreachable until the deadline) or not allowed.
`timeout` bounds the whole command, every request included; transient API errors are retried
until then.
A node counts only once it reports `observedGeneration` equal to the resource's generation, so
a Ready left over from an earlier run never opens the gate.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes_asyncio.client import ApiClient, CoreV1Api, CustomObjectsApi
from rich.console import Console
from rich.filesize import decimal
from rich.live import Live
from rich.table import Table

from agent import exits
from agent.kube.calls import (
    EXIT_CLUSTER,
    EXIT_USAGE,
    ClusterError,
    Deadline,
    DeadlineExceeded,
)
from agent.kube.client import (
    ENABLED_LABEL,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    KubeConfigError,
    cli_kubeconfig,
    make_api_client,
)
from agent.kube.prewarm import DEADLINE_EXCEEDED, MERGE_PATCH

Obj = dict[str, Any]
# 2 and 3 keep their CLI-wide meanings (usage error, unreachable); these are specific.
EXIT_OK, EXIT_FAILED, EXIT_TIMEOUT, EXIT_NO_NODES = (exits.OK, exits.FAILED, exits.TIMED_OUT,
                                                  exits.NO_NODES)
POLL_INTERVAL = 1.0


def resource_name(refs: list[str]) -> str:
    """A stable DNS-1123 name for a set of refs: readable prefix plus a hash of the set."""
    digest = hashlib.sha256("\n".join(sorted(refs)).encode()).hexdigest()[:8]
    slug = re.sub(r"[^a-z0-9]+", "-", "-".join(sorted(refs)).lower()).strip("-")[:40]
    return f"{slug.rstrip('-')}-{digest}" if slug else f"prewarm-{digest}"


def _rfc3339(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


async def apply_prewarm(custom: CustomObjectsApi, name: str, spec: Obj,
                        deadline: Deadline) -> Obj:
    """Create the resource, or merge-patch the spec of an existing one; returns the object."""
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": name},
            "spec": spec}
    try:
        return await deadline.call(custom.create_cluster_custom_object, GROUP, VERSION, PLURAL,
                                   body)
    except ClusterError as e:
        if e.status != 409:  # AlreadyExists (maybe our own create, retried)
            raise
    old = await deadline.call(custom.get_cluster_custom_object, GROUP, VERSION, PLURAL, name)
    patch_spec = dict(spec)
    # a merge patch merges maps: null out the selector keys the new spec no longer has
    old_sel = (old.get("spec") or {}).get("nodeSelector") or {}
    patch_spec["nodeSelector"] = {**{k: None for k in old_sel}, **spec.get("nodeSelector", {})}
    for key in ("system", "ttlSecondsAfterFinished"):
        if key not in spec and key in (old.get("spec") or {}):
            patch_spec[key] = None
    return await deadline.call(custom.patch_cluster_custom_object, GROUP, VERSION, PLURAL,
                               name, {"spec": patch_spec}, _content_type=MERGE_PATCH)


async def matching_nodes(core: CoreV1Api, selector: dict[str, str],
                         deadline: Deadline) -> list[str]:
    labels = {ENABLED_LABEL: "true", **selector}
    nodes = await deadline.call(  # the watch cache is recent enough to know whom to wait for
        core.list_node, label_selector=",".join(f"{k}={v}" for k, v in labels.items()),
        resource_version="0")
    return sorted(n.metadata.name for n in nodes.items)


@dataclass
class NodeState:
    phase: str = "Unknown"
    message: str = ""
    paths: str = ""
    size: str = ""


def node_states(obj: Obj, nodes: list[str]) -> dict[str, NodeState]:
    """Per matching node, its report for the current generation (Unknown if none yet)."""
    gen = int(obj["metadata"].get("generation") or 1)
    reported = ((obj.get("status") or {}).get("nodes")) or {}
    out = {}
    for node in nodes:
        r = reported.get(node) or {}
        if int(r.get("observedGeneration") or 0) != gen:
            out[node] = NodeState(message="waiting for the agent")
            continue
        out[node] = NodeState(
            r.get("phase", "Unknown"), r.get("message", ""),
            f"{r.get('pathsDone', 0)}/{r.get('pathsTotal', 0)}",
            f"{decimal(r.get('bytesDone', 0))}/{decimal(r.get('bytesTotal', 0))}")
    return out


def render(name: str, states: dict[str, NodeState], remaining: float) -> Table:
    table = Table(title=f"EnvironmentPrewarm {name}  ({max(0, int(remaining))} s left)")
    for col in ("node", "phase", "paths", "bytes", "message"):
        table.add_column(col)
    colours = {"Ready": "green", "Failed": "red", "Pulling": "yellow"}
    for node, s in states.items():
        phase = f"[{colours.get(s.phase, 'dim')}]{s.phase}[/]"
        table.add_row(node, phase, s.paths, s.size, s.message)
    return table


def verdict(states: dict[str, NodeState], *, timed_out: bool) -> int | None:
    """The exit code once decided, None while nodes are still working."""
    failed = [s for s in states.values() if s.phase == "Failed"]
    settled = all(s.phase in ("Ready", "Failed") for s in states.values())
    if any(not s.message.startswith(DEADLINE_EXCEEDED) for s in failed) and (
            settled or timed_out):
        return EXIT_FAILED
    if all(s.phase == "Ready" for s in states.values()):
        return EXIT_OK
    if timed_out or (failed and settled):
        return EXIT_TIMEOUT
    return None


async def wait_ready(api: ApiClient, name: str, selector: dict[str, str], deadline: Deadline,
                     console: Console, poll: float = POLL_INTERVAL) -> int:
    custom, core = CustomObjectsApi(api), CoreV1Api(api)
    states: dict[str, NodeState] | None = None
    with Live(console=console, auto_refresh=False, transient=False) as live:
        while True:
            try:
                nodes = await matching_nodes(core, selector, deadline)  # nodes join and leave
                obj = await deadline.call(custom.get_cluster_custom_object, GROUP, VERSION,
                                          PLURAL, name)
            except DeadlineExceeded:
                if states is None:
                    raise  # never got an answer: cannot reach the cluster
                # else the last state seen decides, naming the late nodes
            else:
                if not nodes:
                    console.print("[red]no node matches any more[/red]")
                    return EXIT_NO_NODES
                states = node_states(obj, nodes)
            remaining = deadline.remaining()
            live.update(render(name, states, remaining), refresh=True)
            code = verdict(states, timed_out=remaining <= 0)
            if code is not None:
                _summary(console, states, code)
                return code
            await asyncio.sleep(min(poll, max(remaining, 0.05)))


def _summary(console: Console, states: dict[str, NodeState], code: int) -> None:
    if code == EXIT_OK:
        console.print(f"[green]all {len(states)} node(s) ready[/green]")
        return
    for node, s in states.items():
        if s.phase != "Ready":
            word = "failed" if s.phase == "Failed" else "not ready"
            console.print(f"[red]{node}: {word} ({s.phase}): {s.message or 'no report'}[/red]")


async def prewarm_cluster(*, refs: list[str], selector: dict[str, str], pin: bool, wait: bool,
                          timeout: float, kubeconfig: str | None, name: str | None,
                          console: Console, poll: float = POLL_INTERVAL,
                          ttl: float | None = None) -> int:
    """Create/update the EnvironmentPrewarm; with `wait`, gate on every matching node."""
    deadline = Deadline(timeout)
    return await _with_api(kubeconfig, console, lambda api: _prewarm_cluster(
        api, refs, selector, pin, wait, timeout, name, deadline, console, poll, ttl))


async def delete_prewarm(name: str, *, timeout: float, kubeconfig: str | None,
                         console: Console) -> int:
    """Delete an EnvironmentPrewarm: every node releases its pins (nodes down meanwhile do
    when they return)."""
    deadline = Deadline(timeout)

    async def delete(api: ApiClient) -> int:
        try:
            await deadline.call(CustomObjectsApi(api).delete_cluster_custom_object, GROUP,
                                VERSION, PLURAL, name)
        except ClusterError as e:
            if e.status != 404:
                raise
            console.print(f"[red]error:[/] EnvironmentPrewarm {name} not found")
            return EXIT_USAGE
        console.print(f"EnvironmentPrewarm [bold]{name}[/bold] deleted; its pins are released "
                      "on every node")
        return EXIT_OK

    return await _with_api(kubeconfig, console, delete)


async def _with_api(kubeconfig: str | None, console: Console,
                    run: Callable[[ApiClient], Awaitable[int]]) -> int:
    """Run a command against the cluster; configuration and API errors are one-line messages
    with their exit code."""
    try:
        api = await make_api_client(cli_kubeconfig(kubeconfig))
    except KubeConfigError as e:
        console.print(f"[red]error:[/] {e}")
        return EXIT_CLUSTER
    try:
        return await run(api)
    except ClusterError as e:
        console.print(f"[red]error:[/] {e}", soft_wrap=True)
        return e.code
    finally:
        await api.close()


async def _prewarm_cluster(api: ApiClient, refs: list[str], selector: dict[str, str], pin: bool,
                           wait: bool, timeout: float, name: str | None, deadline: Deadline,
                           console: Console, poll: float, ttl: float | None) -> int:
    name = name or resource_name(refs)
    spec: Obj = {"environments": list(refs), "nodeSelector": dict(selector), "pin": pin,
                 "deadline": _rfc3339(datetime.now(UTC) + timedelta(seconds=timeout))}
    if ttl is not None:
        spec["ttlSecondsAfterFinished"] = int(ttl)
    nodes = await matching_nodes(CoreV1Api(api), selector, deadline)
    if not nodes and wait:
        console.print(f"[red]no Flox node matches ({ENABLED_LABEL}=true"
                      + "".join(f", {k}={v}" for k, v in selector.items())
                      + "): nothing to wait for[/red]")
        return EXIT_NO_NODES
    obj = await apply_prewarm(CustomObjectsApi(api), name, spec, deadline)
    gen = obj["metadata"].get("generation")
    console.print(f"EnvironmentPrewarm [bold]{name}[/bold] (generation {gen}) targets "
                  f"{len(nodes)} node(s)")
    if not nodes:
        console.print("[yellow]no Flox node matches yet; nodes that join will act on it"
                      "[/yellow]")
    if not wait:
        return EXIT_OK
    return await wait_ready(api, name, selector, deadline, console, poll)
