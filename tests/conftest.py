"""Shared fixtures: the test PostgreSQL server and the rule that nothing may skip in CI.

The server, in the order read: HEROKUPOOL_TEST_DSN; else DATABASE_URL (the only one Heroku CI
sets); else an embedded PostgreSQL started for the session in a temporary folder (with its own
password, see devtools.pgcluster), so ``make test`` passes on a machine with nothing running.
The URL's user must be allowed to CREATE DATABASE: the suite creates ``herokupool_test`` (and
Django's ``test_*`` databases) there, and drops the databases it created at the end of the
session; a database that existed before the session is left alone.  Under tox both names get the
environment's name as a suffix (``herokupool_test_py311_django52_full``): two cells running at
once on one server must never share, drop or clobber each other's databases.

With HEROKUPOOL_REQUIRE_SERVICES=1 (as .ci/run sets) a test that would skip for a
missing service (PostGIS, PgBouncer, ...) fails instead, and so does any other skip:
a skipped test proves nothing.

The driver: Django's backend loads psycopg 3 whenever it can import it, else psycopg2, so the
virtualenv decides which driver a run tests. HEROKUPOOL_TEST_DRIVER (psycopg2 or psycopg3, set
by `make test-psycopg2` / `make test-psycopg3` and by every tox cell) names the one the run is
meant for: the session refuses to start when Django loaded the other, so a run can never test
the wrong driver silently. pytest's header names the driver loaded.

A test of something only one driver has (psycopg2's ``cursor_factory`` classes, psycopg 3's
``Connection.execute``) is marked ``psycopg2_only`` or ``psycopg3_only`` and *deselected* on
the other driver: it is not a skip, there is nothing to run.

The Django version: a tox cell's name says which (``py312-django61``), and the session refuses to
start when pip installed another (as it did while django-prometheus, which excludes Django 6.1,
was in the test extra). A test of django-prometheus' /metrics view is marked
``django_prometheus``: on Django 6.1 and newer, which django-prometheus 2.5.0 (the newest)
excludes, it is deselected when django-prometheus is not installed; on an older Django a
session that would run one refuses to start without it (``make venv`` installs it).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest

REQUIRE_SERVICES = os.environ.get("HEROKUPOOL_REQUIRE_SERVICES", "") not in ("", "0")
DRIVERS = ("psycopg2", "psycopg3")


def loaded_driver() -> str:
    """The driver Django's PostgreSQL backend uses in this process: psycopg2 or psycopg3."""
    from django.db.backends.postgresql.psycopg_any import is_psycopg3

    return "psycopg3" if is_psycopg3 else "psycopg2"


def check_driver() -> None:
    """Refuse the session when Django loaded another driver than HEROKUPOOL_TEST_DRIVER names."""
    expected = os.environ.get("HEROKUPOOL_TEST_DRIVER", "")
    if not expected:
        return
    if expected not in DRIVERS:
        raise pytest.UsageError(
            f"HEROKUPOOL_TEST_DRIVER ({expected!r}) must be one of {', '.join(DRIVERS)}."
        )
    actual = loaded_driver()
    if actual != expected:
        hint = (
            "install herokupool[psycopg] (make venv-pg3 builds .venv-pg3 with it)"
            if expected == "psycopg3"
            else "use a virtualenv without the psycopg package (make venv builds .venv)"
        )
        raise pytest.UsageError(
            f"HEROKUPOOL_TEST_DRIVER is {expected} but Django loaded {actual} in this "
            f"virtualenv ({sys.prefix}): {hint}."
        )


def check_django() -> None:
    """Refuse a tox cell whose Django is another version than its name says: pip installs an
    older Django without a word when a test dependency excludes the one tox.ini pins."""
    cell = os.environ.get("TOX_ENV_NAME", "")
    named = re.search(r"(?:^|-)django(\d)(\d+)(?:-|$)", cell)
    if named is None:
        return
    import django

    expected = (int(named[1]), int(named[2]))
    if django.VERSION[:2] != expected:
        raise pytest.UsageError(
            f"the tox environment {cell} is meant for Django {expected[0]}.{expected[1]} but "
            f"has Django {django.__version__}: a dependency in this environment excludes "
            f"Django {expected[0]}.{expected[1]} (pip resolved an older one to satisfy it)."
        )


def pytest_report_header(config: pytest.Config) -> str:
    import django

    driver = loaded_driver()
    if driver == "psycopg3":
        import psycopg

        version = psycopg.__version__
    else:
        version = psycopg2.__version__.split()[0]
    expected = os.environ.get("HEROKUPOOL_TEST_DRIVER")
    checked = f" (HEROKUPOOL_TEST_DRIVER={expected})" if expected else ""
    return f"herokupool: driver {driver} {version}{checked}, Django {django.__version__}"


#: Appended to the databases this suite names, so parallel tox cells on one server stay apart.
DB_SUFFIX = (
    re.sub(r"\W", "_", f"_{os.environ['TOX_ENV_NAME']}") if "TOX_ENV_NAME" in os.environ else ""
)


def require(available: bool, what: str) -> None:
    """Skip (locally) or fail (in CI) when a service a test needs is missing."""
    if available:
        return
    if REQUIRE_SERVICES:
        pytest.fail(f"{what} is required (HEROKUPOOL_REQUIRE_SERVICES=1) but missing")
    pytest.skip(f"{what} is not available")


#: Markers of tests that exist for one driver only -> whether that driver is the one in use.
DRIVER_MARKERS = {"psycopg2_only": False, "psycopg3_only": True}


#: The first Django version django-prometheus does not support (2.5.0 declares Django<6.1).
DJANGO_PROMETHEUS_BEFORE = (6, 1)


def django_prometheus_deselected(items: list[pytest.Item]) -> bool:
    """Whether the tests marked django_prometheus are deselected: django-prometheus is not
    installed and this Django is one it does not support. Raises UsageError when it is not
    installed and this Django is one it supports: the tests would prove nothing by leaving."""
    import django

    if importlib.util.find_spec("django_prometheus") is not None:
        return False
    if django.VERSION[:2] >= DJANGO_PROMETHEUS_BEFORE:
        return True
    if any(item.get_closest_marker("django_prometheus") is not None for item in items):
        raise pytest.UsageError(
            f"django-prometheus is not installed in this virtualenv ({sys.prefix}) and its "
            f"Django, {django.__version__}, is one django-prometheus supports: install "
            "herokupool[django-prometheus] (make venv does) to run the tests marked "
            "django_prometheus."
        )
    return False


def pytest_configure(config: pytest.Config) -> None:
    check_driver()
    check_django()
    config.addinivalue_line("markers", "psycopg2_only: runs on psycopg2 only (else deselected)")
    config.addinivalue_line("markers", "psycopg3_only: runs on psycopg 3 only (else deselected)")


# trylast: after -k and -m have deselected theirs, so that `-m "not django_prometheus"` runs.
@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from django.db.backends.postgresql.psycopg_any import is_psycopg3

    without_django_prometheus = django_prometheus_deselected(items)
    keep, drop = [], []
    for item in items:
        wrong_driver = any(
            item.get_closest_marker(name) is not None and needs_psycopg3 != is_psycopg3
            for name, needs_psycopg3 in DRIVER_MARKERS.items()
        )
        unsupported = (
            without_django_prometheus and item.get_closest_marker("django_prometheus") is not None
        )
        (drop if wrong_driver or unsupported else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_SERVICES and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped, and HEROKUPOOL_REQUIRE_SERVICES=1 forbids skips: {reason}"


@dataclass(frozen=True)
class Server:
    """A PostgreSQL server the tests may create databases on (as a superuser)."""

    url: str  # to the "postgres" database
    embedded: bool
    #: Databases create_database() made in this session (not those that already existed).
    created: list[str] = field(default_factory=list)

    def url_for(self, dbname: str) -> str:
        parts = urlsplit(self.url)
        return urlunsplit(parts._replace(path="/" + dbname))

    def connect(self, dbname: str = "postgres") -> Any:
        conn = psycopg2.connect(self.url_for(dbname))
        conn.autocommit = True
        return conn

    def create_database(self, dbname: str) -> str:
        """Create ``dbname`` unless it exists; it is dropped at the end of the session if this
        created it. Returns its URL."""
        conn = self.connect()
        try:
            with conn.cursor() as cursor:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", [dbname])
                if cursor.fetchone() is None:
                    cursor.execute(f'CREATE DATABASE "{dbname}"')
                    self.created.append(dbname)
        finally:
            conn.close()
        return self.url_for(dbname)

    def drop_created(self) -> None:
        """Drop the databases this session created. FORCE: a pool of this process, or a
        server process a test left behind, may still hold a connection to one."""
        conn = self.connect()
        try:
            with conn.cursor() as cursor:
                while self.created:
                    name = self.created.pop()
                    cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            conn.close()

    def has_extension(self, name: str) -> bool:
        conn = self.connect()
        try:
            with conn.cursor() as cursor:
                cursor.execute("SELECT 1 FROM pg_available_extensions WHERE name = %s", [name])
                return cursor.fetchone() is not None
        finally:
            conn.close()


def _env_dsn() -> str | None:
    """The test server's URL from the environment, in the documented order."""
    return os.environ.get("HEROKUPOOL_TEST_DSN") or os.environ.get("DATABASE_URL") or None


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    dsn = _env_dsn()
    if dsn:
        server = Server(url=urlunsplit(urlsplit(dsn)._replace(path="/postgres")), embedded=False)
        try:
            yield server
        finally:
            server.drop_created()
        return
    from devtools.pgcluster import PostgresCluster, find_bindir

    datadir = tempfile.mkdtemp(prefix="herokupool-pg-")
    cluster = PostgresCluster(datadir, bindir=find_bindir("embedded"))
    cluster.init()
    cluster.start()
    try:
        yield Server(url=cluster.dsn("postgres"), embedded=True)
    finally:
        cluster.stop(mode="immediate")
        shutil.rmtree(datadir, ignore_errors=True)


@pytest.fixture(scope="session")
def dsn(pg_server: Server) -> str:
    """URL of a database the integration tests own (created once per session)."""
    return pg_server.create_database(f"herokupool_test{DB_SUFFIX}")


@pytest.fixture
def admin(pg_server: Server) -> Iterator[Any]:
    """An autocommit superuser connection for observing the server (pg_stat_activity)."""
    conn = pg_server.connect()
    yield conn
    conn.close()


@pytest.fixture
def app_name() -> str:
    """A unique application_name, so pg_stat_activity counts only this test's sessions."""
    return f"hp-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def django_db_modify_db_settings(pg_server: Server) -> None:
    """Point Django's test settings at the session's server (in place, before any use)."""
    from django.conf import settings

    parts = urlsplit(pg_server.url)
    settings.DATABASES["default"].update(
        {
            "HOST": parts.hostname or "",
            "PORT": str(parts.port or ""),
            "USER": parts.username or "",
            "PASSWORD": parts.password or "",
            "NAME": f"herokupool_django{DB_SUFFIX}",
        }
    )
