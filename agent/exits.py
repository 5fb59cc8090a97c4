"""Exit codes of every flox-node-cache command, in one place (documented in README.md and in
`flox-node-cache --help`); scripts rely on them, so a number never changes meaning."""

OK = 0
FAILED = 1           # the operation failed: a prewarm (on this node or some node), damage found
USAGE = 2            # bad command line or configuration
UNREACHABLE = 3      # the agent's Unix socket cannot be reached
TIMED_OUT = 4        # prewarm --cluster --wait passed its --timeout (the late nodes are named)
NO_NODES = 5         # no node matches the prewarm --cluster selector
CLUSTER_ERROR = 6    # the Kubernetes API cannot be reached, or refuses us (auth, RBAC)
INTERRUPTED = 130    # Ctrl-C (128 + SIGINT), as shells report it

SUMMARY = (f"exit codes: {OK} ok, {FAILED} failed, {USAGE} usage or configuration error, "
           f"{UNREACHABLE} agent unreachable, {TIMED_OUT} prewarm --cluster --wait timed out, "
           f"{NO_NODES} no node matches the prewarm, {CLUSTER_ERROR} cannot talk to the cluster "
           f"(unreachable, unauthenticated or not allowed), {INTERRUPTED} interrupted")
