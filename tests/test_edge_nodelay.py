"""Connections the API accepts have TCP_NODELAY: the socket ``sparsegpt serve`` binds says it is
TCP (asyncio sets the option only then) and the edge's Acceptor sets it itself. Without it a small
response waited for the client's delayed ACK (40 ms a request on a kept-alive connection: /health
at 0.3x its bare twin's rate)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from app.edge_server import Acceptor, _Pool
from app.serve_procs import bind


async def _accepted_nodelay(through_acceptor: bool) -> int:
    loop = asyncio.get_running_loop()
    sock = bind("127.0.0.1", 0)
    made: list[asyncio.Transport] = []

    class Protocol(asyncio.Protocol):
        def connection_made(self, transport) -> None:
            made.append(transport)

    server = await loop.create_server(Protocol, sock=sock)
    try:
        if through_acceptor:
            Acceptor(loop, server, sock, Protocol, _Pool(set(), loop)).start()
        _reader, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        for _ in range(200):
            if made:
                break
            await asyncio.sleep(0.01)
        assert made, "the connection was not accepted"
        value = made[0].get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        writer.close()
        return value
    finally:
        server.close()


@pytest.mark.parametrize("through_acceptor", [True, False], ids=["edge acceptor", "asyncio's own accept"])
def test_accepted_connections_have_tcp_nodelay(through_acceptor):
    with bind("127.0.0.1", 0) as sock:
        assert sock.proto == socket.IPPROTO_TCP
    assert asyncio.run(_accepted_nodelay(through_acceptor)) != 0
