"""`flox-node-cache prewarm --cluster`: create or update an EnvironmentPrewarm and wait for it."""

import argparse
import asyncio
import re

from rich.console import Console

from agent import exits
from agent.cli_client import err

_DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


def parse_duration(text: str) -> float:
    """`90`, `90s`, `10m`, `1h30m` -> seconds."""
    if text.isdigit():
        return float(text)
    m = _DURATION.fullmatch(text)
    if not m or not any(m.groups()):
        raise ValueError(f"{text!r} is not a duration such as 90s, 10m or 1h")
    h, mi, s = (int(g or 0) for g in m.groups())
    return float(h * 3600 + mi * 60 + s)


def parse_selector(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"selector {item!r} is not KEY=VALUE")
        out[key] = value
    return out


def prewarm_cluster_command(args: argparse.Namespace) -> int:
    from agent.kube.rollout import delete_prewarm, prewarm_cluster

    if bool(args.refs) == bool(args.delete) or args.lockfile or args.store_paths:
        err.print("[red]error:[/] --cluster takes environment refs (owner/env[:N]), "
                  "or --delete NAME")
        return exits.USAGE
    try:
        timeout = parse_duration(args.timeout)
        selector = parse_selector(args.selector)
        ttl = parse_duration(args.ttl) if args.ttl else None
    except ValueError as e:
        err.print(f"[red]error:[/] {e}")
        return exits.USAGE
    kubeconfig = str(args.kubeconfig) if args.kubeconfig else None
    if args.delete:
        return asyncio.run(delete_prewarm(args.delete, timeout=timeout, kubeconfig=kubeconfig,
                                          console=Console(stderr=True)))
    return asyncio.run(prewarm_cluster(
        refs=args.refs, selector=selector, pin=args.pin is not False, wait=args.wait,
        timeout=timeout, kubeconfig=kubeconfig, name=args.name, console=Console(stderr=True),
        ttl=ttl))
