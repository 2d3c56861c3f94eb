"""The request lifecycle on herokupool's backend against a real PostgreSQL.

Every request runs Django's own ``connect()`` and ``close()``, as without a pool: the
request's first statement borrows a physical connection and ``close_old_connections()``
at its end gives it back and closes the wrapper.  ``request()`` below is what a request
does to its thread's wrapper.  The observables are the server's (backend pids,
``pg_stat_activity.query``: the last statement a session ran, which shows whether a
borrow sent anything), the pool's stats and Django's ``connection_created`` signal.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import DatabaseError, connections, transaction
from django.db.backends.postgresql.psycopg_any import IsolationLevel
from django.db.backends.signals import connection_created

import herokupool
from herokupool import registry
from tests.helpers import wait_until
from tests.integration.conftest import CLOSED_ERROR, CLOSED_MESSAGE, MakeWrapper, backend_pid

pytestmark = pytest.mark.integration


def request(wrapper: Any, sql: str = "SELECT pg_backend_pid()") -> Any:
    """One request: its statements, then request_finished's close_old_connections()."""
    try:
        with wrapper.cursor() as cursor:
            cursor.execute(sql)
            return cursor.fetchone()[0] if cursor.description else None
    finally:
        wrapper.close_if_unusable_or_obsolete()


def last_query(admin: Any, pid: int) -> str:
    with admin.cursor() as cursor:
        cursor.execute("SELECT query FROM pg_stat_activity WHERE pid = %s", [pid])
        return str(cursor.fetchone()[0])


@pytest.fixture
def created() -> Iterator[list[Any]]:
    """The wrappers ``connection_created`` was sent for, in order."""
    seen: list[Any] = []

    def receiver(sender: Any, connection: Any, **kwargs: Any) -> None:
        seen.append(connection)

    connection_created.connect(receiver, weak=False)
    yield seen
    connection_created.disconnect(receiver)


def test_the_request_end_returns_the_physical_connection_and_the_wrapper_stays_open(
    make_wrapper: MakeWrapper, sessions: Callable[[], int]
) -> None:
    wrapper = make_wrapper(MAX_CONNS=1)
    first = request(wrapper)
    assert wrapper.connection is None, "nothing is held between requests"
    stats = herokupool.stats()[wrapper.alias]
    assert (stats["in_use"], stats["idle"]) == (0, 1)
    seen: list[int] = []

    def other_thread() -> None:
        seen.append(request(make_wrapper(MAX_CONNS=1)))

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert seen == [first], "another thread's request got the same server session"
    assert request(wrapper) == first
    assert sessions() == 1
    stats = herokupool.stats()[wrapper.alias]
    assert (stats["borrows"], stats["releases"], stats["in_use"]) == (3, 3, 0)


def test_connection_created_fires_on_every_request_as_with_django(
    make_wrapper: MakeWrapper, created: list[Any]
) -> None:
    wrapper = make_wrapper(MAX_CONNS=1)
    pids = {request(wrapper) for _ in range(5)}
    assert len(pids) == 1, "one server session served the five requests"
    assert created == [wrapper] * 5, "Django's connect() ran, and announced, every request"


def test_with_reset_or_connect_per_borrow_connection_created_fires_per_borrow(
    make_wrapper: MakeWrapper, created: list[Any]
) -> None:
    reset = make_wrapper(MAX_CONNS=1, RESET="DISCARD ALL")
    for _ in range(3):
        request(reset)
    assert len(created) == 3, "RESET may undo the set-up: it runs on every borrow"
    created.clear()
    per_borrow = make_wrapper(name=f"{reset.alias}b", MAX_CONNS=1, CONNECT_PER_BORROW="true")
    for _ in range(3):
        request(per_borrow)
    assert len(created) == 3


def test_a_borrow_sends_nothing_unless_the_session_needs_it(
    make_wrapper: MakeWrapper, admin: Any
) -> None:
    wrapper = make_wrapper(MAX_CONNS=1)
    pid = request(wrapper, "SELECT pg_backend_pid() /* first */")
    with wrapper.cursor() as cursor:  # the next request's first statement borrows
        assert last_query(admin, pid).endswith("/* first */"), "no set-up round trip"
        cursor.execute("SET TIME ZONE 'Asia/Tokyo'")  # the application changes it
    wrapper.close_if_unusable_or_obsolete()
    with wrapper.cursor() as cursor:
        # The release undid the change (RESET ALL); the borrow set Django's time zone again
        # unless the server's default already is it (an embedded server's is UTC).
        last = last_query(admin, pid).lower()
        assert "'timezone', 'utc'" in last or last == "reset all", last
        cursor.execute("SHOW TIME ZONE")
        assert cursor.fetchone()[0] == "UTC"
    wrapper.close_if_unusable_or_obsolete()


def test_assume_role_is_set_once_per_physical_connection(
    make_wrapper: MakeWrapper, admin: Any, alias: str
) -> None:
    role = f"hp_role_{alias}"
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE ROLE "{role}"')
    try:
        wrapper = make_wrapper(MAX_CONNS=1, assume_role=role)
        assert request(wrapper, "SELECT current_user") == role
        pid = request(wrapper, "SELECT pg_backend_pid() /* second */")
        with wrapper.cursor() as cursor:
            assert last_query(admin, pid).endswith("/* second */"), "no SET ROLE again"
            cursor.execute("SELECT current_user")
            assert cursor.fetchone()[0] == role
        wrapper.close()
        registry.close(wrapper.alias)
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP ROLE IF EXISTS "{role}"')


def test_the_isolation_level_and_jsonb_loader_hold_on_every_borrow(
    make_wrapper: MakeWrapper,
) -> None:
    wrapper = make_wrapper(MAX_CONNS=1, isolation_level=IsolationLevel.SERIALIZABLE)
    for _ in range(3):
        assert wrapper.get_autocommit() is True
        wrapper.set_autocommit(False)
        with wrapper.cursor() as cursor:
            cursor.execute("SHOW transaction_isolation")
            assert cursor.fetchone()[0] == "serializable"
            cursor.execute("SELECT '{\"a\": 1}'::jsonb")
            assert cursor.fetchone()[0] == '{"a": 1}'
        wrapper.rollback()
        wrapper.set_autocommit(True)
        wrapper.close_if_unusable_or_obsolete()
        assert wrapper.connection is None
    with wrapper.cursor() as cursor:
        cursor.execute("SHOW default_transaction_isolation")
        assert cursor.fetchone()[0] == "read committed", "the session default is untouched"
    wrapper.close()


def test_a_request_that_leaves_autocommit_off_closes_the_wrapper(
    make_wrapper: MakeWrapper, created: list[Any]
) -> None:
    wrapper = make_wrapper(MAX_CONNS=1)
    request(wrapper)
    wrapper.set_autocommit(False)
    with wrapper.cursor() as cursor:
        cursor.execute("CREATE TEMP TABLE t (x int)")
    wrapper.close_if_unusable_or_obsolete()  # as Django: don't take chances
    assert wrapper.connection is None
    assert wrapper.get_autocommit() is True
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_tables WHERE tablename = 't'")
        assert cursor.fetchone()[0] == 0, "the pool rolled the transaction back"
    wrapper.close()


def test_errors_in_a_request_do_not_cost_a_validation_query(make_wrapper: MakeWrapper) -> None:
    wrapper = make_wrapper(MAX_CONNS=1)
    first = request(wrapper)
    with pytest.raises(DatabaseError):
        request(wrapper, "SELECT no_such_column FROM pg_class")
    assert wrapper.connection is None
    assert request(wrapper) == first, "the pool kept the healthy connection"
    assert herokupool.stats()[wrapper.alias]["validations"] == 0


def test_a_connection_killed_during_a_request_is_discarded_and_the_next_is_fresh(
    make_wrapper: MakeWrapper, admin: Any
) -> None:
    wrapper = make_wrapper(MAX_CONNS=1)
    pid = request(wrapper)
    with pytest.raises(DatabaseError):
        request(wrapper, f"SELECT pg_terminate_backend({pid}), pg_sleep(1)")
    assert request(wrapper) != pid
    assert herokupool.stats()[wrapper.alias]["in_use"] == 0


def test_settings_changed_between_requests_apply_to_the_next_request(
    make_wrapper: MakeWrapper, app_name: str
) -> None:
    wrapper = make_wrapper(MAX_CONNS=1)
    assert request(wrapper, "SHOW application_name") == app_name
    wrapper.settings_dict["OPTIONS"]["application_name"] = f"{app_name}-2"
    assert request(wrapper, "SHOW application_name") == f"{app_name}-2", "as Django: read again"
    wrapper.close()


def test_a_closed_pool_between_requests_is_replaced(make_wrapper: MakeWrapper) -> None:
    wrapper = make_wrapper(MAX_CONNS=1)
    first = request(wrapper)
    wrapper.close_pool()  # what Django does for test databases and time zone changes
    assert request(wrapper) != first
    assert herokupool.stats()[wrapper.alias]["connections_created"] == 1


def test_close_inside_atomic_still_refuses_to_reconnect_until_the_block_ends(
    make_wrapper: MakeWrapper,
) -> None:
    wrapper = make_wrapper(MAX_CONNS=1)
    request(wrapper)
    connections[wrapper.alias] = wrapper  # so transaction.atomic(using=...) finds it
    try:
        with transaction.atomic(using=wrapper.alias):
            with wrapper.cursor() as cursor:
                cursor.execute("SELECT 1")
            wrapper.close()  # e.g. close_old_connections() from a signal, mid-block
            assert wrapper._herokupool_pool is None, "the physical connection went back"
            # As with Django's own backend: no silent reconnect inside the block.
            with pytest.raises(CLOSED_ERROR, match=CLOSED_MESSAGE):
                request(wrapper, "SELECT 1")
        assert request(wrapper, "SELECT 2") == 2
        with transaction.atomic(using=wrapper.alias):
            request(wrapper, "SELECT 3")  # request_finished inside a block: Django closes
            with pytest.raises(CLOSED_ERROR, match=CLOSED_MESSAGE):
                request(wrapper, "SELECT 4")
    finally:
        del connections[wrapper.alias]
        wrapper.close()
    assert herokupool.stats()[wrapper.alias]["in_use"] == 0


class Interrupted(Exception):
    """What a signal handler raises in the middle of close()."""


@pytest.mark.parametrize("where", ["before the pool has it", "after the pool has it"])
@pytest.mark.parametrize("in_atomic", [False, True])
def test_an_interrupted_release_leaves_the_wrapper_no_usable_reference(
    make_wrapper: MakeWrapper, monkeypatch: pytest.MonkeyPatch, where: str, in_atomic: bool
) -> None:
    """Issue 16, item 6: an exception landing inside Django's close() never leaves the
    wrapper holding a session the pool may lend to another thread: its next query fails
    as on a closed connection (in atomic()) or borrows afresh, and nothing stays borrowed."""
    wrapper = make_wrapper(MAX_CONNS=1)
    first = request(wrapper)
    pool = wrapper._herokupool_last[2]
    release = pool.release

    def interrupted_release(conn: Any, **kwargs: Any) -> None:
        if where == "after the pool has it":
            release(conn, **kwargs)
        raise Interrupted

    monkeypatch.setattr(pool, "release", interrupted_release)
    connections[wrapper.alias] = wrapper
    try:
        with contextlib.ExitStack() as stack:
            if in_atomic:
                stack.enter_context(pytest.raises(Interrupted))
                stack.enter_context(transaction.atomic(using=wrapper.alias))
            with wrapper.cursor() as cursor:
                cursor.execute("SELECT 1")
            stale = wrapper.connection
            if not in_atomic:
                with pytest.raises(Interrupted):
                    wrapper.close()
                assert wrapper.connection is None
            else:
                with pytest.raises(Interrupted):
                    wrapper.close()
                assert wrapper.connection is not stale
                with pytest.raises(CLOSED_ERROR, match=CLOSED_MESSAGE):
                    request(wrapper, "SELECT 1")
                raise Interrupted  # leave the block
    finally:
        del connections[wrapper.alias]
    monkeypatch.undo()
    if where == "before the pool has it":
        # The connection never reached the pool: nobody may use it, and the pool counts it
        # borrowed until it is given back.
        assert herokupool.stats()[wrapper.alias]["in_use"] == 1
        pool.release(stale)
    assert request(wrapper) == first, "the pool lends the session again, to anyone"
    stats = herokupool.stats()[wrapper.alias]
    assert stats["in_use"] == 0
    assert stats["borrows"] == stats["releases"]


def test_a_close_interrupted_before_it_gave_the_connection_back_strands_nothing(
    make_wrapper: MakeWrapper,
) -> None:
    """Issue 16, item 6: close() interrupted after the wrapper forgot its connection but
    before taking it out of its loan record (the state it leaves, made by hand here): the
    next request does not wait for a second connection (MAX_CONNS=1), and the orphan goes
    back to the pool."""
    wrapper = make_wrapper(MAX_CONNS=1, TIMEOUT=2)
    first = request(wrapper)
    wrapper.ensure_connection()
    wrapper.connection = None  # forgotten; still in the loan record
    assert herokupool.stats()[wrapper.alias]["in_use"] == 1
    assert request(wrapper) == first
    wrapper.ensure_connection()
    wrapper.connection = None  # the same state, then close(): Django's returns at once
    wrapper.close()
    assert wait_until(lambda: herokupool.stats()[wrapper.alias]["in_use"] == 0)
    stats = herokupool.stats()[wrapper.alias]
    assert (stats["in_use"], stats["timeouts"]) == (0, 0)
    assert stats["borrows"] == stats["releases"]


def test_a_thread_that_dies_between_or_during_requests_leaves_nothing_borrowed(
    make_wrapper: MakeWrapper, dsn: str, alias: str, app_name: str
) -> None:
    from herokupool.db.backends.postgresql.base import DatabaseWrapper
    from tests.integration.conftest import settings_for

    def between() -> None:
        request(make_wrapper(MAX_CONNS=1, TIMEOUT=2))

    def during() -> None:
        # Not through make_wrapper, which keeps its wrappers: this one must be
        # garbage-collected with its thread's state, holding a connection.
        wrapper = DatabaseWrapper(
            settings_for(dsn, MAX_CONNS=1, TIMEOUT=2, application_name=app_name), alias=alias
        )
        backend_pid(wrapper)  # a statement, and no request end

    for target in (between, during, between):
        thread = threading.Thread(target=target)
        thread.start()
        thread.join()
        gc.collect()
    stats = herokupool.stats()[alias]
    assert stats["in_use"] == 0
    assert stats["connections_created"] == 1


def test_a_bad_connect_per_borrow_is_a_configuration_error_naming_it(
    make_wrapper: MakeWrapper, sessions: Callable[[], int]
) -> None:
    from django.core.exceptions import ImproperlyConfigured

    wrapper = make_wrapper(MAX_CONNS=1, CONNECT_PER_BORROW="sometimes")
    with pytest.raises(ImproperlyConfigured) as info:
        wrapper.ensure_connection()
    assert str(info.value) == (
        f"DATABASES[{wrapper.alias!r}]['OPTIONS']['CONNECT_PER_BORROW'] ('sometimes') "
        "must be a boolean (true/false, 1/0, yes/no, on/off)."
    )
    assert sessions() == 0


def test_a_connection_kept_under_conn_max_age_gets_djangos_health_check_after_errors(
    make_wrapper: MakeWrapper, admin: Any
) -> None:
    wrapper = make_wrapper(MAX_CONNS=1)
    wrapper.settings_dict.update(CONN_MAX_AGE=None, CONN_HEALTH_CHECKS=True)
    pid = request(wrapper)
    assert wrapper.connection is not None, "CONN_MAX_AGE=None: kept, as Django keeps it"
    wrapper.errors_occurred = True
    wrapper.close_if_unusable_or_obsolete()  # request_started: Django checks it
    assert last_query(admin, pid) == "SELECT 1"
    assert wrapper.errors_occurred is False
    wrapper.close()
