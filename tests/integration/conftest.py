"""Fixtures for tests against a real PostgreSQL.

``make_wrapper`` builds herokupool DatabaseWrappers for a fresh alias per test, so each
test gets its own pool with its own settings, without Django's test-database
machinery.  Wrappers are per thread, as in Django: call it in each thread.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import dj_database_url
import pytest
from django.db import InterfaceError, OperationalError, connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.postgresql.psycopg_any import is_psycopg3

from devtools.relay import TcpRelay
from herokupool import registry

pytestmark = pytest.mark.integration

#: What using a closed connection raises through Django on the driver in use, and its
#: message: what the stock engine raises after its connection was closed.
CLOSED_ERROR: type[Exception] = OperationalError if is_psycopg3 else InterfaceError
CLOSED_MESSAGE = "the connection is closed" if is_psycopg3 else "connection already closed"
#: libpq's transaction status (psycopg2 and psycopg 3 number them alike).
IDLE, INTRANS, INERROR = 0, 2, 3

MakeWrapper = Callable[..., BaseDatabaseWrapper]
MakeCluster = Callable[..., Any]


def settings_for(
    url: str, engine: str = "herokupool.db.backends.postgresql", **options: Any
) -> dict[str, Any]:
    settings = dj_database_url.parse(url, engine=engine)
    settings["OPTIONS"] = {**settings.get("OPTIONS", {}), **options}
    return connections.configure_settings({"default": settings})["default"]


@pytest.fixture
def alias() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make_wrapper(dsn: str, alias: str, app_name: str) -> Iterator[MakeWrapper]:
    """``make_wrapper(**OPTIONS)`` -> a new wrapper on this test's alias and database."""
    from herokupool.db.backends.postgresql.base import DatabaseWrapper

    made: list[BaseDatabaseWrapper] = []

    def make(
        *, url: str | None = None, name: str | None = None, **options: Any
    ) -> BaseDatabaseWrapper:
        options.setdefault("application_name", app_name)
        wrapper = DatabaseWrapper(settings_for(url or dsn, **options), alias=name or alias)
        made.append(wrapper)
        return wrapper

    yield make
    for wrapper in made:
        with contextlib.suppress(Exception):
            wrapper.close()
    for name in {w.alias for w in made}:
        registry.close(name)


@pytest.fixture
def sessions(admin: Any, app_name: str) -> Callable[[], int]:
    """Count this test's server sessions (pg_stat_activity, by application_name)."""

    def count() -> int:
        with admin.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", [app_name]
            )
            return int(cursor.fetchone()[0])

    return count


def pids_of(admin: Any, app_name: str) -> set[int]:
    with admin.cursor() as cursor:
        cursor.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s", [app_name])
        return {row[0] for row in cursor.fetchall()}


def backend_pid(wrapper: BaseDatabaseWrapper) -> int:
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return int(cursor.fetchone()[0])


def raw_backend_pid(conn: Any) -> int:
    """The backend pid libpq knows for a raw connection of either driver (no query)."""
    return int(conn.info.backend_pid)


def transaction_status(conn: Any) -> int:
    """libpq's transaction status of a raw connection of either driver (no query)."""
    return int(conn.info.transaction_status)


def dbname(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


@pytest.fixture(autouse=True)
def _allow_database_access(
    request: pytest.FixtureRequest, django_db_blocker: Any
) -> Iterator[None]:
    """These tests talk to their own database through make_wrapper, not Django's test
    database: lift pytest-django's block (tests marked django_db manage it themselves)."""
    if request.node.get_closest_marker("django_db"):
        yield
        return
    with django_db_blocker.unblock():
        yield


# ------------------------------------------------ private servers (restart, freeze, fill)


@pytest.fixture(scope="module")
def template_datadir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One initdb for the module; each test copies it (a fraction of initdb's second)."""
    from devtools.pgcluster import PostgresCluster, find_bindir

    datadir = tmp_path_factory.mktemp("pgtemplate") / "data"
    PostgresCluster(datadir, bindir=find_bindir("embedded")).init()
    return datadir


@pytest.fixture
def make_cluster(template_datadir: Path, tmp_path: Path) -> Iterator[MakeCluster]:
    """``make_cluster(**extra_conf)`` -> this test's own running server."""
    from devtools.pgcluster import PostgresCluster, find_bindir

    made: list[Any] = []

    def make(**extra_conf: str) -> Any:
        datadir = tmp_path / f"pg{len(made)}"
        shutil.copytree(template_datadir, datadir, symlinks=True)
        cluster = PostgresCluster(datadir, bindir=find_bindir("embedded"), extra_conf=extra_conf)
        made.append(cluster)
        cluster.start()
        return cluster

    yield make
    for cluster in made:
        resume(cluster)  # a frozen postmaster cannot be stopped
        cluster.destroy()


def postmaster_pid(cluster: Any) -> int:
    return int((cluster.datadir / "postmaster.pid").read_text(encoding="utf-8").split()[0])


def resume(cluster: Any) -> None:
    if cluster.is_running():
        os.kill(postmaster_pid(cluster), signal.SIGCONT)


@pytest.fixture
def relay(pg_server: Any) -> Iterator[TcpRelay]:
    """A relay to the test server (paused by the test; forwarding again at the end)."""
    parts = urlsplit(pg_server.url)
    with TcpRelay(parts.hostname or "127.0.0.1", parts.port or 5432) as relay:
        try:
            yield relay
        finally:
            relay.resume()


def through(relay: TcpRelay, dsn: str) -> str:
    """``dsn`` with its host and port replaced by the relay's."""
    parts = urlsplit(dsn)
    netloc = parts.netloc.rsplit("@", 1)
    userinfo = netloc[0] + "@" if len(netloc) == 2 else ""
    return urlunsplit(parts._replace(netloc=f"{userinfo}{relay.host}:{relay.port}"))
