"""The drivers installed, and the few calls pool-level tests make on either one's connections.

Pool-level tests take ``driver_name`` from :data:`INSTALLED` as a parameter: psycopg2
always, psycopg 3 when importable.  A driver that is not installed is not a parameter (never
a skip).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from herokupool import drivers

INSTALLED = drivers.available()


def module(name: str) -> Any:
    return importlib.import_module(name)


def connect(name: str, dsn: str, **params: Any) -> Any:
    """A new connection of driver ``name`` to ``dsn`` (a URL), in autocommit."""
    if name == "psycopg2":
        conn = module(name).connect(dsn, **params)
        conn.autocommit = True
        return conn
    return module(name).connect(dsn, autocommit=True, **params)


def connector(name: str, dsn: str, **params: Any) -> Callable[[], Any]:
    """A ``connect()`` for a pool: :func:`connect` with these arguments."""
    return lambda: connect(name, dsn, **params)


def query(conn: Any, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run ``sql`` on either driver's connection; its rows ([] for none)."""
    with conn.cursor() as cursor:
        cursor.execute(sql, params)
        return list(cursor.fetchall()) if cursor.description else []


def pending_notifications(conn: Any) -> list[Any]:
    """The notifications a connection received and nobody read."""
    if hasattr(conn, "pgconn"):
        return list(conn._notifies_backlog or ())
    return list(conn.notifies)


def dsn_parameters(conn: Any) -> dict[str, str]:
    """The libpq parameters a connection was opened with (the password left out)."""
    if hasattr(conn, "pgconn"):
        return dict(conn.info.get_parameters())
    return dict(conn.get_dsn_parameters())


def libpq_connection(conn: Any) -> Any:
    """What stays the same while a pooled session goes from loan to loan: psycopg 3 hands the
    session to a new connection object at each release, its libpq connection (``pgconn``)
    goes with it; on psycopg2 the connection object itself stays."""
    pgconn = getattr(conn, "pgconn", None)
    return conn if pgconn is None else pgconn
