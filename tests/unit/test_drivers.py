"""The driver adapters' choice and the pool errors' types, on every driver installed.

What each adapter does to a real connection is tested against PostgreSQL in
tests/integration/test_drivers.py.
"""

from __future__ import annotations

import importlib
import pickle
from types import SimpleNamespace
from typing import Any

import django.db
import pytest
from django.db.utils import DatabaseErrorWrapper

from herokupool import drivers
from herokupool.errors import PoolClosed, PoolError, PoolOverloaded, PoolTimeout
from herokupool.pool import ConnectionPool
from tests.unit.fakes import FakeConnection, FakeDriver

INSTALLED = drivers.available()


def test_psycopg2_is_always_available_and_listed_first() -> None:
    assert INSTALLED[0] == "psycopg2"


@pytest.mark.parametrize("name", INSTALLED)
def test_an_adapter_is_made_once_per_driver(name: str) -> None:
    driver = drivers.get(name)
    assert driver is drivers.get(name)
    assert driver.name == name
    module = importlib.import_module(name)
    assert driver.errors == (module.Error, OSError)
    assert driver.operational_error is module.OperationalError


def test_an_unknown_driver_name_is_refused() -> None:
    with pytest.raises(ValueError, match="no herokupool driver named 'asyncpg'"):
        drivers.get("asyncpg")


class NotAConnection:
    closed = False

    def close(self) -> None:
        self.closed = True


def test_a_connection_of_neither_driver_is_refused_at_first_borrow() -> None:
    pool = ConnectionPool(NotAConnection, name="odd", background=False)
    with pytest.raises(TypeError, match="cannot pool NotAConnection objects"):
        pool.borrow()
    assert pool.stats()["in_use"] == 0
    assert pool.stats()["connections_created"] == 0


def test_the_pool_picks_the_driver_from_its_first_connection() -> None:
    pool = ConnectionPool(FakeDriver(), name="fake", background=False)
    pool.release(pool.borrow())
    assert pool._driver is drivers.for_connection(FakeConnection())  # a psycopg2-shaped fake
    pool.close()


def test_a_driver_named_up_front_is_used() -> None:
    pool = ConnectionPool(FakeDriver(), name="fake", background=False, driver="psycopg2")
    assert pool._driver is drivers.get("psycopg2")
    pool.close()


def test_status_names() -> None:
    assert drivers.status_name(drivers.ACTIVE) == "ACTIVE"
    assert drivers.status_name(drivers.HELD).startswith("HELD by a transaction() block")
    assert drivers.status_name(42) == "42"


def test_a_psycopg2_look_alike_gets_an_adapter_that_calls_its_methods_by_name() -> None:
    driver = drivers.for_connection(FakeConnection())
    assert driver.name == "psycopg2"
    assert driver is not drivers.get("psycopg2"), "that one calls psycopg2's C methods"
    assert driver is drivers.for_connection(FakeConnection())
    assert driver.transaction_status(FakeConnection()) == drivers.IDLE


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("name", INSTALLED)
@pytest.mark.parametrize("error", [PoolTimeout, PoolOverloaded, PoolClosed])
def test_pool_errors_are_each_drivers_operational_error(name: str, error: type) -> None:
    module = importlib.import_module(name)
    assert issubclass(error, PoolError)
    assert issubclass(error, module.OperationalError)
    assert issubclass(error, module.Error)


@pytest.mark.parametrize("name", INSTALLED)
def test_a_pool_error_reaches_django_as_its_operational_error(name: str) -> None:
    """Django's error wrapper, with the driver module its backend chose as ``Database``."""
    wrapper: Any = SimpleNamespace(Database=importlib.import_module(name), errors_occurred=False)
    cause = OSError("connection refused")
    with (
        pytest.raises(django.db.OperationalError, match="pool 'default': timed out") as info,
        DatabaseErrorWrapper(wrapper),
    ):
        raise PoolTimeout("pool 'default': timed out after 1.0 s") from cause
    assert isinstance(info.value.__cause__, PoolTimeout)
    assert wrapper.errors_occurred


@pytest.mark.parametrize("name", INSTALLED)
def test_pool_errors_answer_the_drivers_own_attributes(name: str) -> None:
    error = PoolTimeout("pool 'default': timed out")
    assert str(error) == "pool 'default': timed out"
    assert (error.pgerror, error.pgcode) == (None, None)  # psycopg2's
    if name == "psycopg":  # what psycopg 3's Error adds, set although its __init__ is not run
        assert (error.pgconn, error.pgresult, error.sqlstate) == (None, None, None)


@pytest.mark.parametrize("error", [PoolTimeout("pool 'x': timed out"), PoolClosed("closed")])
def test_pool_errors_pickle(error: PoolError) -> None:
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error)
    assert str(again) == str(error)


# --------------------------------------------------------------- through each adapter


def test_a_transaction_the_driver_holds_is_discarded_not_rolled_back(flavour: str) -> None:
    """psycopg 3 refuses rollback() inside its own transaction() block, whose exit would
    later act on the connection: the pool closes it.  psycopg2's own transaction is
    rolled back and the connection kept."""
    driver = FakeDriver()
    pool = ConnectionPool(driver, name="held", background=False)
    conn = pool.borrow()
    conn.begin()
    if flavour == "psycopg":
        conn._num_transactions = 1  # inside `with conn.transaction():`
    pool.release(conn)
    stats = pool.stats()
    if flavour == "psycopg":
        assert conn.closed
        assert (stats["connections_discarded"], conn.rollbacks) == (1, 0)
    else:
        assert not conn.closed
        assert (stats["connections_discarded"], conn.rollbacks) == (0, 1)
    pool.close()


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        (
            'invalid dsn: missing "=" after "s3cret" in connection info string\n',
            'invalid dsn: missing "=" after "********" in connection info string\n',
        ),
        (
            'invalid percent-encoded token: "s3cret%zz"\n',
            'invalid percent-encoded token: "********"\n',
        ),
        ("host=db password=s3cret port=5432", "host=db password=******** port=5432"),
        ("host=db password = 'a \\' b' port=5432", "host=db password = ******** port=5432"),
        ("postgres://me:s3cret@db:5432/app", "postgres://me:********@db:5432/app"),
        ("postgres://me@db/app", "postgres://me@db/app"),
        (
            'connection failed: connection to server at "10.0.0.1", port 5432 failed: FATAL:  '
            'password authentication failed for user "me"',
            'connection failed: connection to server at "10.0.0.1", port 5432 failed: FATAL:  '
            'password authentication failed for user "me"',
        ),
    ],
)
def test_what_may_be_a_password_is_masked_in_driver_texts(text: str, masked: str) -> None:
    from herokupool._redact import mask_driver_text

    assert mask_driver_text(text) == masked


def test_a_driver_that_cannot_be_imported_is_not_available(monkeypatch: pytest.MonkeyPatch) -> None:
    """psycopg installed without a libpq it can load raises ImportError on import."""
    real = drivers.get

    def get(name: str) -> drivers.Driver:
        if name == "psycopg":
            raise ImportError("no pq wrapper available")
        return real(name)

    monkeypatch.setattr(drivers, "get", get)
    monkeypatch.setattr(drivers.importlib.util, "find_spec", lambda name: object())
    assert drivers.available() == ["psycopg2"]
