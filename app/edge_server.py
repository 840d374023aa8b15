"""The API's edge below HTTP: uvicorn (h11) with the limits it lacks alone.

- ``EdgeProtocol``: a connection's request headers must be complete within ``header_timeout_s``
  of its start, or of its previous response (slowloris); idle keep-alive is uvicorn's own timeout.
- ``Acceptor``: at most ``EdgeProtocol.max_connections`` connections are held per process. A new
  connection is accepted only when there is room; room is made by closing the oldest connections
  that are not in a request (half-sent headers, idle keep-alive), never one accepted a moment ago
  and not read yet. When every connection is in a request, a new one gets a 503 at once and is
  closed. Whatever has no room yet waits in the kernel's listen queue.

asyncio's own accept handler takes in as many connections as the listen queue holds in one go; a
process that ran late (a loaded machine, a long pause) took in its whole queue, 2000 and more open
files with a bound of 400, before anything could close one. Accepting only into room keeps the
bound whatever the arrival rate and however late the event loop runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import socket

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from app.log_limits import limited_log


class _Pool:
    """One process's connections (uvicorn's set), the ones among them not in a request (waiting
    for headers, or idle), oldest first, and how many were accepted but not set up yet."""

    def __init__(self, connections: set, loop) -> None:
        self.connections, self.loop = connections, loop
        self.waiting: dict[EdgeProtocol, None] = {}
        self.pending = 0

    @classmethod
    def of(cls, server_state, loop) -> _Pool:
        pool = server_state.__dict__.get("edge_pool")
        if pool is None:
            pool = server_state.__dict__.setdefault("edge_pool", cls(server_state.connections, loop))
        return pool

    def held(self) -> int:
        """Open connections: set up (closing ones count until they are gone) or being set up."""
        return len(self.connections) + self.pending

    def evict(self, count: int) -> int:
        """Close up to ``count`` waiting connections, oldest first, but not one that was accepted
        a moment ago and has not been read yet (its request may be there)."""
        now, victims = self.loop.time(), []
        for other in self.waiting:
            if len(victims) >= count:
                break
            if other.heard or now - other.born >= EdgeProtocol.GRACE_S:
                victims.append(other)
        for other in victims:
            other.close_quietly()
        return len(victims)

    def closing(self) -> bool:
        return any(conn.transport is None or conn.transport.is_closing() for conn in self.connections)


class EdgeProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for request headers, registered in its process's
    ``_Pool`` while not in a request (class attributes set by ``sparsegpt serve``)."""

    header_timeout_s: float = 10.0
    max_connections: int = 1000
    GRACE_S = 0.1

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer = None
        self.heard, self.born = False, 0.0
        self._pool = _Pool.of(self.server_state, self.loop)

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.born = self.loop.time()
        self._wait_for_headers()

    def _wait_for_headers(self) -> None:
        self._pool.waiting[self] = None
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.cycle is None or self.cycle.response_complete:  # still no complete request headers
            self.close_quietly()

    def _in_request(self) -> None:
        self._pool.waiting.pop(self, None)
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def close_quietly(self) -> None:
        self._pool.waiting.pop(self, None)
        if not self.transport.is_closing():
            with contextlib.suppress(h11.LocalProtocolError):
                self.conn.send(h11.ConnectionClosed())
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.heard = True
        if self.cycle is not None and self.cycle.response_complete and self._header_timer is None:
            self._wait_for_headers()  # a next request begins: its headers have the same deadline
        super().data_received(data)

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not before:
            self._in_request()

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._pool.waiting[self] = None  # idle: the keep-alive timeout runs
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._in_request()
        super().connection_lost(exc)


class Acceptor:
    """Accepts on one listening socket in place of asyncio's handler, only into room (see the
    module's docstring)."""

    BATCH = 64  # connections accepted per readiness of the listening socket
    EVICT = 16  # waiting connections closed at a time when the process is full
    RETRY_S = 1.0  # after "too many open files" (as asyncio does)
    BUSY_503 = (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\nretry-after: 2\r\n"
        b"connection: close\r\ncontent-length: 36\r\n\r\ntoo many connections; try again soon"
    )

    def __init__(self, loop, server: asyncio.base_events.Server, sock: socket.socket, factory, pool: _Pool) -> None:
        self.loop, self.server, self.sock, self.factory, self.pool = loop, server, sock, factory, pool
        self.fd = sock.fileno()

    def start(self) -> None:
        self.loop.remove_reader(self.fd)  # asyncio's own handler: it takes in the whole queue
        self.loop.add_reader(self.fd, self._ready)

    def _pause(self, delay: float | None) -> None:
        """Stop accepting until the next turn of the loop (``None``: connections just closed are
        gone by then) or for ``delay`` seconds. Called only from ``_ready``, i.e. while accepting."""
        self.loop.remove_reader(self.fd)
        if delay is None:
            self.loop.call_soon(self._resume)
        else:
            self.loop.call_later(delay, self._resume)

    def _resume(self) -> None:
        if self.server.is_serving() and self.sock.fileno() == self.fd:
            self.loop.add_reader(self.fd, self._ready)

    def _room(self) -> str:
        """ "accept"; "next" (connections were closed to make room: gone by the loop's next turn);
        "soon" (some are closing, their last bytes still going out); "later" (the waiting ones are
        too new to close); "refuse" (all are in a request)."""
        excess = self.pool.held() - EdgeProtocol.max_connections + 1
        if excess <= 0:
            return "accept"
        if self.pool.evict(max(excess, min(self.EVICT, EdgeProtocol.max_connections))):
            return "next"
        if self.pool.closing():
            return "soon"
        return "later" if self.pool.waiting else "refuse"

    def _ready(self) -> None:
        for _ in range(self.BATCH):
            room = self._room()
            if room != "accept" and room != "refuse":
                self._pause({"next": None, "soon": 0.01, "later": EdgeProtocol.GRACE_S}[room])
                return
            try:
                conn, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as err:
                if err.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise
                limited_log.warning("accept: %s (out of system resource); pausing new connections", err)
                self._pause(self.RETRY_S)
                return
            if room == "refuse":
                self._refuse(conn)
                continue
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small responses leave at once
            self.pool.pending += 1
            self.loop.create_task(self._set_up(conn))

    def _refuse(self, conn: socket.socket) -> None:
        limited_log.warning("%d connections, all in a request: refusing new ones (503)", self.pool.held())
        with contextlib.suppress(OSError):
            conn.setblocking(False)
            conn.send(self.BUSY_503)
        conn.close()

    async def _set_up(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self.factory, conn)
        except OSError:
            conn.close()  # the peer went away before its transport was made
        finally:
            self.pool.pending -= 1


class EdgeServer(uvicorn.Server):
    """uvicorn's server on sockets the caller bound, each served by an ``Acceptor``."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if not sockets:
            raise ValueError("EdgeServer serves sockets bound by its caller")
        await super().startup(sockets)
        loop = asyncio.get_running_loop()
        config = self.config
        factory = functools.partial(
            config.http_protocol_class, config=config, server_state=self.server_state, app_state=self.lifespan.state
        )
        pool = _Pool.of(self.server_state, loop)
        for server, sock in zip(self.servers, sockets, strict=True):
            Acceptor(loop, server, sock, factory, pool).start()
