"""Fixtures for tests against a real PostgreSQL.

``make_wrapper`` builds herokupool DatabaseWrappers for a fresh alias per test, so each
test gets its own pool with its own settings, without Django's test-database
machinery.  Wrappers are per thread, as in Django: call it in each thread.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import dj_database_url
import pytest
from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper

from herokupool import registry

pytestmark = pytest.mark.integration

MakeWrapper = Callable[..., BaseDatabaseWrapper]


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
