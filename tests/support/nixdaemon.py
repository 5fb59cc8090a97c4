"""A real node: `nix-daemon` on a chroot store, and an untrusted client playing the shim.

    with scratch_dir() as d, NixDaemon(d, substituters=[agent.url], keys=[pk]) as node:
        node.realise(path)              # as uid 65534, like the containerd shim
        assert node.valid(path)
        node.gc()

The daemon runs as root (as on a node) with its own socket, nix.conf and narinfo disk cache
and a clean environment (REFERENCE §6); its store lives under `root/nix/store`. Client
commands run as `UNTRUSTED` through `setpriv`, so the daemon treats them as it treats the
shim: substitution only from the daemon's own substituters, signatures required.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.support.process import stop_process

UNTRUSTED = 65534  # nobody: neither root nor in trusted-users
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def daemon_config(substituters: list[str], keys: list[str], extra: str = "") -> str:
    """The node's nix.conf: root without build users, signatures required, no disk caching
    of narinfo lookups (each test's daemon starts cold)."""
    return (
        "build-users-group =\n"
        "sandbox = false\n"
        f"substituters = {' '.join(substituters)}\n"
        f"trusted-public-keys = {' '.join(keys)}\n"
        "require-sigs = true\n"
        "narinfo-cache-negative-ttl = 0\n"
        "narinfo-cache-positive-ttl = 0\n"
        "connect-timeout = 2\n"
        "download-attempts = 1\n"
        + extra
    )


def as_untrusted(argv: list[str], uid: int = UNTRUSTED) -> list[str]:
    """`argv` run as `uid`, with no supplementary groups and a clean environment."""
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
            "env", "-i", f"PATH={PATH}", "HOME=/nonexistent", *argv]


@contextlib.contextmanager
def scratch_dir(prefix: str = "nixdaemon-") -> Iterator[Path]:
    """A directory UNTRUSTED can reach, removed afterwards (store files included).

    Not under pytest's tmp_path: a concurrent pytest session resets /tmp/pytest-of-<user> to
    0700, which would cut the untrusted client and the relay off mid-test."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    try:
        yield path
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(path)], check=False, capture_output=True)
        shutil.rmtree(path, ignore_errors=True)


def open_up(path: Path) -> None:
    """Let UNTRUSTED traverse every directory from `/` down to `path` (mkdtemp makes 0700)."""
    for p in [path, *path.parents]:
        if p.exists() and p.is_dir() and p.stat().st_uid == 0:
            p.chmod(p.stat().st_mode | 0o005)


class NixDaemon:
    """A nix-daemon serving the chroot store at `workdir/root`.

    `nix_conf` is the daemon's whole nix.conf (default: daemon_config(substituters, keys)).
    Restart with `restart()` after editing `conf_dir/nix.conf`: the daemon reads it at start.
    """

    def __init__(self, workdir: Path, *, substituters: list[str] = (), keys: list[str] = (),
                 nix_conf: str | None = None) -> None:
        self.workdir = Path(workdir)
        self.root = self.workdir / "root"
        self.conf_dir = self.workdir / "etc-nix"
        self.socket = self.workdir / "daemon" / "socket"
        self.cache_home = self.workdir / "xdg-cache"
        self.log_path = self.workdir / "daemon.log"
        self.nix_conf = nix_conf if nix_conf is not None else \
            daemon_config(list(substituters), list(keys))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def store_url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout: float = 10) -> NixDaemon:
        for d in (self.root, self.conf_dir, self.socket.parent, self.cache_home):
            d.mkdir(parents=True, exist_ok=True)
        if not (self.conf_dir / "nix.conf").exists():
            (self.conf_dir / "nix.conf").write_text(self.nix_conf)
        open_up(self.socket.parent)
        self.socket.unlink(missing_ok=True)
        env = {"PATH": PATH, "HOME": str(self.workdir), "NIX_CONF_DIR": str(self.conf_dir),
               "NIX_DAEMON_SOCKET_PATH": str(self.socket),
               "XDG_CACHE_HOME": str(self.cache_home)}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(["nix-daemon", "--store", str(self.root)], env=env,
                                         stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nix-daemon did not start:\n{self.logs()}")
            time.sleep(0.02)
        self.socket.chmod(0o666)
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        shutil.rmtree(self.cache_home, ignore_errors=True)
        self.start()

    def __enter__(self) -> NixDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # --- clients -------------------------------------------------------------------------

    def client(self, *args: str, uid: int | None = UNTRUSTED, timeout: float = 120) \
            -> subprocess.CompletedProcess[str]:
        """`nix-store --store unix://SOCKET ARGS` as `uid` (None: as root, a trusted client)."""
        argv = ["nix-store", "--store", self.store_url, *args]
        if uid is not None:
            argv = as_untrusted(argv, uid)
        env = None if uid is not None else {"PATH": PATH, "HOME": str(self.workdir),
                                            "XDG_CACHE_HOME": str(self.cache_home)}
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout,
                               check=False)

    def realise(self, *paths: str, uid: int | None = UNTRUSTED) \
            -> subprocess.CompletedProcess[str]:
        """Be the shim starting a pod: realise `paths` through the daemon."""
        return self.client("-r", *paths, uid=uid)

    def valid(self, path: str) -> bool:
        return self.client("--check-validity", path, uid=None).returncode == 0

    def gc(self) -> str:
        """`nix-store --gc` as root on the node; returns its output."""
        proc = self.client("--gc", uid=None)
        if proc.returncode != 0:
            raise RuntimeError(f"nix-store --gc failed:\n{proc.stderr}")
        return proc.stdout + proc.stderr


REPO = Path(__file__).resolve().parents[2]


class NodeRelay:
    """The agent's node-relay (agent/node/relay.py) as the DaemonSet's sidecar runs it: a
    separate process, as UNTRUSTED, in front of `daemon`'s socket. The system python runs
    a copy of the package beside the daemon (the relay needs only the standard library, and
    neither the test venv nor a checkout under a 0700 directory is readable by UNTRUSTED)."""

    def __init__(self, daemon: NixDaemon, listen: Path | None = None) -> None:
        self.daemon = daemon
        self.socket = listen or daemon.workdir / "relay" / "socket"
        self.log_path = daemon.workdir / "relay.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10) -> NodeRelay:
        self.socket.parent.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.socket.parent, UNTRUSTED, UNTRUSTED)
        open_up(self.socket.parent)
        code = ("import asyncio, sys; from pathlib import Path; from agent.node import relay; "
                "asyncio.run(relay.serve(Path(sys.argv[1]), Path(sys.argv[2])))")
        argv = as_untrusted(["/usr/bin/python3", "-c", code, str(self.socket),
                             str(self.daemon.socket)])
        argv.insert(argv.index("HOME=/nonexistent"), f"PYTHONPATH={self._readable_code()}")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"node relay did not start:\n{self.log_path.read_text()}")
            time.sleep(0.02)
        return self

    def _readable_code(self) -> Path:
        """A copy of the `agent` package that UNTRUSTED can import."""
        code = self.daemon.workdir / "relay-code"
        if not code.exists():
            shutil.copytree(REPO / "agent", code / "agent",
                            ignore=shutil.ignore_patterns("__pycache__"))
            subprocess.run(["chmod", "-R", "a+rX", str(code)], check=True)
            open_up(code)
        return code

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def __enter__(self) -> NodeRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
