"""The command line: run, prewarm, status, gc, verify. Thin: parse, call, print.

Exit codes: 0 success, 1 the operation failed (a failed prewarm, damage found), 2 usage or
configuration error, 3 the agent could not be reached.
"""

import argparse
import asyncio
import os
import sys
from pathlib import Path

from agent import __version__
from agent.config import ConfigError, load

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


def _run_options(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--config", type=Path, metavar="FILE",
      help="TOML configuration file (keys as the long options, with - or _)")
    a("--store", type=Path, metavar="DIR", help="store directory, a valid file:// binary cache "
      "(default ./var/store)")
    a("--socket", type=Path, metavar="PATH", help="Unix socket: cache protocol and admin API "
      "(default ./var/run/agent.sock)")
    a("--socket-group", metavar="GROUP", help="group owning the 0660 socket")
    a("--listen", metavar="HOST:PORT", help="loopback cache listener, read-only "
      "(default 127.0.0.1:37515)")
    a("--metrics-listen", metavar="HOST:PORT", help="/metrics, /healthz, /readyz "
      "(default 127.0.0.1:37516)")
    a("--upstream", dest="upstreams", action="append", metavar="URL",
      help="upstream binary cache, repeatable, in priority order "
      "(default cache.nixos.org, cache.flox.dev)")
    a("--trusted-public-key", dest="trusted_public_keys", action="append", metavar="NAME:KEY",
      help="key whose signatures upstream narinfos must carry, repeatable "
      "(default the keys of the default upstreams)")
    a("--no-require-signatures", dest="require_signatures", action="store_const", const=False,
      help="accept unsigned upstream narinfos (NarHash is still verified)")
    a("--signing-key-file", type=Path, metavar="FILE",
      help="secret key (nix-store --generate-binary-cache-key) to add our own signature")
    a("--priority", type=int, help="Priority in nix-cache-info; lower is preferred (default 10)")
    a("--store-budget", metavar="SIZE|PCT", help="store size budget: 50G, or 80%% of the "
      "filesystem (default 80%%)")
    a("--gc-high-watermark", type=float, metavar="RATIO",
      help="start evicting above this share of the budget (default 0.95)")
    a("--gc-low-watermark", type=float, metavar="RATIO",
      help="evict down to this share of the budget (default 0.85)")
    a("--gc-interval", type=float, metavar="SECONDS",
      help="seconds between eviction checks (default 30)")
    a("--scrub-interval", type=float, metavar="SECONDS",
      help="seconds between background re-hash passes, 0 to disable (default 3600)")
    a("--scrub-rate", metavar="SIZE", help="bytes per second the scrub may read (default 20M)")
    a("--recompress", choices=("zstd", "uncompressed", "none"),
      help="re-encode ingested NARs so clients unpack them fast: zstd (default), "
      "uncompressed (fastest, more disk), or none (keep the upstream encoding)")
    a("--recompress-level", type=int, metavar="N", help="zstd level (default 3)")
    a("--recompress-grace", type=float, metavar="SECONDS",
      help="how long the original encoding stays servable for clients holding its narinfo "
      "(default 3600)")
    a("--upstream-connect-timeout", type=float, metavar="SECONDS", help="default 5")
    a("--upstream-read-timeout", type=float, metavar="SECONDS",
      help="longest silence in an upstream response (default 30)")
    a("--upstream-narinfo-timeout", type=float, metavar="SECONDS",
      help="whole upstream narinfo request (default 10)")
    a("--circuit-failures", type=int, metavar="N",
      help="consecutive errors that take an upstream out of use (default 3)")
    a("--circuit-cooldown", type=float, metavar="SECONDS",
      help="how long an upstream stays out of use (default 30)")
    a("--negative-ttl", type=float, metavar="SECONDS",
      help="how long a path no upstream has is remembered as missing (default 30)")
    a("--prefetch-concurrency", type=int, metavar="N", help="parallel fetches per prewarm "
      "(default 8)")
    a("--floxhub-git-url", metavar="URL",
      help="FloxHub git base; remotes are URL/<owner>/floxmeta (default https://api.flox.dev/git)")
    a("--floxhub-token-file", type=Path, metavar="FILE",
      help="file holding a FloxHub token for private environments (never logged)")
    a("--generation-watch-interval", type=float, metavar="SECONDS",
      help="how often environments in use are checked for a new generation (default 60)")
    a("--system", help="Nix system of this node (default: detected, e.g. x86_64-linux)")
    a("--kubernetes", choices=("auto", "on", "off"),
      help="watch the Kubernetes API: auto = when in a cluster or --kubeconfig is given")
    a("--kubeconfig", type=Path, metavar="FILE", help="kubeconfig (default in-cluster)")
    a("--node-name", metavar="NAME", help="this node's name (default $NODE_NAME)")
    a("--peer", dest="peers", action="append", metavar="URL",
      help="another node's agent (its --peer-listen as http://HOST:PORT), repeatable")
    a("--peer-listen", metavar="HOST:PORT", help="listener for other nodes' agents, the "
      "address peers reach this node at (default off)")
    a("--peer-token-file", type=Path, metavar="FILE",
      help="cluster-shared secret peers authenticate with (required with peers)")
    a("--peer-service", metavar="NAME", help="headless Service whose ready endpoints are the "
      "peers (EndpointSlices, watched; needs the Kubernetes API)")
    a("--peer-namespace", metavar="NS", help="namespace of --peer-service (default "
      "$POD_NAMESPACE, else the service account's)")
    a("--peer-timeout", type=float, metavar="SECONDS",
      help="connect timeout to a peer; a failing peer is skipped for --circuit-cooldown "
      "(default 1)")
    a("--log-format", choices=("text", "json"), help="default text")
    a("--log-level", choices=("debug", "info", "warning", "error"), help="default info")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flox-node-cache",
        description="Node-local Nix binary cache for Flox pods. Every run option can also be "
        "set as FLOX_NODE_CACHE_<OPTION> (e.g. FLOX_NODE_CACHE_STORE_BUDGET=50G) or in the "
        "--config file; flags win over the environment, which wins over the file.",
        epilog="exit codes: 0 ok, 1 failed, 2 usage/configuration error, 3 agent unreachable, "
        "4 prewarm --cluster --wait timed out, 5 no node matches the prewarm")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the agent", description="Run the agent until "
                         "SIGTERM/SIGINT.")
    _run_options(run)

    pw = sub.add_parser("prewarm", help="prefetch an environment's closure and wait for it",
                        description="Prefetch a closure through the agent on this node (over "
                        "its socket) with a live progress bar; exits 0 only when the whole "
                        "closure is present and verified. With --cluster, create or update an "
                        "EnvironmentPrewarm for every matching node instead.")
    pw.add_argument("refs", nargs="*", metavar="OWNER/ENV[:N]", help="FloxHub environment")
    pw.add_argument("--lockfile", type=Path, metavar="FILE", help="a Flox manifest.lock")
    pw.add_argument("--store-path", dest="store_paths", action="append", default=[],
                    metavar="PATH", help="a store path (repeatable)")
    pw.add_argument("--system", help="Nix system (default: the agent's)")
    pin = pw.add_mutually_exclusive_group()
    pin.add_argument("--pin", dest="pin", action="store_true", default=None,
                     help="keep the closure from eviction (default with --cluster)")
    pin.add_argument("--no-pin", dest="pin", action="store_false")
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
    pw.add_argument("--kubeconfig", type=Path, metavar="FILE",
                    help="with --cluster: kubeconfig (default: $KUBECONFIG, ~/.kube/config)")
    _socket_option(pw)

    st = sub.add_parser("status", help="environments and store usage of the agent on this node")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    _socket_option(st)

    gc = sub.add_parser("gc", help="evict least-recently-used entries down to the budget",
                        description="Run an eviction pass now (pinned closures are kept).")
    gc.add_argument("--dry-run", action="store_true", help="only list what would be evicted")
    gc.add_argument("--json", action="store_true", help="machine-readable output")
    _socket_option(gc)

    vf = sub.add_parser("verify", help="re-hash the store against its narinfos",
                        description="Re-hash every NAR in the store against its narinfo and "
                        "report damaged entries and orphans; exits 1 when damage is found. "
                        "Works on the store directory directly (the agent may be running).")
    vf.add_argument("--store", type=Path, default=Path("var/store"), metavar="DIR",
                    help="store directory (default ./var/store)")
    vf.add_argument("--repair", action="store_true",
                    help="remove damaged entries and orphans (they are refetched on demand)")
    vf.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _socket_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", type=Path, metavar="PATH",
                   default=Path(os.environ.get("FLOX_NODE_CACHE_SOCKET", "var/run/agent.sock")),
                   help="the agent's Unix socket (default $FLOX_NODE_CACHE_SOCKET or "
                   "./var/run/agent.sock)")


def _config(args: argparse.Namespace) -> "object":
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config", "func")}
    return load(args.config, flags)


def cmd_run(args: argparse.Namespace) -> int:
    from agent import logs
    from agent.app import serve

    cfg = _config(args)
    logs.setup(cfg.log_format, cfg.log_level)  # type: ignore[attr-defined]
    try:
        import uvloop

        uvloop.run(serve(cfg))  # type: ignore[arg-type]
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def cmd_prewarm(args: argparse.Namespace) -> int:
    if args.cluster:
        from agent.cli_cluster import prewarm_cluster_command

        return prewarm_cluster_command(args)
    from agent import cli_client

    return asyncio.run(cli_client.prewarm(args))


def cmd_status(args: argparse.Namespace) -> int:
    from agent import cli_client

    return asyncio.run(cli_client.status(args))


def cmd_gc(args: argparse.Namespace) -> int:
    from agent import cli_client

    return asyncio.run(cli_client.gc(args))


def cmd_verify(args: argparse.Namespace) -> int:
    from agent import cli_client

    return cli_client.verify(args)


COMMANDS = {"run": cmd_run, "prewarm": cmd_prewarm, "status": cmd_status, "gc": cmd_gc,
            "verify": cmd_verify}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"flox-node-cache: configuration error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
