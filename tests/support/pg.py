"""A PostgreSQL database of a test session's own, on the server tests are pointed at."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

PG_URL = os.environ.get("SPARSEGPT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@contextmanager
def scratch_database(prefix: str) -> Iterator[str]:
    """Create ``<prefix>_<random>``, yield its URL, drop it (forcibly) at the end.

    No server at PG_URL skips the test that asked for it, saying which variable to set.
    """
    import psycopg
    from sqlalchemy.engine import make_url

    admin = make_url(PG_URL)
    conninfo = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"{prefix}_{secrets.token_hex(4)}"
    try:
        with psycopg.connect(conninfo, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as err:
        pytest.skip(f"no PostgreSQL at {PG_URL} ({err}); set SPARSEGPT_TEST_POSTGRES_URL")
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        from app import db

        db.dispose_all()
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
