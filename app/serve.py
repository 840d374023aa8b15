"""``sparsegpt serve``: the whole service from one command.

With nothing configured: a SQLite file in the data directory, a redis-server of its own on a
free loopback port (when REDIS_URL is not set), migrations applied, ``--workers`` local worker
processes, and the API on 127.0.0.1:8000. SIGINT/SIGTERM stop the API, then the workers, then
Redis. On a team server (``--workers 0``) the workers run as their own services.

uvicorn (h11) runs with limits it lacks alone (``app.edge_server``): request headers within
settings.header_timeout_s, settings.keepalive_timeout_s idle between requests, at most
settings.max_connections held (below the open-files limit, raised to its hard limit), accepted
only into room; "Too many open files" is logged once a minute, not once per connection
(``app.log_limits``).
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from app import db
from app.config import Settings, get_settings, is_loopback
from app.edge_server import EdgeProtocol, EdgeServer
from app.log_limits import install_log_limits
from app.serve_procs import bind, default_api_workers, run_processes

log = logging.getLogger("sparsegpt.serve")
FD_RESERVE = 256  # open files kept for the database, Redis, uploads and logs beyond the connections


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(directory: Path) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit(
            "sparsegpt serve: REDIS_URL is not set and no redis-server is installed; "
            "install Redis (apt-get install redis-server) or set REDIS_URL=redis://host:6379/0"
        )
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 15
    while True:
        try:
            client.ping()
            return proc, url
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                proc.kill()
                raise SystemExit(f"sparsegpt serve: redis-server did not start: {err.strip()[:500]}") from None
            time.sleep(0.05)


class Workers:
    """Local ``sparsegpt worker`` processes, restarted if one dies, stopped on the way out."""

    def __init__(self, count: int, env: dict[str, str]):
        self.count, self.env = count, env
        self.procs: list[subprocess.Popen | None] = [None] * count
        self.stopping = threading.Event()
        self.restarts: list[float] = []
        self.lock = threading.Lock()

    def _spawn(self, index: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "app.cli", "worker", f"--hostname=local{index}@%h"]
        if self.count > 1:
            cmd.append(f"--gpu={index}")  # one GPU per local worker
        return subprocess.Popen(cmd, env=self.env, start_new_session=True)

    def start(self) -> None:
        for index in range(self.count):
            self.procs[index] = self._spawn(index)
        threading.Thread(target=self._watch, name="workers-watch", daemon=True).start()

    def _watch(self) -> None:
        while not self.stopping.wait(2.0):
            with self.lock:
                for index, proc in enumerate(self.procs):
                    if proc is None or proc.poll() is None or self.stopping.is_set():
                        continue
                    now = time.monotonic()
                    self.restarts = [t for t in self.restarts if now - t < 60] + [now]
                    if len(self.restarts) > 5 * self.count:
                        log.error("local worker %d keeps dying (exit %s); not restarting it", index, proc.returncode)
                        self.procs[index] = None
                        continue
                    log.warning("local worker %d exited with %s; restarting it", index, proc.returncode)
                    self.procs[index] = self._spawn(index)

    def stop(self, timeout: float = 10.0) -> None:
        """Warm shutdown first (SIGTERM: a running job may finish its step), then cold (SIGQUIT),
        then SIGKILL for the worker's whole process group. A job cut short is redelivered
        (acks late) when a worker starts again."""
        self.stopping.set()
        with self.lock:
            procs = [p for p in self.procs if p is not None and p.poll() is None]
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
            for proc in procs:
                if proc.poll() is None:
                    try:
                        os.killpg(proc.pid, sig) if sig == signal.SIGKILL else proc.send_signal(sig)
                    except (ProcessLookupError, PermissionError):
                        pass
            deadline = time.monotonic() + wait
            for proc in procs:
                try:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            procs = [p for p in procs if p.poll() is None]
            if not procs:
                break
        with self.lock:
            for proc in self.procs:  # the pool children, if any survived their parent
                if proc is not None:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass


def raise_open_files_limit() -> int:
    """The soft RLIMIT_NOFILE raised to the hard limit; returns the soft limit now in force."""
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    except (ValueError, OSError):
        pass  # an unlimited hard limit: the soft one stays
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def connection_bound(settings: Settings, open_files: int) -> int:
    """settings.max_connections, kept below the open-files limit (FD_RESERVE spare)."""
    bound = max(1, min(settings.max_connections, open_files - FD_RESERVE))
    if bound < settings.max_connections:
        log.warning(
            "max_connections %d is above what %d open files allow: %d", settings.max_connections, open_files, bound
        )
    return bound


class _Terminated(Exception):
    """SIGTERM: stop like Ctrl-C does (uvicorn re-raises the signal after its own shutdown)."""


def _raise_exit(signum, _frame) -> None:
    raise _Terminated()


def auth_mode(settings: Settings, host: str) -> str:
    """SPARSEGPT_AUTH, or its default: off on loopback, required on any other address.
    Single-user mode (off) beyond loopback would hand the whole team's server to anyone who
    can reach it: refused."""
    mode = settings.auth or ("off" if is_loopback(host) else "required")
    if mode == "off" and not is_loopback(host):
        raise SystemExit(
            f"sparsegpt serve: SPARSEGPT_AUTH=off (single-user mode, no sign-in) is refused on --host {host}: "
            "it is allowed only on a loopback address (127.0.0.1, ::1, localhost). On a shared server keep "
            "SPARSEGPT_AUTH=required (the default there) and give each person a token: sparsegpt users add NAME "
            "[--admin]"
        )
    return mode


def _run_uvicorn(settings: Settings, host: str, port: int, log_level: str, sock: socket.socket) -> int:
    """One API process: the app and uvicorn with the edge limits, on ``sock`` (bound by serve)."""
    import uvicorn

    from app.main import create_app

    forwarded = settings.forwarded_allow_ips.strip()
    config = uvicorn.Config(
        create_app(settings, migrate=False, bind_host=host),
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=5,
        http=EdgeProtocol,
        loop="asyncio",  # the edge's Acceptor serves asyncio's selector loop (uvloop listens in libuv)
        timeout_keep_alive=settings.keepalive_timeout_s,
        # X-Forwarded-Proto/-For are believed only from these addresses (none: ignored).
        proxy_headers=bool(forwarded),
        forwarded_allow_ips=forwarded or None,
    )
    install_log_limits()  # after uvicorn set up its handlers
    server = EdgeServer(config)
    server.run(sockets=[sock])
    return 0 if server.started else 1


def serve(
    *, host: str | None, port: int | None, workers: int | None, log_level: str = "info", api_workers: int | None = None
) -> int:
    # Long on purpose: what `sparsegpt serve` starts (Redis, workers, API processes) and stops again, in order.
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    settings = get_settings()
    host, port = host or "127.0.0.1", port or 8000
    mode = auth_mode(settings, host)  # before anything starts
    os.environ["SPARSEGPT_AUTH"] = mode
    previous = signal.signal(signal.SIGTERM, _raise_exit)
    workers = 1 if workers is None else workers
    if workers < 0:
        raise SystemExit("sparsegpt serve: --workers must be 0 or more")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # The children must agree with us on every default: pass them explicitly.
    os.environ["SPARSEGPT_DATA_DIR"] = str(settings.data_dir)
    os.environ.setdefault("DATABASE_URL", settings.database)
    redis_proc = None
    pool: Workers | None = None
    try:
        if not settings.redis_url:
            redis_proc, url = start_redis(settings.data_dir / "redis")
            os.environ["REDIS_URL"] = url
            log.info("started redis-server (pid %d) at %s", redis_proc.pid, url)
        get_settings.cache_clear()
        settings = get_settings()
        db.migrate(settings.database)
        log.info("database %s is at the latest migration", settings.database.split("@")[-1])
        if mode == "required":
            log.info(
                "sign-in required: API clients send Authorization: Bearer <token>; the dashboard signs in at /login"
            )
            from app import crud

            with db.session_scope(settings.database) as session:
                if not any(not u.token_hash.startswith("!") for u in crud.list_users(session)):
                    log.warning("no accounts yet: create one with `sparsegpt users add NAME --admin`")
        else:
            log.info("single-user mode (listening on %s only): no sign-in", host)
        if workers:
            pool = Workers(workers, dict(os.environ))
            pool.start()
            log.info("started %d local worker process(es)", workers)

        open_files = raise_open_files_limit()
        EdgeProtocol.header_timeout_s = settings.header_timeout_s
        EdgeProtocol.max_connections = connection_bound(settings, open_files)  # per API process
        count = api_workers if api_workers is not None else default_api_workers(settings.database)
        if count < 1:
            raise SystemExit("sparsegpt serve: --api-workers must be 1 or more")
        try:
            sock = bind(host, port)
        except OSError as err:
            raise SystemExit(f"sparsegpt serve: cannot listen on {host}:{port}: {err.strerror or err}") from None
        shown = f"[{host}]" if ":" in host else host
        log.info("the API listens on http://%s:%d (Ctrl-C stops everything)", shown, sock.getsockname()[1])
        if count == 1:
            try:
                return _run_uvicorn(settings, host, port, log_level, sock)
            finally:
                sock.close()
        return run_processes(count, sock, lambda sock: _run_uvicorn(settings, host, port, log_level, sock))
    except (KeyboardInterrupt, _Terminated):
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if pool is not None:
            log.info("stopping the local workers")
            pool.stop()
        if redis_proc is not None:
            redis_proc.terminate()
            try:
                redis_proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                redis_proc.kill()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)
