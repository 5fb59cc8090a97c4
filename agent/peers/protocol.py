"""What both ends of a peer request agree on: headers and the shared token."""

import hmac
import os
from pathlib import Path

# Sent on every request to a peer. The peer listener treats all its requests as forwarded
# (they are answered from its store and its upstreams only: agent/peers/listener.py).
HOP_HEADER = "X-Flox-Peer-Hop"
# On a narinfo 404 from a peer: "upstreams" (its store and upstreams do not have the path)
# or "local" (asked with LOCAL_ONLY_HEADER, its store does not have it).
NOT_FOUND_HEADER = "X-Flox-Peer-Not-Found"
NOT_FOUND_VALUES = ("upstreams", "local")
# On a 503 from a peer: its upstreams failed, the peer itself works (its circuit stays closed).
UPSTREAM_ERROR_HEADER = "X-Flox-Peer-Upstream-Error"
# Answer from your store only, fetch nothing: sent by the owner of a key that lacks it to the
# next peer in rendezvous order (the owner before it joined), so a new node warms from peers.
LOCAL_ONLY_HEADER = "X-Flox-Peer-Local-Only"
# On a NAR request to a peer that did not serve the narinfo: look this hash up first.
NARINFO_HEADER = "X-Flox-Peer-Narinfo"


class PeerTokenError(Exception):
    pass


class PeerToken:
    """The cluster-shared bearer token from a file (a mounted Secret that may rotate): re-read
    when the file's mtime changes, compared in constant time, never logged."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime: int | None = None
        self._value = b""

    def value(self) -> bytes:
        try:
            mtime = os.stat(self.path).st_mtime_ns
            if mtime != self._mtime:
                value = self.path.read_bytes().strip()
                if not value:
                    raise PeerTokenError(f"peer token file {self.path} is empty")
                self._value, self._mtime = value, mtime
        except OSError as e:
            raise PeerTokenError(f"peer token file {self.path}: {e.strerror}") from None
        return self._value

    def header(self) -> str:
        return "Bearer " + self.value().decode()

    def accepts(self, authorization: str | None) -> bool:
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            return False
        return hmac.compare_digest(given.strip().encode(), self.value())
