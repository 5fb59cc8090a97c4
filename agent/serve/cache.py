"""The Nix binary cache protocol, read-only: /nix-cache-info, /<hash>.narinfo, /nar/<file>.

Only names this store could have written are looked at (a 32-char nix32 hash, or nar/<52-char
nix32>.nar<ext>); anything else is 404 before any filesystem access.
"""

import logging

from aiohttp import web

from agent import metrics
from agent.nix.storepath import is_hash_part
from agent.runtime import Agent
from agent.serve.sendfile import ClientStalled, send_file
from agent.store.layout import is_nar_file
from agent.upstream.fetch import Transfer, UpstreamUnavailable

log = logging.getLogger(__name__)
NARINFO_TYPE = "text/x-nix-narinfo"
NAR_TYPE = "application/x-nix-nar"
NARINFO_HEADERS = {"Content-Type": NARINFO_TYPE}
# Resolved once: label lookups cost more than the rest of a narinfo hit.
LOOKUP_COUNTERS = {(kind, source): metrics.LOOKUPS.labels(kind, source)
                   for kind in ("narinfo", "nar")
                   for source in ("local", "upstream", "peer", "coalesced", "not_found",
                                  "error")}


def routes(agent: Agent) -> list[web.RouteDef]:
    async def cache_info(request: web.Request) -> web.Response:
        return web.Response(text=agent.store.cache_info(), content_type="text/x-nix-cache-info")

    async def narinfo(request: web.Request) -> web.StreamResponse:
        hash_part = request.match_info["hash"]
        if not is_hash_part(hash_part):
            raise web.HTTPNotFound(text="not a store path hash\n")
        try:
            found = await agent.fetcher.lookup(hash_part)
        except UpstreamUnavailable as e:
            LOOKUP_COUNTERS["narinfo", "error"].inc()
            return _unavailable(str(e))
        LOOKUP_COUNTERS["narinfo", found.source].inc()
        if found.row is None:
            raise web.HTTPNotFound(text="not in this cache or its upstreams\n")
        return web.Response(body=found.row.text.encode(), headers=NARINFO_HEADERS)

    async def nar(request: web.Request) -> web.StreamResponse:
        file = "nar/" + request.match_info["file"]
        if not is_nar_file(file):
            raise web.HTTPNotFound(text="not a NAR file name\n")
        row = agent.store.nar(file)
        if row is None:
            LOOKUP_COUNTERS["nar", "not_found"].inc()
            raise web.HTTPNotFound(text="unknown NAR: fetch its narinfo first\n")
        if row.committed:
            LOOKUP_COUNTERS["nar", "local"].inc()
            return await _local_nar(agent, request, file, row.file_size or 0)
        if request.method == "HEAD":
            return web.Response(headers=_nar_headers(row.file_size))
        try:
            transfer, joined = agent.fetcher.transfer(row)
        except UpstreamUnavailable as e:
            LOOKUP_COUNTERS["nar", "error"].inc()
            return _unavailable(str(e))
        LOOKUP_COUNTERS["nar", "coalesced" if joined else transfer.upstream.kind].inc()
        return await _stream_nar(agent, request, transfer, joined, row.file_size)

    return [
        web.get("/nix-cache-info", cache_info),
        web.get("/{hash:[^/.]+}.narinfo", narinfo),
        web.get("/nar/{file:[^/]+}", nar),
    ]


def _nar_headers(size: int | None) -> dict[str, str]:
    headers = {"Content-Type": NAR_TYPE}
    if size is not None:
        headers["Content-Length"] = str(size)
    return headers


def _unavailable(reason: str) -> web.Response:
    # 503, never 404: a 404 would be cached by the Nix client for an hour.
    log.warning("upstream unavailable", extra={"fields": {"error": reason}})
    return web.Response(status=503, text="upstream unavailable; try again\n",
                        headers={"Retry-After": "5"})


async def _local_nar(agent: Agent, request: web.Request, file: str,
                     size: int) -> web.StreamResponse:
    agent.store.index.touch(nar_file=file)
    # The file counts as in use until the last byte is out, so eviction leaves it alone.
    agent.serving[file] += 1
    sent = 0
    try:
        resp, sent = await send_file(request, agent.store.nar_path(file), NAR_TYPE)
    except (OSError, ClientStalled, EOFError) as e:
        log.info("local nar send aborted", extra={"fields": {"file": file, "error": str(e)}})
        raise web.HTTPInternalServerError() from None
    finally:
        agent.serving[file] -= 1
        if agent.serving[file] <= 0:
            del agent.serving[file]
        metrics.SERVED_BYTES.labels("local").inc(sent)
        agent.savings.avoided(sent)
    return resp


async def _stream_nar(agent: Agent, request: web.Request, transfer: Transfer, joined: bool,
                      size: int | None) -> web.StreamResponse:
    resp = web.StreamResponse(headers=_nar_headers(size))
    await resp.prepare(request)
    sent = 0
    if joined:
        metrics.COALESCED_WAITERS.inc()
    try:
        async for chunk in transfer.stream():
            await resp.write(chunk)
            sent += len(chunk)
    except Exception as e:  # upstream error, verification failure, store full without fallback
        # Headers are out: the only honest signal left is a broken connection.
        log.warning("nar stream aborted", extra={"fields": {"file": transfer.nar.file,
                                                            "sent": sent, "error": str(e)}})
        if request.transport is not None:
            request.transport.abort()
        raise web.HTTPInternalServerError() from None
    finally:
        if joined:
            metrics.COALESCED_WAITERS.dec()
        metrics.SERVED_BYTES.labels(transfer.upstream.kind).inc(sent)
        if joined:
            agent.savings.avoided(sent)
    await resp.write_eof()
    return resp
