"""Database engines, sessions and migrations.

SQLite gets WAL, a busy timeout and foreign keys on every connection; PostgreSQL is used as is.
The schema is only ever made or changed by Alembic (``migrations/``): ``migrate()`` runs
``alembic upgrade head`` and is called when the service starts.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

T = TypeVar("T")

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def get_engine(url: str) -> Engine:
    """One engine per URL and process (workers dispose theirs after fork)."""
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = make_engine(url)
        return engine


def dispose_all() -> None:
    """After a fork: drop pooled connections inherited from the parent without closing them. Two
    processes on one PostgreSQL connection corrupt each other's transactions (500s, "server closed the
    connection unexpectedly"): workers and each of `serve --api-workers`' processes call this first
    (it also forgets run_read's threads, which a forked process does not have)."""
    global _readers
    with _lock:
        for engine in _engines.values():
            engine.dispose(close=False)
        _engines.clear()
        _readers = None  # the parent's reader threads do not exist here: new ones on first use


def session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


def connect(sessions: sessionmaker[Session]) -> Connection:
    """A Core connection from the sessions' engine (``with connect(sessions) as connection``), for
    a read that builds no ORM objects: no Session to set up; rolled back when it closes."""
    return sessions.kw["bind"].connect()


READ_THREADS = 4  # per process: short reads at once (more only contend for the GIL and the pool)
_readers: ThreadPoolExecutor | None = None


async def run_read(func: Callable[..., T], *args) -> T:
    """``func(*args)``, a short blocking database read, on one of READ_THREADS threads kept for
    them: asyncio's own executor hop, cheaper than the thread pool FastAPI's sync routes share,
    and at most READ_THREADS such reads at once in this process. The threads start on first use
    (after `serve --api-workers` forked)."""
    global _readers
    if _readers is None:
        with _lock:
            if _readers is None:
                _readers = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="db-read")
    return await asyncio.get_running_loop().run_in_executor(_readers, func, *args)


def transaction(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits on success and rolls back on error (a generator: FastAPI
    dependencies use it as is, ``session_scope`` as a context manager)."""
    session = sessions()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session on ``url`` that commits on success and rolls back on error."""
    yield from transaction(session_factory(url))


def alembic_config(url: str):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # '%' is interpolation syntax in ConfigParser.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def migrate(url: str) -> None:
    """``alembic upgrade head``; on PostgreSQL under an advisory lock so that several
    processes starting at once do not race."""
    from alembic import command

    config = alembic_config(url)
    engine = get_engine(url)
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(74612001)"))
            try:
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
                connection.commit()
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(74612001)"))
                connection.commit()
    else:
        # Foreign keys off while migrating (they can only be switched outside a transaction):
        # a migration that rebuilds a table drops the old one, which would otherwise cascade.
        with engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()  # ends SQLAlchemy's autobegun transaction (no SQL was in one)
            try:
                with connection.begin():
                    config.attributes["connection"] = connection
                    command.upgrade(config, "head")
                    problems = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if problems:
                        raise RuntimeError(f"the migration left rows whose foreign keys point nowhere: {problems[:5]}")
            finally:
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")
                connection.commit()
