"""nginx (Debian) serving binary cache directories on loopback and on Unix sockets.

Static files with sendfile and keep-alive: the local limit of serving the same bytes.
One nginx process serves several roots, each on its own port and socket.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from loadtest.http import Conn, Target
from loadtest.procstat import children
from tests.support.agent import free_port
from tests.support.process import stop_process

NGINX = "/usr/sbin/nginx"

_CONF = """\
{user}worker_processes {workers};
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  tcp_nodelay on;
  keepalive_timeout 120;
  keepalive_requests 1000000;
  client_body_temp_path {dir}/client_body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  types {{ text/x-nix-narinfo narinfo; text/x-nix-cache-info nix-cache-info;
          application/x-nix-nar nar xz zst; }}
  default_type application/octet-stream;
{servers}
}}
"""

_SERVER = """\
  server {{
    listen 127.0.0.1:{port};
    listen unix:{sock};
    root {root};
  }}
"""


class Nginx:
    """`nginx -p DIR -c nginx.conf` serving `roots`; targets[root] gives (tcp, unix)."""

    def __init__(self, roots: list[Path], workers: int = 1) -> None:
        self.roots = [Path(r).resolve() for r in roots]
        self.workers = workers
        self.dir = Path(tempfile.mkdtemp(prefix="loadtest-nginx-"))
        self.targets: dict[Path, tuple[Target, Target]] = {}
        self.proc: subprocess.Popen[bytes] | None = None

    def _config(self) -> str:
        servers = []
        for i, root in enumerate(self.roots):
            tcp = Target(port=free_port())
            unix = Target(unix=str(self.dir / f"nginx-{i}.sock"))
            self.targets[root] = (tcp, unix)
            servers.append(_SERVER.format(port=tcp.port, sock=unix.unix, root=root))
        # As root, workers would otherwise drop to nobody and may not read the store.
        user = "user root;\n" if os.geteuid() == 0 else ""
        return _CONF.format(user=user, workers=self.workers, dir=self.dir,
                            servers="".join(servers))

    def start(self, timeout: float = 10) -> Nginx:
        (self.dir / "nginx.conf").write_text(self._config())
        log = (self.dir / "stderr.log").open("wb")
        self.proc = subprocess.Popen([NGINX, "-p", str(self.dir), "-c", "nginx.conf",
                                      "-e", str(self.dir / "error.log")],
                                     stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        tcp = self.targets[self.roots[0]][0]
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {(self.dir / 'error.log').read_text()}")
            try:
                Conn(tcp).get("/nix-cache-info")
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nginx did not start")

    def pids(self) -> list[int]:
        """The master and its workers (whose CPU time is what serving costs)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        return [self.proc.pid, *children(self.proc.pid)]

    def stop(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
