"""sendfile's abort on the loop the agent runs (uvloop)."""

import asyncio

import uvloop

from agent.serve.sendfile import abort


def test_abort_of_a_transport_that_let_its_socket_go_is_quiet() -> None:
    """A client that left while its NAR was being sent: the transport is already closing and
    uvloop's socket object has no descriptor (setsockopt raises ValueError there)."""

    async def main() -> bool:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        abort(writer.transport)  # a live one: reset
        await asyncio.sleep(0.05)
        abort(writer.transport)  # and again, once uvloop let the descriptor go
        closing = writer.transport.is_closing()
        server.close()
        await server.wait_closed()
        return closing

    assert uvloop.run(main())
