"""Start the real agent through its CLI, as a separate process, on free loopback ports."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp

from tests.support.process import stop_process

_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing is bound to on `host` now (checked there when `host` is an address of
    this network namespace; on 127.0.0.1 otherwise), and never one handed out before: the port
    stays free only until its user binds it, and two draws before that must not collide."""
    while True:
        with socket.socket() as s:
            try:
                s.bind((host, 0))
            except OSError:  # an address of another namespace (a test host, netns.py)
                s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


class AgentProcess:
    """`flox-node-cache run` with its store, socket and ports in `workdir`."""

    def __init__(self, workdir: Path, upstreams: list[str], keys: list[str],
                 *extra: str, store: Path | None = None, env: dict[str, str] | None = None,
                 host: str = "127.0.0.1", wrap: list[str] | None = None) -> None:
        """`host`: the address every listener binds; `wrap`: a command prefix, such as
        `ip netns exec NS` to run the agent on a test host (tests/support/netns.py)."""
        self.workdir = workdir
        self.store = store or workdir / "store"
        self.socket = workdir / "run" / "agent.sock"
        self.port = free_port(host)
        self.metrics_port = free_port(host)
        self.log_path = workdir / "agent.log"
        self.host = host
        self.args = [
            *(wrap or []), sys.executable, "-m", "agent", "run",
            "--store", str(self.store), "--socket", str(self.socket),
            "--listen", f"{host}:{self.port}",
            "--metrics-listen", f"{host}:{self.metrics_port}",
            "--log-format", "json", "--log-level", "debug", "--kubernetes", "off",
            *[a for u in upstreams for a in ("--upstream", u)],
            *[a for k in keys for a in ("--trusted-public-key", k)],
            *extra,
        ]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}"

    def start(self, timeout: float = 20) -> "AgentProcess":
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=log, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited {self.proc.returncode}:\n{self.logs()}")
            try:
                with urllib.request.urlopen(self.metrics_url + "/readyz", timeout=1) as r:
                    if r.status == 200 and self.socket.exists():
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"agent not ready after {timeout}s:\n{self.logs()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        assert self.proc is not None
        return stop_process(self.proc, sig, timeout)  # type: ignore[return-value]

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def __enter__(self) -> "AgentProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def open_files(self) -> int:
        """How many descriptors the agent process holds."""
        assert self.proc is not None
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_records(self) -> list[dict]:
        out = []
        for line in self.logs().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 when absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(self.metrics_url + "/metrics", timeout=5) as r:
            text = r.read().decode()
        total = 0.0
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    def unix_session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(self.socket)))
