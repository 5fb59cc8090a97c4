"""PeerSource: the peer set as one `readthrough.Source`, in front of the upstreams.

`get_narinfo(hash)` asks the rendezvous owner of the hash, then the next peer; for a key
this agent owns itself, it asks the next peer only for what that peer already holds (then the
caller goes to the upstreams, and this agent fills the key for the others). It never raises:
None means "ask the next source" (every peer failed, or skipped, or the owner's own upstreams
said not found), because the upstreams, not the peers, are the authority on what exists. The
caller verifies whatever a peer sends exactly as an upstream answer and reports a refusal
with `rejected()`, which opens that peer's circuit.

One hop: `relays(hash)` says whether asking for `hash` makes another agent fetch (a question
to the owner) rather than only read its store (the store-only question of an owner). The
read-through path never relays a request a peer forwarded to it (agent/readthrough.py), and
asks `nar(url, relay=False)` for those, which goes to the upstreams directly.

`nar(url)` streams from the peer that served the narinfo naming `url`, then the next peer
(told which narinfo to look up), then any upstream whose narinfo names the same file; a
stream broken half-way resumes where it stopped (Range) from the next of them. The NAR URL
of a peer's narinfo is tagged with the narinfo's hash (`?narinfo=HASH`, not covered by
signatures), so the store's record of it is enough to find the NAR again after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace

import aiohttp

from agent import metrics
from agent.nix.narinfo import NarInfo
from agent.nix.storepath import is_hash_part
from agent.peers.membership import Membership
from agent.peers.protocol import (
    HOP_HEADER,
    LOCAL_ONLY_HEADER,
    NARINFO_HEADER,
    NOT_FOUND_HEADER,
    NOT_FOUND_VALUES,
    UPSTREAM_ERROR_HEADER,
    PeerToken,
    PeerTokenError,
)
from agent.peers.rendezvous import ranked
from agent.store.layout import nar_file_name
from agent.upstream.client import (
    SourceMetrics,
    Timeouts,
    Upstream,
    UpstreamError,
    new_session,
)

log = logging.getLogger(__name__)
PEERS_URL = "peers:"   # what the store records as the source of a peer-served narinfo
MAX_REMEMBERED = 100_000
HASH_TAG = "narinfo="
PEER_TRIES = 2         # the owner, then the next peer; then the upstreams
CLOSE_GRACE = 60.0     # a departed peer's connections stay open for transfers in flight
PEER_CONNECTIONS = 32  # per peer
PEER_METRICS = SourceMetrics(metrics.PEER_REQUESTS, metrics.PEER_ERRORS, metrics.PEER_DURATION,
                             metrics.PEER_BYTES, metrics.PEER_CIRCUIT_OPEN)


class Peer(Upstream):
    """One peer agent's listener: an Upstream with the token, the hop mark and a breaker that
    opens at the first error (falling back to the upstreams is always correct)."""

    kind = "peer"

    def __init__(self, url: str, timeouts: Timeouts, cooldown: float, token: PeerToken) -> None:
        super().__init__(url, timeouts, 1, cooldown, source_metrics=PEER_METRICS)
        self.id = url  # as membership and rendezvous know it
        self.token = token

    def open(self) -> None:
        """Create the connection pool (from membership callbacks, which are not async)."""
        self._session = new_session(self.timeouts, limit=PEER_CONNECTIONS)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": self.token.header(), HOP_HEADER: "1"}

    def _absent(self, resp: aiohttp.ClientResponse) -> bool:
        # Only the peer's own "not here" is an answer; any other 404 (a proxy, a wrong port)
        # is an error.
        return resp.status == 404 and resp.headers.get(NOT_FOUND_HEADER) in NOT_FOUND_VALUES

    def _status_error(self, resp: aiohttp.ClientResponse, kind: str,
                      message: str) -> UpstreamError:
        if resp.status == 503 and resp.headers.get(UPSTREAM_ERROR_HEADER):
            # The peer works but its upstreams do not: ask elsewhere, keep asking it.
            self.m.errors.labels(self.name, "peer_upstream").inc()
            return UpstreamError(self.name, "peer_upstream", f"{message}: its upstreams failed")
        return super()._status_error(resp, kind, message)


class _AllOpen:
    """The peer set's breaker as seen from outside: open when no peer can be asked."""

    def __init__(self, source: PeerSource) -> None:
        self.source = source

    @property
    def is_open(self) -> bool:
        return all(p.breaker.is_open for p in self.source.peers.values())


class PeerSource:
    kind = "peer"
    url = PEERS_URL
    name = "peers"
    throughput = 0.0  # savings are estimated from the upstreams' throughput
    # A peer's bytes reach no client before the whole NAR is verified: when a peer sends bad
    # bytes the clients have received nothing, and their retry is served from another source.
    stream_unverified = False

    def __init__(self, membership: Membership, timeouts: Timeouts, cooldown: float,
                 token: PeerToken, upstreams: Sequence[Upstream]) -> None:
        self.membership = membership
        self.timeouts, self.cooldown, self.token = timeouts, cooldown, token
        self.upstreams = upstreams
        self.peers: dict[str, Peer] = {}
        self.breaker = _AllOpen(self)
        self._served: OrderedDict[str, str] = OrderedDict()  # narinfo and NAR URL -> peer id
        self._streamed_by: OrderedDict[str, set[str]] = OrderedDict()  # NAR URL -> senders
        self._retired: set[Peer] = set()  # departed, closed after CLOSE_GRACE
        self._closing: set[asyncio.Task[None]] = set()
        self._started = False
        membership.on_change.append(self._update)

    # --- lifetime and membership -----------------------------------------------------------

    async def start(self) -> None:
        self._started = True
        self._update(self.membership.live())

    async def close(self) -> None:
        self._started = False
        for peer in [*self.peers.values(), *self._retired]:
            await peer.close()
        self.peers.clear()
        self._retired.clear()

    def _update(self, live: list[str]) -> None:
        if not self._started:
            return
        for url in set(live) - self.peers.keys():
            self.peers[url] = Peer(url, self.timeouts, self.cooldown, self.token)
            self.peers[url].open()
        for url in self.peers.keys() - set(live):
            self._retire(self.peers.pop(url))

    def _retire(self, peer: Peer) -> None:
        with contextlib.suppress(KeyError):
            metrics.PEER_CIRCUIT_OPEN.remove(peer.name)
        self._retired.add(peer)
        asyncio.get_running_loop().call_later(CLOSE_GRACE, self._close_retired, peer)

    def _close_retired(self, peer: Peer) -> None:
        if peer in self._retired:
            self._retired.discard(peer)
            task = asyncio.ensure_future(peer.close())
            self._closing.add(task)  # a reference until done: the loop keeps only weak ones
            task.add_done_callback(self._closing.discard)

    def status(self) -> dict[str, str]:
        return {p.id: "circuit_open" if p.breaker.is_open else "ok" for p in self.peers.values()}

    def order(self, key: str) -> tuple[list[Peer], bool]:
        """The peers to ask for `key` and whether to ask them for their store only. Normally
        the peers ranked above this agent (the owner first). When this agent owns the key,
        the next peer, which owned it before this agent joined, for what it holds."""
        me = self.membership.self_id
        ids = ranked([*self.peers, *([me] if me else [])], key)
        if me and ids[0] == me:
            return [self.peers[p] for p in ids[1:2]], True
        return [self.peers[p] for p in ids[:ids.index(me) if me else len(ids)]], False

    def relays(self, hash_part: str) -> bool:
        """Whether asking for `hash_part` may make a peer fetch it (it asks the owner), rather
        than only read the next peer's store (this agent owns it) or ask nobody."""
        peers, local_only = self.order(hash_part)
        return bool(peers) and not local_only

    # --- narinfo ---------------------------------------------------------------------------

    async def get_narinfo(self, hash_part: str) -> NarInfo | None:
        peers, local_only = self.order(hash_part)
        headers = {LOCAL_ONLY_HEADER: "1"} if local_only else {}
        for peer in peers[:PEER_TRIES]:
            try:
                info = await peer.get_narinfo(hash_part, headers)
            except (UpstreamError, PeerTokenError) as e:
                if isinstance(e, UpstreamError) and e.reason == "malformed":
                    metrics.PEER_REJECTED.labels(peer.name, "malformed").inc()
                log.info("peer narinfo failed", extra={"fields": {
                    "peer": peer.name, "hash": hash_part, "error": str(e)}})
                continue
            if info is None:
                return None
            info = _tag_nar_url(info, hash_part)
            for url in (f"{hash_part}.narinfo", info.url):
                _bounded_put(self._served, url, peer.id)
            return info
        return None

    # --- NAR -------------------------------------------------------------------------------

    @asynccontextmanager
    async def nar(self, url: str, offset: int = 0, headers: dict[str, str] | None = None, *,
                  relay: bool = True) -> AsyncIterator[AsyncIterator[bytes]]:
        """The NAR's bytes; `relay=False` (a request a peer forwarded): upstreams only."""
        yield self._chunks(url, offset, relay)

    async def _chunks(self, url: str, offset: int, relay: bool) -> AsyncIterator[bytes]:
        pos = offset
        errors: list[str] = []
        self._streamed_by.pop(url, None)
        async for source, source_url, hint in self._nar_sources(url, relay):
            try:
                async with source.nar(source_url, pos, hint) as chunks:
                    if isinstance(source, Peer):
                        _bounded_put(self._streamed_by, url,
                                     self._streamed_by.get(url, set()) | {source.id})
                    async for chunk in chunks:
                        pos += len(chunk)
                        yield chunk
                return
            except (UpstreamError, PeerTokenError) as e:
                errors.append(str(e))
                log.info("peer nar source failed", extra={"fields": {
                    "source": source.name, "url": url, "offset": pos, "error": str(e)}})
        raise UpstreamError(self.name, "unavailable",
                            f"no peer or upstream could send {url}: " + "; ".join(errors))

    async def _nar_sources(self, url: str, relay: bool) \
            -> AsyncIterator[tuple[Upstream, str, dict[str, str]]]:
        """Where `url` may be fetched, best first: the peer that served its narinfo, the next
        peers for that narinfo (told to look it up), then any upstream with the same file."""
        path, hash_part = _untag(url)
        if relay:
            first = self.peers.get(self._served.get(url, ""))
            if first is not None:
                yield first, path, {}
            others = [p for p in self.order(hash_part)[0] if p is not first] if hash_part else []
            for peer in others[:PEER_TRIES - (first is not None)]:
                yield peer, path, {NARINFO_HEADER: hash_part or ""}
        if hash_part:
            for up in self.upstreams:
                up_url = await _same_file_at(up, hash_part, path)
                if up_url:
                    yield up, up_url, {}

    def rejected(self, url: str, reason: str) -> str | None:
        """What peers sent for `url` failed verification: count it, open their circuits, and
        return the narinfo hash to look up again (now from other sources)."""
        served_by = self._served.pop(url, None)
        culprits = self._streamed_by.pop(url, set()) | ({served_by} if served_by else set())
        for peer_id in culprits:
            peer = self.peers.get(peer_id)
            if peer is None:
                continue
            peer.breaker.trip()
            metrics.PEER_REJECTED.labels(peer.name, reason).inc()
            log.warning("peer sent data that failed verification", extra={"fields": {
                "peer": peer.name, "url": url, "reason": reason}})
        if url.endswith(".narinfo"):
            return None  # the caller goes on to the next source by itself
        return _untag(url)[1]


def _bounded_put(d: OrderedDict, key: str, value: object) -> None:
    d[key] = value
    d.move_to_end(key)
    while len(d) > MAX_REMEMBERED:
        d.popitem(last=False)


def _tag_nar_url(info: NarInfo, hash_part: str) -> NarInfo:
    """The narinfo with its NAR URL naming the narinfo (`nar/X.nar.xz?narinfo=HASH`): the
    store keeps that URL, so the NAR can be found again from any peer or upstream even after
    a restart. URL is not covered by signatures."""
    return replace(info, url=f"{info.url.partition('?')[0]}?{HASH_TAG}{hash_part}")


def _untag(url: str) -> tuple[str, str | None]:
    """(the NAR path, the narinfo hash it was tagged with, if any)."""
    path, _, query = url.partition("?")
    hash_part = query.removeprefix(HASH_TAG) if query.startswith(HASH_TAG) else ""
    return path, hash_part if is_hash_part(hash_part) else None


async def _same_file_at(up: Upstream, hash_part: str, url: str) -> str | None:
    """The URL of `url`'s file at upstream `up`, when its narinfo names the same file (same
    FileHash and compression). The bytes are verified against our narinfo, so the upstream's
    narinfo needs no signature check here."""
    try:
        info = await up.get_narinfo(hash_part)
    except UpstreamError:
        return None
    if info is None or info.file_hash is None or info.file_hash.algo != "sha256":
        return None
    return info.url if nar_file_name(info.file_hash, info.compression) == url else None
