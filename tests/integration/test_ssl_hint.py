"""On a dyno herokupool requires SSL: a server without it gets an error that says why.

The test server has no SSL.  The URL names a host that is not local ("db.test") and
reaches the server through libpq's ``hostaddr``, as a Heroku dyno reaches its database.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest
from django.db import OperationalError, connections

import herokupool
from herokupool import drivers, registry
from herokupool.config import with_ssl_hint
from herokupool.pool import ConnectionPool
from tests.drivers import INSTALLED, connector

pytestmark = pytest.mark.integration


@pytest.fixture
def remote_url(dsn: str) -> str:
    parts = urlsplit(dsn)
    host = parts.hostname or ""
    if not host.startswith("127.") and host not in {"localhost", "::1"}:
        pytest.fail(f"this test reaches the server through hostaddr, but its host is {host!r}")
    netloc = parts.netloc.rsplit("@", 1)
    userinfo = netloc[0] + "@" if len(netloc) == 2 else ""
    query = "hostaddr=127.0.0.1" if host != "::1" else "hostaddr=::1"
    return urlunsplit(parts._replace(netloc=f"{userinfo}db.test:{parts.port or 5432}", query=query))


@pytest.fixture
def wrapper_for(alias: str) -> Iterator[object]:
    from herokupool.db.backends.postgresql.base import DatabaseWrapper

    made: list[DatabaseWrapper] = []

    def make(settings: dict[str, object]) -> DatabaseWrapper:
        wrapper = DatabaseWrapper(
            connections.configure_settings({"default": settings})["default"], alias
        )
        made.append(wrapper)
        return wrapper

    yield make
    for wrapper in made:
        wrapper.close()
    registry.close(alias)


def test_the_error_says_herokupool_required_ssl_because_dyno_is_set(
    monkeypatch: pytest.MonkeyPatch, remote_url: str, wrapper_for: object
) -> None:
    monkeypatch.setenv("DYNO", "web.1")
    monkeypatch.setenv("DATABASE_URL", remote_url)
    settings = herokupool.config()["default"]
    assert settings["OPTIONS"]["sslmode"] == "require"
    wrapper = wrapper_for(settings)  # type: ignore[operator]
    with pytest.raises(OperationalError) as info:
        wrapper.ensure_connection()
    message = str(info.value)
    assert "server does not support SSL, but SSL was required" in message
    assert "herokupool required SSL (sslmode=require) because DYNO is set" in message
    assert "set sslmode in the query string of DATABASE_URL (?sslmode=prefer" in message


def test_the_override_the_error_suggests_connects(
    monkeypatch: pytest.MonkeyPatch, remote_url: str, wrapper_for: object
) -> None:
    monkeypatch.setenv("DYNO", "web.1")
    monkeypatch.setenv("DATABASE_URL", remote_url + "&sslmode=prefer")
    wrapper = wrapper_for(herokupool.config()["default"])  # type: ignore[operator]
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        assert cursor.fetchone() == (False,)


def test_an_sslmode_the_user_chose_keeps_libpqs_error(
    monkeypatch: pytest.MonkeyPatch, remote_url: str, wrapper_for: object
) -> None:
    monkeypatch.setenv("DYNO", "web.1")
    monkeypatch.setenv("DATABASE_URL", remote_url + "&sslmode=require")
    wrapper = wrapper_for(herokupool.config()["default"])  # type: ignore[operator]
    with pytest.raises(OperationalError) as info:
        wrapper.ensure_connection()
    assert "server does not support SSL, but SSL was required" in str(info.value)
    assert "herokupool" not in str(info.value)


@pytest.mark.parametrize("driver_name", INSTALLED)
def test_each_drivers_error_gets_the_hint_through_the_pool(
    driver_name: str,
    monkeypatch: pytest.MonkeyPatch,
    remote_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """psycopg 3 words libpq's error differently ("connection failed: ..."): the hint is
    added all the same, as the driver's own OperationalError, and the pool passes it on."""
    monkeypatch.setenv("DYNO", "web.1")
    monkeypatch.setenv("DATABASE_URL", remote_url)
    settings = herokupool.config()["default"]
    url = remote_url + "&sslmode=require"  # what the backend's connect() would send
    pool = ConnectionPool(
        with_ssl_hint(connector(driver_name, url), settings), name="ssl", background=False
    )
    try:
        with (
            caplog.at_level(logging.WARNING, logger="herokupool"),
            pytest.raises(drivers.get(driver_name).operational_error) as info,
        ):
            pool.borrow()
    finally:
        pool.close()
    message = str(info.value)
    assert "server does not support SSL, but SSL was required" in message
    assert "herokupool required SSL (sslmode=require) because DYNO is set" in message
    assert isinstance(info.value.__cause__, drivers.get(driver_name).operational_error)
    logged = " ".join(record.getMessage() for record in caplog.records)
    assert "could not open a connection" in logged
    password = urlsplit(url).password
    for text in (message, logged, repr(info.value)):
        assert not password or password not in text
