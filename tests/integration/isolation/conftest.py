"""Fixtures and helpers of the isolation tests (issue 15): engines, real request ends, threads.

Every behaviour is tried on two engines: Django's own ``django.db.backends.postgresql``
(the control: with ``CONN_MAX_AGE=0`` every request gets a new session, so whatever it
did ends with it) and herokupool's, whose promise is that a pooled request is
indistinguishable from that.  herokupool's pools are kept small (``MAX_CONNS`` 1 or 2)
so that the next request provably gets the same physical session: the tests assert the
``pg_backend_pid()`` reuse, or a herokupool pass would prove nothing.

Request ends are real: ``close_old_connections()``, the receiver of ``request_finished``
(Django's test client disconnects it, so no test client is used here).

The driver is the one Django chose (psycopg 3 when installed, else psycopg2): the
helpers below (``raw_named``, ``RAW_CLOSED``, ``TRACKING``...) say what differs.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from django.db import close_old_connections, connections
from django.db.backends.postgresql.base import Database
from django.db.backends.postgresql.psycopg_any import is_psycopg3

import herokupool
from herokupool import tracked
from tests.integration.conftest import settings_for

T = TypeVar("T")

STOCK = "django.db.backends.postgresql"
HEROKUPOOL = "herokupool.db.backends.postgresql"
#: pytest ids -> ENGINE, the control first.
ENGINES = {"stock": STOCK, "herokupool": HEROKUPOOL}

#: The driver's module (psycopg or psycopg2), as Django's backend imported it.
DRIVER: Any = Database
#: The module of herokupool's tracked connections for the driver in use.
TRACKING: Any = importlib.import_module("herokupool.tracked_psycopg") if is_psycopg3 else tracked
#: What a raw cursor raises once its connection is closed (the stock engine, after its
#: request) or its loan has ended (herokupool): psycopg2's InterfaceError ("cursor already
#: closed"), psycopg's OperationalError ("the connection is closed") or InterfaceError.
RAW_CLOSED: tuple[type[Exception], ...] = (
    (Database.OperationalError, Database.InterfaceError)
    if is_psycopg3
    else (Database.InterfaceError,)
)


def raw_named(conn: Any, name: str, factory: Any = None, *, withhold: bool = True) -> Any:
    """A server-side cursor on a raw connection: ``factory`` is psycopg2's
    ``cursor_factory`` or psycopg's ``row_factory``."""
    if is_psycopg3:
        return conn.cursor(name, row_factory=factory, withhold=withhold)
    return conn.cursor(name, cursor_factory=factory, withhold=withhold)


def is_pooled(engine: str) -> bool:
    return engine == HEROKUPOOL


@pytest.fixture(params=list(ENGINES.values()), ids=list(ENGINES))
def engine(request: pytest.FixtureRequest) -> str:
    """The ENGINE under test: the stock backend (control), then herokupool's."""
    return str(request.param)


@pytest.fixture
def register(dsn: str, alias: str, app_name: str, engine: str) -> Iterator[Callable[..., str]]:
    """``register(url=None, pool={...}, **OPTIONS)`` -> this test's alias in
    ``django.db.connections``, on ``engine`` with ``CONN_MAX_AGE=0`` (what
    ``herokupool.config()`` sets).  ``pool`` holds herokupool's own settings (``MAX_CONNS``
    ...), given to herokupool's engine only: libpq would refuse them."""

    def register_alias(
        *, url: str | None = None, pool: dict[str, Any] | None = None, **options: Any
    ) -> str:
        options.setdefault("application_name", app_name)
        if is_pooled(engine):
            options = {"MAX_CONNS": 1, "TIMEOUT": 10, **(pool or {}), **options}
        settings = settings_for(url or dsn, engine=engine, **options)
        assert settings["CONN_MAX_AGE"] == 0
        connections.settings[alias] = settings
        return alias

    yield register_alias
    forget(alias)


def forget(alias: str) -> None:
    """Close this thread's wrapper of ``alias``, unregister it and close its pools."""
    with contextlib.suppress(Exception):
        if hasattr(connections._connections, alias):
            connections[alias].close()
    with contextlib.suppress(Exception):
        delattr(connections._connections, alias)
    connections.settings.pop(alias, None)
    herokupool.registry.close(alias)


def request(alias: str, work: Callable[[Any], T]) -> T:
    """One request: ``work(connections[alias])``, then what ``request_finished`` runs."""
    try:
        return work(connections[alias])
    finally:
        close_old_connections()


def in_thread(target: Callable[[], T], *, timeout: float = 30) -> T:
    """Run ``target`` in a new thread (a thread of its own has its own wrappers, as a
    worker thread of a WSGI server); return its result or raise its exception."""
    outcome: dict[str, Any] = {}

    def body() -> None:
        try:
            outcome["result"] = target()
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=body, name="request")
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"the thread did not end within {timeout} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]  # type: ignore[no-any-return]


def one(wrapper: Any, sql: str, params: Any = None) -> Any:
    """The first row of ``sql`` through Django's cursor (None without rows)."""
    with wrapper.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone() if cursor.description else None


def pid_of(wrapper: Any) -> int:
    return int(one(wrapper, "SELECT pg_backend_pid()")[0])


@pytest.fixture
def role(admin: Any) -> Iterator[str]:
    """A NOLOGIN role of the test's own (only SET ROLE / SET SESSION AUTHORIZATION reach it),
    dropped afterwards."""
    name = f"hp_role_{uuid.uuid4().hex[:10]}"
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE ROLE {name}")
    yield name
    with admin.cursor() as cursor:
        cursor.execute(f"DROP ROLE IF EXISTS {name}")
