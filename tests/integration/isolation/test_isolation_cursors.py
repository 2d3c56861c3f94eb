"""Issue 15, item 3: a cursor that outlives its request fails on its own, touching nothing.

Request 1 opens a cursor (a ``QuerySet.iterator()`` generator, a ``chunked_cursor()``, a
plain cursor, a raw driver cursor), uses it once and ends while the cursor is kept
alive.  Then another thread's request holds the same physical session inside
``transaction.atomic()``; meanwhile the stale cursor is used by one path (iteration,
``fetch*``, ``execute``, ``scroll``, ``copy_expert`` / ``copy``).  With the stock engine the
cursor's connection is closed: the call raises (psycopg2: ``InterfaceError`` "cursor
already closed"; psycopg 3: ``OperationalError`` "the connection is closed", except that a
client-side cursor still returns the rows it had buffered) and the other thread commits.
herokupool must fail the same way without sending a byte to the session now lent to the
other thread (on psycopg 3 buffered rows are dropped too: the call raises): its
transaction commits, and only its own rows persist.
"""

from __future__ import annotations

import contextlib
import io
import threading
import uuid
from collections.abc import Callable
from typing import Any

import psycopg2
import pytest
from django.db import (
    InterfaceError,
    OperationalError,
    close_old_connections,
    connections,
    transaction,
)
from django.db.backends.postgresql.psycopg_any import is_psycopg3

from tests.conftest import Server
from tests.integration.isolation.conftest import RAW_CLOSED, is_pooled, pid_of, request
from tests.testapp.models import Item

pytestmark = pytest.mark.integration

ROWS = 10


@pytest.fixture(scope="module")
def items_url(pg_server: Server) -> str:
    """A database of this module's own with testapp's Item table (``ROWS`` rows): another
    test run on the same server cannot touch it."""
    url = pg_server.create_database(f"hp_iso_{uuid.uuid4().hex[:10]}")
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute(
            "CREATE TABLE testapp_item (id bigserial PRIMARY KEY, name varchar(100) NOT NULL,"
            " data jsonb NOT NULL DEFAULT '{}', created timestamptz NOT NULL DEFAULT now())"
        )
    conn.close()
    return url


@pytest.fixture
def items(items_url: str) -> str:
    """``items_url`` with exactly ``ROWS`` rows named ``row 0``... at the start of the test."""
    conn = psycopg2.connect(items_url)
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute("TRUNCATE testapp_item")
        cursor.execute(
            "INSERT INTO testapp_item (name) SELECT 'row ' || n FROM generate_series(0, %s) n",
            [ROWS - 1],
        )
    conn.close()
    return items_url


def names(url: str) -> list[str]:
    """The committed names, not the ``row n`` ones the fixture inserted."""
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT name FROM testapp_item WHERE name NOT LIKE 'row %' ORDER BY id")
            return [row[0] for row in cursor.fetchall()]
    finally:
        conn.close()


def _iterator(wrapper: Any) -> Any:
    it = Item.objects.using(wrapper.alias).iterator(chunk_size=2)  # a named WITH HOLD cursor
    next(it)
    return it


def _chunked(wrapper: Any) -> Any:
    cursor = wrapper.chunked_cursor()
    cursor.cursor.itersize = 2  # the driver FETCHes 2 rows at a time while iterating
    cursor.execute("SELECT n FROM generate_series(1, %s) n", [ROWS])
    cursor.fetchone()
    return cursor


def _plain(wrapper: Any) -> Any:
    cursor = wrapper.cursor()
    cursor.execute("SELECT n FROM generate_series(1, %s) n", [ROWS])  # buffered client-side
    cursor.fetchone()
    return cursor


def _raw(wrapper: Any) -> Any:
    wrapper.ensure_connection()
    cursor = wrapper.connection.cursor()  # the driver's own, no Django wrapper
    cursor.execute("SELECT n FROM generate_series(1, %s) n", [ROWS])
    cursor.fetchone()
    return cursor


def _drain(iterable: Any) -> None:
    for _ in iterable:
        pass


INSERT_LATE = "INSERT INTO testapp_item (name) VALUES ('late')"


def _copy(cursor: Any) -> None:
    """A COPY out: psycopg2's ``copy_expert()``, psycopg 3's ``copy()``."""
    if is_psycopg3:
        with cursor.copy("COPY (SELECT 1) TO STDOUT") as copy:
            for _ in copy:
                pass
    else:
        cursor.copy_expert("COPY (SELECT 1) TO STDOUT", io.StringIO())


#: name -> (what request 1 keeps, what is done with it after the request ended)
LATE: dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any]]] = {
    # The generator's next(): the rest of its chunk is buffered, then it FETCHes.
    "queryset_iterator_next": (_iterator, _drain),
    "chunked_cursor_for_loop": (_chunked, _drain),  # Django's CursorWrapper.__iter__
    "chunked_cursor_raw_for_loop": (_chunked, lambda c: _drain(c.cursor)),  # psycopg2's C loop
    "chunked_cursor_fetchone": (_chunked, lambda c: c.fetchone()),
    "chunked_cursor_fetchmany": (_chunked, lambda c: c.fetchmany(3)),
    "chunked_cursor_fetchall": (_chunked, lambda c: c.fetchall()),
    "chunked_cursor_scroll": (_chunked, lambda c: c.scroll(1)),
    "chunked_cursor_execute": (
        lambda wrapper: wrapper.chunked_cursor(),  # created, not yet executed
        lambda c: c.execute("SELECT n FROM generate_series(1, 3) n"),
    ),
    "plain_cursor_fetchone_buffered": (_plain, lambda c: c.fetchone()),
    "plain_cursor_fetchall_buffered": (_plain, lambda c: c.fetchall()),
    "plain_cursor_execute": (_plain, lambda c: c.execute(INSERT_LATE)),
    "plain_cursor_scroll": (_plain, lambda c: c.scroll(1)),
    "plain_cursor_copy": (_plain, _copy),
    "raw_cursor_fetchone_buffered": (_raw, lambda c: c.fetchone()),
    "raw_cursor_execute": (_raw, lambda c: c.execute(INSERT_LATE)),
    "raw_cursor_copy": (_raw, _copy),
}
#: psycopg 3's client-side cursors keep their buffered rows after the connection closed.
BUFFERED = {
    "plain_cursor_fetchone_buffered",
    "plain_cursor_fetchall_buffered",
    "plain_cursor_scroll",
}
BUFFERED_RAW = {"raw_cursor_fetchone_buffered"}


@pytest.mark.parametrize("path", list(LATE))
def test_a_cursor_used_after_its_request_raises_interface_error_and_touches_nothing(
    register: Callable[..., str], engine: str, items: str, path: str
) -> None:
    """Item 3: every path of a cursor kept past its request (the generator's ``next()``,
    Django's and the driver's ``for row in cursor``, ``fetchone/fetchmany/fetchall``,
    ``execute``, ``scroll``, ``copy_expert`` / ``copy``; server-side, plain and raw cursors,
    with rows still buffered) raises as on a closed connection while another thread holds
    the same physical session inside ``atomic()``; that thread's transaction commits with
    its own rows only."""
    keep, late = LATE[path]
    alias = register(url=items)
    stale, pid1 = request(alias, lambda wrapper: (keep(wrapper), pid_of(wrapper)))

    inside = threading.Event()
    late_done = threading.Event()
    other: dict[str, Any] = {}

    def other_request() -> None:
        try:
            wrapper = connections[alias]
            try:
                with transaction.atomic(using=alias):
                    Item.objects.using(alias).create(name="other 1")
                    other["pid"] = pid_of(wrapper)
                    inside.set()
                    assert late_done.wait(20), "the stale cursor's call never returned"
                    Item.objects.using(alias).create(name="other 2")
            finally:
                close_old_connections()
        except BaseException as error:
            other["error"] = error
        finally:
            inside.set()

    thread = threading.Thread(target=other_request, name="other-request")
    thread.start()
    try:
        assert inside.wait(20)
        assert "error" not in other, other.get("error")
        if is_psycopg3 and not is_pooled(engine) and path in BUFFERED | BUFFERED_RAW:
            late(stale)  # the stock engine's buffered rows: no I/O
        else:
            with pytest.raises((InterfaceError, OperationalError, *RAW_CLOSED)):
                late(stale)
    finally:
        late_done.set()
        thread.join(30)
        # Closed the way the application would at last (psycopg 3 warns about a server-side
        # cursor collected open): on the stock engine its connection is closed; herokupool's
        # ended with its loan.  Neither may send anything.
        with contextlib.suppress(Exception):
            stale.close()
    assert not thread.is_alive()
    assert "error" not in other, f"the other request failed: {other.get('error')!r}"
    if is_pooled(engine):
        assert other["pid"] == pid1, "MAX_CONNS=1: the other request got the same session"
    assert names(items) == ["other 1", "other 2"], "the other transaction, and nothing else"
