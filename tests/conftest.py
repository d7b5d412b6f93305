"""Fixtures shared by every tier.

The integration and acceptance tiers get a real PostgreSQL: one server per
test session (``tests/support/postgres.py``), the base schema loaded once into
the template database, and a fresh database cloned from it for every test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import psycopg
import pytest
from pytest_postgresql import factories
from pytest_postgresql.executors import PostgreSQLExecutor

from pushsync import schema
from tests.support.postgres import start_postgres


@pytest.fixture(autouse=True, scope="session")
def _clean_environment() -> Iterator[None]:
    """Tests see no pushsync or libpq settings from the shell that started them.

    Kept: the test harness's own PUSHSYNC_PG_* (which server binaries, which user),
    PUSHSYNC_UPDATE_GOLDEN, and the browser tests' PUSHSYNC_CHROMIUM and
    PUSHSYNC_SCREENSHOT.
    """
    keep = ("PUSHSYNC_PG_", "PUSHSYNC_UPDATE_GOLDEN", "PUSHSYNC_CHROMIUM", "PUSHSYNC_SCREENSHOT")
    saved = {
        k: v
        for k, v in os.environ.items()
        if (k.startswith("PUSHSYNC_") and not k.startswith(keep)) or k.startswith("PG")
    }
    for key in saved:
        del os.environ[key]
    yield
    os.environ.update(saved)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgreSQLExecutor]:
    with start_postgres() as executor:
        template = psycopg.connect(
            host=executor.host,
            port=executor.port,
            user=executor.user,
            dbname=executor.template_dbname,
        )
        with template:
            schema.migrate(template)
        yield executor


postgresql = factories.postgresql("pg_server")


@pytest.fixture
def db(postgresql: psycopg.Connection) -> psycopg.Connection:
    """A connection to this test's own database, in autocommit mode."""
    postgresql.autocommit = True
    return postgresql


@pytest.fixture
def dsn(db: psycopg.Connection) -> str:
    """The DSN of this test's database, for CLI runs and second connections."""
    info = db.info
    return f"host={info.host} port={info.port} user={info.user} dbname={info.dbname}"
