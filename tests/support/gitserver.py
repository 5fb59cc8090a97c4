"""Git's own smart HTTP on loopback: `git http-backend` (CGI) behind a threaded http.server.

Serves every repository under a root (e.g. a `Floxmeta` root: `/<owner>/floxmeta`), optionally
behind basic auth as FloxHub does (username `oauth`, the token as password).
"""

import base64
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

_EXEC_PATH = subprocess.run(["git", "--exec-path"], check=True, capture_output=True,
                            text=True).stdout.strip()
HTTP_BACKEND = str(Path(_EXEC_PATH) / "git-http-backend")


class GitHTTPServer:
    def __init__(self, root: Path, token: str | None = None) -> None:
        self.root = root
        self.token = token  # may be changed while running (token rotation)
        self.requests: list[tuple[str, str]] = []  # (method, path?query)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "GitHTTPServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "GitHTTPServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def authorized(self, header: str | None) -> bool:
        if self.token is None:
            return True
        expected = base64.b64encode(f"oauth:{self.token}".encode()).decode()
        return header == f"Basic {expected}"


def dead_url() -> str:
    """A loopback URL where nothing listens: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _handler_for(server: GitHTTPServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_CGIHandler):
        git = server
    return Handler


class _CGIHandler(BaseHTTPRequestHandler):
    git: GitHTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _serve(self) -> None:
        self.git.requests.append((self.command, self.path))
        if not self.git.authorized(self.headers.get("Authorization")):
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="floxhub"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        proc = subprocess.Popen([HTTP_BACKEND], env=self._cgi_env(), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert proc.stdin is not None and proc.stdout is not None
        # Feed the body from another thread so a large response cannot deadlock us.
        feeder = threading.Thread(target=self._feed_body, args=(proc.stdin,), daemon=True)
        feeder.start()
        self._relay_response(proc.stdout)
        feeder.join()
        proc.wait()

    def _cgi_env(self) -> dict[str, str]:
        path, _, query = self.path.partition("?")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": str(self.git.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REQUEST_METHOD": self.command,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "REMOTE_ADDR": self.client_address[0],
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "GIT_CONFIG_GLOBAL": "/dev/null",
            "GIT_CONFIG_NOSYSTEM": "1",
        }
        if self.git.token is not None:
            env["REMOTE_USER"] = "oauth"
        for header in ("Content-Length", "Content-Encoding", "Git-Protocol"):
            if header in self.headers:
                env["HTTP_" + header.upper().replace("-", "_")] = self.headers[header]
        if "Content-Length" in self.headers:
            env["CONTENT_LENGTH"] = self.headers["Content-Length"]
        return env

    def _feed_body(self, sink: IO[bytes]) -> None:
        try:
            for chunk in self._body_chunks():
                sink.write(chunk)
        except BrokenPipeError:
            pass
        finally:
            sink.close()

    def _body_chunks(self) -> Iterator[bytes]:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                yield self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 65536))
            if not chunk:
                return
            remaining -= len(chunk)
            yield chunk

    def _relay_response(self, out: IO[bytes]) -> None:
        status, headers = "200 OK", []
        while (line := out.readline().rstrip(b"\r\n")):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "status":
                status = value.strip()
            else:
                headers.append((name, value.strip()))
        code, _, reason = status.partition(" ")
        self.send_response(int(code), reason or None)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Connection", "close")
        self.end_headers()
        shutil.copyfileobj(out, self.wfile)
        self.close_connection = True
