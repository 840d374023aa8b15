"""``sparsegpt serve --api-workers N``: the API served by N processes on one listening socket.

The parent binds the socket once, then forks N children before any app, thread or connection
exists; each child builds its own app (its own database pool, Redis client, sweeper thread: the
sweepers take turns through their Redis lock) and runs uvicorn on the inherited socket, with the
same ``EdgeProtocol`` limits as one process (header deadline, keep-alive idle time, its own
connection bound). The kernel spreads new connections over the processes that accept. A child
that dies is started again (at most 5 per process a minute); SIGTERM/SIGINT stop them all.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable

from app import db

log = logging.getLogger("sparsegpt.serve")


def default_api_workers(database_url: str) -> int:
    """One process per CPU (at most 8) on PostgreSQL; one on SQLite, whose single writer would
    make several processes wait on each other's locks."""
    if database_url.startswith("sqlite"):
        return 1
    return max(1, min(os.cpu_count() or 1, 8))


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on sockets that say so (proto 0 left
    # Nagle on, and small responses waited 40 ms for the client's delayed ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_processes(count: int, sock: socket.socket, child: Callable[[socket.socket], int]) -> int:
    """Fork ``count`` children running ``child(sock)``; wait, restart the ones that die, stop all
    on SIGTERM/SIGINT. Returns 0 once stopped."""
    pids: dict[int, int] = {}  # pid -> slot
    restarts: list[float] = []
    stopping = False

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # the child: default signals, its own app on the shared socket
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            code = 1
            db.dispose_all()  # the parent's pooled connections (its migrations) are never shared: see db
            try:
                code = child(sock)
            except KeyboardInterrupt:
                code = 0
            finally:
                os._exit(code)
        pids[pid] = slot

    def stop(_signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    previous = signal.signal(signal.SIGTERM, stop), signal.signal(signal.SIGINT, stop)
    try:
        for slot in range(count):
            spawn(slot)
        log.info("serving from %d API processes (%s)", count, ", ".join(map(str, pids)))
        while pids:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            slot = pids.pop(pid, None)
            if slot is None or stopping:
                continue
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < 60] + [now]
            if len(restarts) > 5 * count:
                log.error("API process %d keeps dying (status %s); stopping", pid, status)
                stop(None, None)
                continue
            log.warning("API process %d exited (status %s); starting another", pid, status)
            spawn(slot)
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
        sock.close()
    return 0
