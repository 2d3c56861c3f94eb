"""The benchmark database and the watcher of its server connections."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg2
from psycopg2 import sql

from bench.configs import Target

__all__ = ["ConnectionWatcher", "prepare_database", "server_info"]

ROWS = 1000


def _connect(target: Target, dbname: str | None = None, **extra: Any) -> Any:
    conn = psycopg2.connect(
        host=target.host,
        port=target.port,
        user=target.user,
        password=target.password or None,
        dbname=dbname or target.dbname,
        application_name="bench-coordinator",
        **extra,
    )
    conn.autocommit = True
    return conn


def prepare_database(target: Target, rows: int = ROWS) -> None:
    """Create the database (if missing) and its ``bench_item`` table of ``rows`` rows.

    The database's time zone is set to UTC, as Heroku Postgres's is, so that Django
    does not send ``SET TIME ZONE`` on every new connection (the server here defaults
    to ``Etc/UTC``, a different name for the same zone, which Django would "fix").
    """
    admin = _connect(target, "postgres")
    try:
        with admin.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", [target.dbname])
            if cursor.fetchone() is None:
                cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(target.dbname)))
            cursor.execute(
                sql.SQL("ALTER DATABASE {} SET timezone TO 'UTC'").format(
                    sql.Identifier(target.dbname)
                )
            )
    finally:
        admin.close()
    conn = _connect(target)
    try:
        with conn.cursor() as cursor:
            cursor.execute(
                "CREATE TABLE IF NOT EXISTS bench_item ("
                " id bigint PRIMARY KEY, name varchar(100) NOT NULL, value integer NOT NULL)"
            )
            cursor.execute("SELECT count(*) FROM bench_item")
            (count,) = cursor.fetchone()
            if count != rows:
                cursor.execute("TRUNCATE bench_item")
                cursor.execute(
                    "INSERT INTO bench_item (id, name, value)"
                    " SELECT i, 'item ' || i, i * 7 %% 1000 FROM generate_series(1, %s) AS i",
                    [rows],
                )
                cursor.execute("VACUUM ANALYZE bench_item")
    finally:
        conn.close()


def server_info(target: Target) -> dict[str, Any]:
    conn = _connect(target)
    try:
        with conn.cursor() as cursor:
            cursor.execute("SHOW server_version")
            (version,) = cursor.fetchone()
            cursor.execute("SHOW max_connections")
            (max_connections,) = cursor.fetchone()
        return {"server_version": version, "max_connections": int(max_connections)}
    finally:
        conn.close()


class ConnectionWatcher:
    """Samples ``pg_stat_activity`` to find a configuration's peak server connections."""

    def __init__(self, target: Target, interval: float = 0.02) -> None:
        self._conn = _connect(target)
        self._interval = interval

    def count(self, application_name: str) -> int:
        with self._conn.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                [application_name],
            )
            (count,) = cursor.fetchone()
        return int(count)

    @contextlib.contextmanager
    def peak(self, application_name: str) -> Iterator[dict[str, int]]:
        """Yield a dict whose ``"peak"`` holds the most connections seen meanwhile."""
        result = {"peak": self.count(application_name)}
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(self._interval):
                result["peak"] = max(result["peak"], self.count(application_name))

        thread = threading.Thread(target=sample, name="bench-watcher", daemon=True)
        thread.start()
        try:
            yield result
        finally:
            stop.set()
            thread.join()

    def close(self) -> None:
        self._conn.close()

    def wait_until_at_most(self, application_name: str, count: int, timeout: float = 5.0) -> int:
        """Wait for closed connections' backends to exit (they linger a few ms)."""
        deadline = time.monotonic() + timeout
        current = self.count(application_name)
        while current > count and time.monotonic() < deadline:
            time.sleep(0.02)
            current = self.count(application_name)
        return current
