"""The release's fast path (``unchanged``, given to the pool beside ``prepare_release``) on a
real PostgreSQL, through the tracked connections of the driver Django chose.

The pool skips the hook, the driver's checks and the clean-up of unread messages when
``unchanged(conn)`` says the loan left nothing behind.  Each way a loan can leave something
(client state, session state, a transaction, a block of psycopg's own, a held lock, a loan
whose cursors did not end, a closed connection) must make it say False, so that the slow
path restores, undoes or closes as before; a loan that did nothing must make it say True,
or the fast path is never taken.  No Django: the backend's driver modules open the
connections as the backend does.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db.backends.postgresql.psycopg_any import is_psycopg3

from herokupool import drivers
from herokupool.pool import ConnectionPool
from tests.drivers import connect, query

pytestmark = pytest.mark.integration

#: The backend's driver module (connect, release_hook, unchanged) for the installed driver.
BACKEND: Any = importlib.import_module(
    "herokupool.db.backends._psycopg" if is_psycopg3 else "herokupool.db.backends._psycopg2"
)


def _params(dsn: str) -> dict[str, Any]:
    return {"conninfo": dsn} if is_psycopg3 else {"dsn": dsn}


def _sql(statement: str) -> Callable[[Any], None]:
    def run(conn: Any) -> None:
        query(conn, statement)

    return run


def _set(name: str, value: Any) -> Callable[[Any], None]:
    def change(conn: Any) -> None:
        setattr(conn, name, value)

    return change


def _isolation(conn: Any) -> None:
    if is_psycopg3:
        conn.isolation_level = 3  # psycopg.IsolationLevel.SERIALIZABLE
    else:
        conn.set_session(isolation_level="SERIALIZABLE")


def _notice(conn: Any) -> None:
    if is_psycopg3:
        conn.add_notice_handler(lambda diagnostic: None)
    _sql("DO $$ BEGIN RAISE NOTICE 'left behind'; END $$")(conn)


def _cursor_factory(conn: Any) -> None:
    if is_psycopg3:
        import psycopg

        conn.cursor_factory = psycopg.ClientCursor
    else:
        import psycopg2.extras

        conn.cursor_factory = psycopg2.extras.DictCursor


#: What a test's loan left open, kept alive until the test ends.
_kept: list[Any] = []


@pytest.fixture(autouse=True)
def _forget_kept() -> Iterator[None]:
    yield
    _kept.clear()


#: Loans that leave something behind, on both drivers: name -> what the loan does.
LEFT_BEHIND: dict[str, Callable[[Any], None]] = {
    "a raw BEGIN": _sql("BEGIN"),
    "a SET": _sql("SET search_path TO pg_catalog"),
    "a PREPARE": _sql("PREPARE hp_fast AS SELECT 1"),
    "a LISTEN": _sql("LISTEN hp_fast"),
    "autocommit off": _set("autocommit", False),
    "the isolation level changed": _isolation,
    "the cursor class changed": _cursor_factory,
    "a notice": _notice,
}

if is_psycopg3:

    def _transaction_block(conn: Any) -> None:
        block = conn.transaction()
        block.__enter__()  # never exited: psycopg's block stays open
        _kept.append(block)  # while the test runs (a collected one would exit)

    def _pipeline(conn: Any) -> None:
        block = conn.pipeline()
        block.__enter__()
        _kept.append(block)

    def _lock(conn: Any) -> None:
        conn.lock.acquire()

    def _dumper(conn: Any) -> None:
        from psycopg.types.string import StrDumper

        conn.adapters.register_dumper(bytearray, StrDumper)

    def _forget(conn: Any) -> None:
        _sql("DEALLOCATE ALL")(conn)

    def _notification(conn: Any) -> None:
        conn._notifies_backlog.append("unread")  # as psycopg queues one with no handler

    LEFT_BEHIND.update(
        {
            "the row factory changed": _set("row_factory", lambda cursor: tuple),
            "prepare_threshold changed": _set("prepare_threshold", 0),
            "prepared_max changed": _set("prepared_max", 7),
            "a server cursor class changed": _set("server_cursor_factory", None),
            "a transaction() block left open": _transaction_block,
            "a pipeline left open": _pipeline,
            "the lock held": _lock,
            "an adapter registered": _dumper,
            "prepared statements forgotten": _forget,
            "a notification unread": _notification,
        }
    )
else:

    def _notification(conn: Any) -> None:
        conn.notifies.append("unread")  # as psycopg2 queues one

    def _typecaster(conn: Any) -> None:
        import psycopg2.extensions as ext

        ext.register_type(ext.new_type((25,), "HP_TEXT", lambda v, c: v), conn)

    LEFT_BEHIND.update(
        {
            "a notification unread": _notification,
            "a typecaster registered": _typecaster,
            "the encoding changed": lambda conn: conn.set_client_encoding("LATIN1"),
        }
    )


@pytest.fixture
def conn(dsn: str) -> Iterator[Any]:
    conn = BACKEND.connect(_params(dsn))
    yield conn
    conn.close()


def _loan(conn: Any, does: Callable[[Any], None] | None = None) -> None:
    conn.begin_loan()
    if does is not None:
        does(conn)
    conn.end_loan()


def test_a_loan_that_did_nothing_takes_the_fast_path(conn: Any) -> None:
    """What the slow path would find for it: nothing to do."""
    _sql("SELECT 1")(conn)  # between loans: the pool's own statements are not the loan's
    _loan(conn, _sql("SELECT 1"))
    assert BACKEND.unchanged(conn) is True
    assert drivers.for_connection(conn).untouched(conn)
    assert BACKEND.release_hook(None)(conn) is None


@pytest.mark.parametrize("what", list(LEFT_BEHIND))
def test_a_loan_that_left_something_behind_takes_the_slow_path(conn: Any, what: str) -> None:
    _loan(conn, LEFT_BEHIND[what])
    assert BACKEND.unchanged(conn) is False


def test_a_loan_whose_cursors_did_not_end_takes_the_slow_path(conn: Any) -> None:
    conn.begin_loan()
    assert BACKEND.unchanged(conn) is False


def test_a_closed_connection_takes_the_slow_path(conn: Any) -> None:
    _loan(conn)
    conn.close()
    assert BACKEND.unchanged(conn) is False


def test_a_connection_of_another_class_takes_the_slow_path(dsn: str) -> None:
    plain = connect("psycopg" if is_psycopg3 else "psycopg2", dsn)
    try:
        assert BACKEND.unchanged(plain) is False
    finally:
        plain.close()


@pytest.mark.parametrize("what", [*LEFT_BEHIND, "nothing"])
def test_through_a_pool_only_a_loan_that_did_nothing_skips_the_slow_path(
    dsn: str, what: str
) -> None:
    """A loan that did nothing is released without the hook and its connection kept; one
    that left something goes through the slow path (the hook restores and undoes, or the
    connection is closed), and the next loan is back on the fast path."""
    hooked: list[Any] = []
    hook = BACKEND.release_hook(None)

    def counting(conn: Any) -> str | None:
        hooked.append(conn)
        return hook(conn)  # type: ignore[no-any-return]

    pool = ConnectionPool(
        lambda: BACKEND.connect(_params(dsn)),
        name="fast",
        max_conns=1,
        prepare_release=counting,
        unchanged=BACKEND.unchanged,
        background=False,
    )
    try:
        conn = pool.borrow()
        _loan(conn, LEFT_BEHIND.get(what))
        pool.release(conn)
        if what == "the lock held":
            conn.lock.release()  # the pool closed it without the lock (psycopg's close)
        slow = bool(hooked) or bool(conn.closed)
        assert slow is (what != "nothing")
        again = pool.borrow()
        assert (again is conn) is not bool(conn.closed)
        _loan(again)
        assert BACKEND.unchanged(again) is True
        hooked.clear()
        pool.release(again)
        assert not hooked
    finally:
        pool.close()
