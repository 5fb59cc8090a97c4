"""The Nix binary cache protocol over HTTP, read-only: /nix-cache-info, /<hash>.narinfo,
/<hash>.ls, /nar/<file>. HTTP mapping only: request -> ReadThrough -> response.

Only names this store could have written are looked at (a 32-char nix32 hash, or nar/<52-char
nix32>.nar<ext>); anything else is 404 before any filesystem access.
"""

import contextlib
import logging
import os
from collections.abc import Callable

from aiohttp import web

from agent.nix.storepath import is_hash_part
from agent.readthrough import NarHandle, ReadThrough, Unavailable, UnknownNar
from agent.serve.sendfile import ClientStalled, FileSender, abort, write_or_stall
from agent.store.layout import is_nar_file
from agent.store.transfer import Span

log = logging.getLogger(__name__)
NARINFO_TYPE = "text/x-nix-narinfo"
NAR_TYPE = "application/x-nix-nar"
NARINFO_HEADERS = {"Content-Type": NARINFO_TYPE}


def routes(readthrough: ReadThrough, sender: FileSender, cache_info: Callable[[], str],
           forwarded: bool = False) -> list[web.RouteDef]:
    """The cache protocol's routes; `forwarded`: for the peer listener (agent/peers/), whose
    requests other agents forwarded here and which are never relayed further."""
    async def nix_cache_info(request: web.Request) -> web.Response:
        return web.Response(text=cache_info(), content_type="text/x-nix-cache-info")

    async def narinfo(request: web.Request) -> web.StreamResponse:
        hash_part = request.match_info["hash"]
        if not is_hash_part(hash_part):
            raise web.HTTPNotFound(text="not a store path hash\n")
        try:
            found = await readthrough.narinfo(hash_part, forwarded)
        except Unavailable as e:
            return _unavailable(str(e))
        if found.row is None:
            # Still a 404 when the only copy is signed by an untrusted key (Nix then tries
            # its next substituter), but the body says why.
            raise web.HTTPNotFound(text=found.reason + "\n")
        return web.Response(body=found.row.text.encode(), headers=NARINFO_HEADERS)

    async def listing(request: web.Request) -> web.Response:
        hash_part = request.match_info["hash"]
        body = await readthrough.listing(hash_part) if is_hash_part(hash_part) else None
        if body is None:
            raise web.HTTPNotFound(text="no listing for this path here\n")
        return web.Response(body=body, content_type="application/json")

    async def nar(request: web.Request) -> web.StreamResponse:
        file = "nar/" + request.match_info["file"]
        if not is_nar_file(file):
            raise web.HTTPNotFound(text="not a NAR file name\n")
        try:
            handle = readthrough.open_nar(file, forwarded)
        except UnknownNar:
            raise web.HTTPNotFound(text="unknown NAR: fetch its narinfo first\n") from None
        except Unavailable as e:
            return _unavailable(str(e))
        async with handle:
            if handle.committed:
                return await _send_committed(request, sender, handle)
            if request.method == "HEAD":
                return web.Response(headers=_nar_headers(handle.size))
            return await _stream(request, handle, sender)

    return [
        web.get("/nix-cache-info", nix_cache_info),
        web.get("/{hash:[^/.]+}.narinfo", narinfo),
        web.get("/{hash:[^/.]+}.ls", listing),
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


async def _send_committed(request: web.Request, sender: FileSender, handle: NarHandle) \
        -> web.StreamResponse:
    try:
        fd, size = handle.open()
        try:
            resp, handle.served = await sender.send(request, fd, size, NAR_TYPE)
        finally:
            os.close(fd)
    except (OSError, ClientStalled, EOFError) as e:
        log.info("local nar send aborted", extra={"fields": {"file": handle.row.file,
                                                            "error": str(e)}})
        raise web.HTTPInternalServerError() from None
    return resp


async def _stream(request: web.Request, handle: NarHandle, sender: FileSender) \
        -> web.StreamResponse:
    """A live transfer: its file's spans go out zero-copy as they are verified."""
    resp = web.StreamResponse(headers=_nar_headers(handle.size))
    await resp.prepare(request)
    try:
        # Closed at once however this ends: the stream's turn and file go back now.
        async with contextlib.aclosing(handle.pieces()) as pieces:
            async for piece in pieces:
                if isinstance(piece, Span):
                    await sender.send_request_body(request, piece.fd, piece.offset,
                                                   piece.count)
                    handle.served += piece.count
                else:
                    await write_or_stall(resp, piece, sender.stall_timeout)
                    handle.served += len(piece)
    except Exception as e:  # source error, verification failure, store full, stalled client
        # Headers are out: the only honest signal left is a broken connection.
        log.warning("nar stream aborted", extra={"fields": {
            "file": handle.row.file, "sent": handle.served, "error": str(e)}})
        if request.transport is not None:
            abort(request.transport)
        raise web.HTTPInternalServerError() from None
    await resp.write_eof()
    return resp
