"""The test PostgreSQL server (tests/support/postgres.py) really starts and answers."""

from __future__ import annotations

import os
from pathlib import Path

import psycopg
from pytest_postgresql.janitor import DatabaseJanitor

from tests.support.postgres import pg_ctl_path, start_postgres


def test_start_postgres_answers_as_postgres_superuser() -> None:
    with start_postgres() as pg:
        assert pg.executable == pg_ctl_path()
        assert pg.host == "127.0.0.1"
        datadir = Path(pg.datadir)
        # The server's files never belong to root: PostgreSQL refuses to run as root.
        assert datadir.stat().st_uid != 0 or os.geteuid() != 0

        # Same flow as pytest_postgresql.factories.postgresql: clone the template.
        with (
            DatabaseJanitor(
                user=pg.user,
                host=pg.host,
                port=pg.port,
                dbname=pg.dbname,
                template_dbname=pg.template_dbname,
                maintenance_dbname=pg.maintenance_dbname,
                password=pg.password,
            ),
            psycopg.connect(host=pg.host, port=pg.port, user=pg.user, dbname=pg.dbname) as conn,
        ):
            row = conn.execute(
                "SELECT version(), current_user, current_database(), current_setting('fsync')"
            ).fetchone()
    assert row is not None
    version, user, dbname, fsync = row
    assert version.startswith("PostgreSQL ")
    assert user == "postgres"
    assert dbname == "tests"
    assert fsync == "off"
    # Stopped and cleaned up on exit.
    assert not datadir.exists()
    assert not datadir.parent.exists()
