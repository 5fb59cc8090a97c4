"""The node's Nix store as an untrusted client sees it, through `nix-store --store unix://...`.

The `nix` CLI rather than a Python client of the worker protocol: `nix-store -r PATH
--add-root LINK` realises and roots in one connection, whose temporary roots leave no window
for a GC in between, and the protocol version negotiation and every daemon's quirks stay
Nix's own business. Each failure carries a reason (metrics label, status) and Nix's message.
"""

import asyncio
import os
import re
import shutil
import tempfile
import weakref
from pathlib import Path

from agent.node.relay import peer_uid

# stderr pattern -> reason; the first match wins.
_REASONS = (
    (r"cannot connect to socket|Connection refused|Connection reset|No such file or directory"
     r".*socket", "daemon_unreachable"),
    (r"not signed by any of the keys|lacks a valid signature", "refused"),
    (r"don't know how to build|no substituter|is not valid", "not_substitutable"),
    (r"Couldn't connect to server|unable to download|HTTP error", "substituter_error"),
)
HINTS = {
    "socket_missing": "is Nix installed on this node and --nix-daemon-socket right?",
    "daemon_unreachable": "is the node's nix-daemon (or the node-relay) running?",
    "trusted_connection": "the agent runs as root and would be a trusted client: point "
                          "--nix-daemon-socket at the node-relay, which runs as a non-root uid",
    "not_substitutable": "the node's nix-daemon cannot substitute it: does its nix.conf list "
                         "the agent in `substituters` (node-config overlay) and was it "
                         "restarted since?",
    "refused": "the node's nix-daemon refused the path (signature not trusted by the node?)",
}


class NodeStoreError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        hint = HINTS.get(reason)
        super().__init__(f"{message} ({hint})" if hint else message)
        self.reason = reason


def classify(stderr: str) -> str:
    for pattern, reason in _REASONS:
        if re.search(pattern, stderr):
            return reason
    return "failed"


def _error_line(stderr: str) -> str:
    """Nix's warnings (why a substitute was not taken) and its first error, on one line."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    said = [ln for ln in lines if ln.startswith("warning:")][-2:] + \
        [ln for ln in lines if ln.startswith("error:")][:1]
    return "; ".join(said or lines[-1:] or ["nix-store failed without a message"])[:1000]


class NodeStore:
    def __init__(self, socket: Path, *, timeout: float = 1800.0) -> None:
        self.socket = socket
        self.timeout = timeout
        self._env: dict[str, str] | None = None

    def _client_env(self) -> dict[str, str]:
        """HOME, caches and an empty NIX_CONF_DIR of our own (removed at exit): nothing from
        the image or the agent's environment reaches the client; the daemon decides."""
        if self._env is None:
            home = tempfile.mkdtemp(prefix="flox-node-cache-nix-")
            weakref.finalize(self, shutil.rmtree, home, True)
            self._env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home,
                         "XDG_CACHE_HOME": home, "NIX_CONF_DIR": home,
                         "NIX_REMOTE": f"unix://{self.socket}"}
        return self._env

    def check(self) -> None:
        """Raise NodeStoreError unless the socket answers and the daemon will not trust us."""
        if not self.socket.exists():
            raise NodeStoreError("socket_missing", f"no nix-daemon socket at {self.socket}")
        try:
            uid = peer_uid(self.socket)
        except OSError as e:
            raise NodeStoreError("daemon_unreachable",
                                 f"{self.socket}: {e.strerror or e}") from None
        if os.geteuid() == 0 and uid == 0:
            raise NodeStoreError("trusted_connection",
                                 f"{self.socket} is served by root, and so are we")

    async def invalid(self, paths: list[str]) -> set[str]:
        """The paths among `paths` that are not valid in the node's store."""
        if not paths:
            return set()
        out = await self._run("--check-validity", "--print-invalid", *paths)
        return set(out.split())

    async def realise(self, path: str, link: Path) -> None:
        """Make `path`'s closure valid in the node's store and root it at `link`."""
        await self._run("--realise", path, "--add-root", str(link))

    async def _run(self, *args: str) -> str:
        try:
            proc = await asyncio.create_subprocess_exec(
                "nix-store", "--store", f"unix://{self.socket}", *args, env=self._client_env(),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
        except OSError as e:
            raise NodeStoreError("nix_missing", f"cannot run nix-store: {e.strerror}") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self.timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise NodeStoreError("timeout", f"nix-store {args[0]} took over "
                                            f"{self.timeout:.0f}s") from None
        except asyncio.CancelledError:
            proc.kill()
            raise
        if proc.returncode != 0:
            stderr = err.decode(errors="replace")
            raise NodeStoreError(classify(stderr), _error_line(stderr))
        return out.decode()
