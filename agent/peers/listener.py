"""The peer listener: the Nix binary cache protocol for other agents, behind the shared token.

Every request here comes from a peer, so it is answered from this agent's store and its own
upstreams only: the routes given to `peer_app` are the cache routes made with
`forwarded=True`, which the read-through path never relays to another agent (a request is
forwarded at most one hop). A narinfo this agent's upstreams do not have is a 404 marked as
such, which the asking agent may take as an answer; an upstream error stays a 503.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

from agent import metrics
from agent.nix.storepath import is_hash_part
from agent.peers.protocol import (
    LOCAL_ONLY_HEADER,
    NARINFO_HEADER,
    NOT_FOUND_HEADER,
    UPSTREAM_ERROR_HEADER,
    PeerToken,
    PeerTokenError,
)

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Resolve = Callable[[str], Awaitable[object]]
HasNarinfo = Callable[[str], bool]


def authenticate(token: PeerToken) -> Callable:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            ok = token.accepts(request.headers.get("Authorization"))
        except PeerTokenError as e:
            log.error("peer token unreadable: refusing peers", extra={"fields": {"error": str(e)}})
            ok = False
        if not ok:
            metrics.PEER_UNAUTHORIZED.inc()
            raise web.HTTPUnauthorized(text="peer token required\n",
                                       headers={"WWW-Authenticate": 'Bearer realm="peers"'})
        return await handler(request)
    return middleware


def peer_answers(resolve: Resolve | None, has_narinfo: HasNarinfo | None) -> Callable:
    """Answer a store-only question; look up a hinted narinfo before a NAR; mark 404s and
    503s for the asking peer."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        miss = _store_only_miss(request, has_narinfo)
        if miss is not None:
            return miss
        await _resolve_hint(request, resolve)
        try:
            resp = await handler(request)
        except web.HTTPNotFound as e:
            _mark(request, e)
            raise
        _mark(request, resp)
        if resp.status in (200, 206):
            metrics.PEER_SERVED_BYTES.inc(resp.content_length or resp.body_length or 0)
        return resp
    return middleware


def _narinfo_hash(request: web.Request) -> str | None:
    path = request.path
    return path[1:-len(".narinfo")] if path.endswith(".narinfo") else None


def _store_only_miss(request: web.Request, has_narinfo: HasNarinfo | None) -> web.Response | None:
    """The 404 for a store-only question about a narinfo this store does not hold."""
    asked = _narinfo_hash(request) or ""
    if not request.headers.get(LOCAL_ONLY_HEADER) or has_narinfo is None \
            or not is_hash_part(asked) or has_narinfo(asked):
        return None
    return web.Response(status=404, text="not in this node's store\n",
                        headers={NOT_FOUND_HEADER: "local"})


async def _resolve_hint(request: web.Request, resolve: Resolve | None) -> None:
    """A peer asking for a NAR whose narinfo it got elsewhere names it: look it up first."""
    hint = request.headers.get(NARINFO_HEADER, "")
    if resolve is None or not request.path.startswith("/nar/") or not is_hash_part(hint):
        return
    try:
        await resolve(hint)
    except Exception as e:  # the NAR request answers for itself (404 or 503)
        log.info("hinted narinfo lookup failed", extra={"fields": {
            "hash": hint, "error": str(e)}})


def _mark(request: web.Request, resp: web.StreamResponse) -> None:
    """A narinfo 404 is this node's answer (store and upstreams); a 503 is its upstreams'."""
    if resp.prepared:
        return
    if resp.status == 404 and _narinfo_hash(request) is not None:
        resp.headers[NOT_FOUND_HEADER] = "upstreams"
    elif resp.status == 503:
        resp.headers[UPSTREAM_ERROR_HEADER] = "1"


def peer_app(routes: Sequence[web.RouteDef], token: PeerToken, *,
             resolve: Resolve | None = None, has_narinfo: HasNarinfo | None = None,
             middlewares: Sequence[Callable] = ()) -> web.Application:
    """An application serving `routes` (the cache protocol's, made with `forwarded=True`) to
    peers. `resolve(hash)` looks a narinfo up through the read-through path, as forwarded
    (for a NAR hinted by a peer);
    `has_narinfo(hash)` says whether the store holds it with its NAR (a store-only question);
    `middlewares` run first (request ids, metrics)."""
    app = web.Application(middlewares=[*middlewares, authenticate(token),
                                       peer_answers(resolve, has_narinfo)])
    app.add_routes(routes)
    return app
