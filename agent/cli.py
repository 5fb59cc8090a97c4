"""The command line: run, prewarm, status, pins, unpin, gc, verify. Thin: parse, call, print.

The `run` options are generated from agent/config.py's settings; exit codes are agent/exits.py's.
"""

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import __version__, exits
from agent.config import ENV_PREFIX, SETTINGS, Config, ConfigError, Setting, load, setting_of


def _argument(s: Setting) -> dict[str, Any]:
    """argparse keywords for one setting. Values stay text: config.py converts and checks them,
    so a bad flag reads like a bad file or environment value ("--negative-ttl: 'abc' is ...")."""
    text = f"{s.meta['help']} (default {s.default_text()}; ${s.env})".replace("%", "%%")
    if s.kind is bool:
        return {"dest": s.field, "action": argparse.BooleanOptionalAction, "default": None,
                "help": text}
    metavar = s.meta["metavar"] or "{" + ",".join(s.meta["choices"]) + "}"
    return {"dest": s.field, "metavar": metavar, "help": text,
            **({"action": "append"} if s.kind is tuple else {})}


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, metavar="FILE",
                   help=f"TOML configuration file, keys as the options below "
                   f"(${ENV_PREFIX}CONFIG)")
    for s in SETTINGS:
        p.add_argument(s.flag, **_argument(s))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flox-node-cache",
        description="Node-local Nix binary cache for Flox pods. Every run option can also be "
        "set as FLOX_NODE_CACHE_<OPTION> (e.g. FLOX_NODE_CACHE_STORE_BUDGET=50G) or in the "
        "--config file; flags win over the environment, which wins over the file.",
        epilog=exits.SUMMARY)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the agent", description="Run the agent until "
                         "SIGTERM/SIGINT. Each option is also FLOX_NODE_CACHE_<OPTION> (lists "
                         "comma-separated) and the TOML key <option> of the --config file.")
    _run_options(run)

    pw = sub.add_parser("prewarm", help="prefetch an environment's closure and wait for it",
                        description="Prefetch a closure through the agent on this node (over "
                        "its socket) with a live progress bar; exits 0 only when the whole "
                        "closure is present and verified. Ctrl-C stops waiting, not the job: "
                        "--follow ID waits again, --cancel ID stops it. With --cluster, create "
                        "or update an EnvironmentPrewarm for every matching node instead.",
                        epilog=exits.SUMMARY)
    pw.add_argument("refs", nargs="*", metavar="OWNER/ENV[:N]", help="FloxHub environment")
    pw.add_argument("--lockfile", type=Path, metavar="FILE", help="a Flox manifest.lock")
    pw.add_argument("--store-path", dest="store_paths", action="append", default=[],
                    metavar="PATH", help="a store path (repeatable)")
    pw.add_argument("--system", help="Nix system (default: the agent's)")
    pin = pw.add_mutually_exclusive_group()
    pin.add_argument("--pin", dest="pin", action="store_true", default=None,
                     help="keep the closure from eviction (default with --cluster); a failed "
                     "prewarm leaves no pin")
    pin.add_argument("--no-pin", dest="pin", action="store_false")
    job = pw.add_mutually_exclusive_group()
    job.add_argument("--follow", metavar="ID", help="wait for a job already started")
    job.add_argument("--cancel", metavar="ID", help="cancel a running job")
    pw.add_argument("--json", action="store_true", help="print the final job as JSON")
    pw.add_argument("--cluster", action="store_true",
                    help="prewarm every matching node of the cluster (EnvironmentPrewarm)")
    pw.add_argument("--selector", action="append", default=[], metavar="KEY=VALUE",
                    help="with --cluster: node label selector (repeatable)")
    pw.add_argument("--wait", action="store_true",
                    help="with --cluster: wait until every matching node is Ready")
    pw.add_argument("--timeout", default="10m", metavar="DURATION",
                    help="with --cluster: deadline, e.g. 90s, 10m, 1h (default 10m)")
    pw.add_argument("--name", help="with --cluster: resource name (default: from the refs)")
    pw.add_argument("--ttl", metavar="DURATION",
                    help="with --cluster: release the pins and delete the prewarm this long "
                         "after every node finished (spec.ttlSecondsAfterFinished)")
    pw.add_argument("--delete", metavar="NAME",
                    help="with --cluster: delete the EnvironmentPrewarm NAME; every node "
                         "releases its pins")
    pw.add_argument("--kubeconfig", type=Path, metavar="FILE",
                    help="with --cluster: kubeconfig (default: $KUBECONFIG, ~/.kube/config, "
                         "then the in-cluster service account)")
    _socket_option(pw)

    st = sub.add_parser("status", help="environments and store usage of the agent on this node")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    _socket_option(st)

    pins = sub.add_parser("pins", help="what keeps closures from eviction",
                          description="List the pins of the agent on this node: environments "
                          "prewarmed with --pin (removable with `unpin`), environments of pods "
                          "running on the node, and EnvironmentPrewarm resources.")
    pins.add_argument("--json", action="store_true", help="machine-readable output")
    _socket_option(pins)

    unpin = sub.add_parser("unpin", help="drop the pin a prewarm --pin put on an environment",
                           description="Drop the pin `prewarm --pin` put on NAME (an "
                           "environment as given to prewarm, or a name `pins` lists); its "
                           "closure becomes evictable. Exits 1 when NAME is not pinned.")
    unpin.add_argument("name", metavar="NAME", help="e.g. acme/web")
    _socket_option(unpin)

    gc = sub.add_parser("gc", help="evict least-recently-used entries down to the budget",
                        description="Run an eviction pass now (pinned closures are kept).")
    gc.add_argument("--dry-run", action="store_true", help="only list what would be evicted")
    gc.add_argument("--json", action="store_true", help="machine-readable output")
    _socket_option(gc)

    vf = sub.add_parser("verify", help="re-hash the store against its narinfos",
                        description="Re-hash every NAR in the store against its narinfo and "
                        "report damaged entries and orphans; exits 1 when damage is found. "
                        "Works on the store directory directly (the agent may be running).")
    vf.add_argument("--store", type=Path, default=Config.store, metavar="DIR",
                    help=f"store directory (default {Config.store})")
    vf.add_argument("--repair", action="store_true",
                    help="remove damaged entries and orphans (they are refetched on demand)")
    vf.add_argument("--json", action="store_true", help="machine-readable output")

    relay = sub.add_parser("node-relay", help="relay a socket to the node's nix-daemon, as "
                           "this (non-root) uid",
                           description="Accept connections on --listen and pipe each to the "
                           "nix-daemon socket. Run it as a non-root uid: the daemon then treats "
                           "the agent's connections as untrusted (see agent/node/relay.py).")
    relay.add_argument("--listen", type=Path, required=True, metavar="PATH")
    relay.add_argument("--nix-daemon-socket", type=Path, metavar="PATH",
                       default=Config.nix_daemon_socket,
                       help=f"the daemon's socket (default {Config.nix_daemon_socket})")
    relay.add_argument("--log-format", choices=("text", "json"), default="text")
    return p


def _socket_option(p: argparse.ArgumentParser) -> None:
    env = setting_of("socket").env
    p.add_argument("--socket", type=Path, metavar="PATH",
                   default=Path(os.environ.get(env, str(Config.socket))),
                   help=f"the agent's Unix socket (default ${env} or {Config.socket})")


def cmd_run(args: argparse.Namespace) -> int:
    from agent import logs
    from agent.app import serve

    flags = {s.field: getattr(args, s.field) for s in SETTINGS}
    cfg = load(args.config, flags)
    logs.setup(cfg.log_format, cfg.log_level)
    for notice in cfg.notices:
        logging.getLogger("agent.config").warning(notice)  # a deprecated setting name
    try:
        import uvloop

        uvloop.run(serve(cfg))
    except KeyboardInterrupt:
        pass
    return exits.OK


def cmd_node_relay(args: argparse.Namespace) -> int:
    from agent import logs
    from agent.node import relay

    logs.setup(args.log_format, "info")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(relay.serve(args.listen, args.nix_daemon_socket))
    return exits.OK


def _client(name: str) -> Callable[[argparse.Namespace], int]:
    """The command `name` of cli_client (imported only when used: `run` never needs it)."""
    def command(args: argparse.Namespace) -> int:
        from agent import cli_client

        result = getattr(cli_client, name)(args)
        return asyncio.run(result) if asyncio.iscoroutine(result) else result
    return command


def cmd_prewarm(args: argparse.Namespace) -> int:
    if args.cluster:
        from agent.cli_cluster import prewarm_cluster_command

        return prewarm_cluster_command(args)
    return _client("prewarm")(args)


COMMANDS = {"run": cmd_run, "prewarm": cmd_prewarm, "status": _client("status"),
            "pins": _client("pins"), "unpin": _client("unpin"), "gc": _client("gc"),
            "verify": _client("verify"), "node-relay": cmd_node_relay}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"flox-node-cache: configuration error: {e}", file=sys.stderr)
        return exits.USAGE
    except KeyboardInterrupt:
        print("flox-node-cache: interrupted", file=sys.stderr)
        return exits.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
