"""A byte pipe from a Unix socket to the node's nix-daemon socket, run as a non-root uid.

The daemon decides whether a client is trusted from the uid of the connecting process
(SO_PEERCRED). The agent runs as uid 0, which the daemon trusts by default: a trusted client
can import unsigned paths. So the agent never gets the daemon's socket; it talks to this
relay, which a non-root process owns (the DaemonSet's `node-relay` container), and every
connection reaches the daemon as that uid: untrusted.
"""

import asyncio
import contextlib
import logging
import os
import socket
import struct
from pathlib import Path

log = logging.getLogger(__name__)

CHUNK = 1 << 16


def peer_uid(path: Path, timeout: float = 5.0) -> int:
    """The uid of the process that listens on the Unix socket `path` (SO_PEERCRED)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


async def _relay(daemon: Path, client_r: asyncio.StreamReader,
                 client_w: asyncio.StreamWriter) -> None:
    try:
        daemon_r, daemon_w = await asyncio.open_unix_connection(str(daemon))
    except OSError as e:
        log.warning("cannot reach the nix-daemon", extra={"fields": {
            "socket": str(daemon), "error": e.strerror or str(e)}})
        client_w.close()
        return
    try:
        await asyncio.gather(_pipe(client_r, daemon_w), _pipe(daemon_r, client_w))
    finally:
        for w in (client_w, daemon_w):
            w.close()
            with contextlib.suppress(Exception):
                await w.wait_closed()


async def serve(listen: Path, daemon: Path, mode: int = 0o660) -> None:
    """Relay every connection on `listen` to `daemon` until cancelled."""
    if os.geteuid() == 0:
        raise SystemExit("node-relay: refusing to run as root: the daemon would trust every "
                         "connection (run it as a non-root uid)")
    listen.unlink(missing_ok=True)
    server = await asyncio.start_unix_server(lambda r, w: _relay(daemon, r, w), str(listen))
    listen.chmod(mode)
    log.info("relaying to the nix-daemon", extra={"fields": {
        "listen": str(listen), "daemon": str(daemon), "uid": os.geteuid()}})
    async with server:
        await server.serve_forever()
