"""The pool's promises under adversarial use, against a real PostgreSQL (issue 9).

Each test is one item of the issue, tried from the outside as a user would meet it: a raw
``BEGIN`` left open, an abandoned server-side cursor, a signal landing mid-borrow, a network path
or a backend gone silent, a thread that ends holding its connection, one killed backend.  What
is asserted is what the application and the server see: rows, ``pg_stat_activity``,
``pg_cursors``, backend pids, exception types, how long a call took against a bound derived
from the settings (never a performance target), and the pool's counters, which must stay exact
(``borrows == releases + in_use``).

Tests that freeze a process (SIGSTOP) do it only on a private server of their own
(``make_cluster``) and always thaw it in ``finally``.
"""

from __future__ import annotations

import contextlib
import gc
import os
import select
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import psycopg2
import pytest
from django.db import (
    OperationalError,
    ProgrammingError,
    connections,
    transaction,
)

import herokupool
from devtools.relay import TcpRelay
from herokupool.pool import ConnectionPool
from tests.drivers import INSTALLED, connector, dsn_parameters, pending_notifications
from tests.helpers import Interrupted, interrupting, wait_until
from tests.integration.conftest import (
    CLOSED_ERROR,
    CLOSED_MESSAGE,
    MakeCluster,
    MakeWrapper,
    backend_pid,
    pids_of,
    settings_for,
    through,
)

pytestmark = pytest.mark.integration

# A bounded call must end within the bound its settings imply plus this much (thread start-up,
# a loaded 2-core CI machine).  Not a performance target: the failures this guards against are
# calls blocked for ever.
SLACK = 2.0
# libpq's connect_timeout as the backend derives it from TIMEOUT=2: max(2, ceil(2)).
CONNECT_TIMEOUT = 2.0


def counters_exact(stats: dict[str, Any]) -> None:
    assert stats["borrows"] == stats["releases"] + stats["in_use"], stats
    assert stats["waiting"] == 0, stats


def run(wrapper: Any, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with wrapper.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


def state_of(admin: Any, pid: int) -> str | None:
    with admin.cursor() as cursor:
        cursor.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", [pid])
        row = cursor.fetchone()
    return None if row is None else str(row[0])


def in_thread(target: Callable[[], Any], *, join: float) -> tuple[float, Any, BaseException | None]:
    """Run ``target`` in a thread; (seconds it took, its result, its exception).

    The test never hangs: when the thread is still running after ``join`` seconds the
    duration reads as infinite (the caller's ``finally`` unblocks the thread).
    """
    outcome: dict[str, Any] = {}

    def body() -> None:
        started = time.monotonic()
        try:
            outcome["result"] = target()
        except BaseException as error:
            outcome["error"] = error
        outcome["took"] = time.monotonic() - started

    thread = threading.Thread(target=body, name="borrower")
    thread.start()
    thread.join(join)
    return outcome.get("took", float("inf")), outcome.get("result"), outcome.get("error")


@pytest.fixture
def table(dsn: str, app_name: str) -> Iterator[str]:
    """A table of this test's own in the test database: ``(id serial, who text)``."""
    name = f"hp_rows_{uuid.uuid4().hex[:10]}"
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute(f"CREATE TABLE {name} (id serial PRIMARY KEY, who text NOT NULL)")
    try:
        yield name
    finally:
        with conn.cursor() as cursor:
            # A pool that failed the test may still hold a transaction with locks on the table.
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s AND state <> 'idle'",
                [app_name],
            )
            cursor.execute("SET lock_timeout = '10s'")
            cursor.execute(f"DROP TABLE IF EXISTS {name}")
        conn.close()


def committed(dsn: str, table: str) -> list[str]:
    """The rows every other session sees: committed ones only."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cursor:
            cursor.execute(f"SELECT who FROM {table} ORDER BY id")
            return [row[0] for row in cursor.fetchall()]
    finally:
        conn.close()


@pytest.fixture
def django_alias(dsn: str, alias: str, app_name: str) -> Iterator[Callable[..., str]]:
    """``django_alias(**OPTIONS)``: register this test's alias in ``django.db.connections``, so
    ``connections[alias]`` (a wrapper per thread, as in an application) and
    ``transaction.atomic(using=alias)`` work."""

    def register(**options: Any) -> str:
        options.setdefault("application_name", app_name)
        connections.settings[alias] = settings_for(dsn, **options)
        return alias

    yield register
    with contextlib.suppress(Exception):
        connections[alias].close()
    with contextlib.suppress(Exception):
        delattr(connections._connections, alias)
    connections.settings.pop(alias, None)
    herokupool.registry.close(alias)


# ---------------------------------------------------- item 1: no transaction survives release


def _raw_begin(wrapper: Any, table: str) -> None:
    run(wrapper, "BEGIN")
    run(wrapper, f"INSERT INTO {table} (who) VALUES ('first')")


def _raw_begin_then_error(wrapper: Any, table: str) -> None:
    _raw_begin(wrapper, table)
    with pytest.raises(Exception, match="division by zero"):
        run(wrapper, "SELECT 1 / 0")


def _start_transaction_serializable(wrapper: Any, table: str) -> None:
    run(wrapper, "START TRANSACTION ISOLATION LEVEL SERIALIZABLE")
    run(wrapper, f"INSERT INTO {table} (who) VALUES ('first')")


def _set_autocommit_false(wrapper: Any, table: str) -> None:
    wrapper.set_autocommit(False)
    run(wrapper, f"INSERT INTO {table} (who) VALUES ('first')")


LEFT_OPEN = {
    "raw BEGIN": _raw_begin,
    "raw BEGIN, then an error": _raw_begin_then_error,
    "START TRANSACTION ISOLATION LEVEL SERIALIZABLE": _start_transaction_serializable,
    "set_autocommit(False)": _set_autocommit_false,
}


@pytest.mark.parametrize("how", list(LEFT_OPEN))
def test_no_transaction_survives_release(
    make_wrapper: MakeWrapper, admin: Any, dsn: str, table: str, how: str
) -> None:
    first = make_wrapper(MAX_CONNS=1, TIMEOUT=2)
    pid = backend_pid(first)
    LEFT_OPEN[how](first, table)
    first.close()

    second = make_wrapper(MAX_CONNS=1, TIMEOUT=2)
    assert backend_pid(second) == pid, "MAX_CONNS=1: the same session, reused"
    assert state_of(admin, pid) == "idle"
    # Not inside the first borrower's transaction: its row is gone, not merely invisible.
    assert run(second, f"SELECT count(*) FROM {table}") == [(0,)]
    run(second, f"INSERT INTO {table} (who) VALUES ('second')")
    assert committed(dsn, table) == ["second"], "the second borrower's write is committed"
    second.close()
    assert state_of(admin, pid) == "idle"
    assert committed(dsn, table) == ["second"]
    counters_exact(herokupool.stats()[second.alias])


def test_close_inside_atomic_leaves_nothing_open_for_the_next_borrower(
    django_alias: Callable[..., str], admin: Any, dsn: str, table: str
) -> None:
    alias = django_alias(MAX_CONNS=1, TIMEOUT=2)
    wrapper = connections[alias]
    with transaction.atomic(using=alias):
        run(wrapper, f"INSERT INTO {table} (who) VALUES ('first')")
        pid = backend_pid(wrapper)
        wrapper.close()
    assert state_of(admin, pid) == "idle"
    assert run(wrapper, "SELECT pg_backend_pid()") == [(pid,)]
    assert run(wrapper, f"SELECT count(*) FROM {table}") == [(0,)]
    with transaction.atomic(using=alias):
        run(wrapper, f"INSERT INTO {table} (who) VALUES ('second')")
    wrapper.close()
    assert committed(dsn, table) == ["second"]
    assert state_of(admin, pid) == "idle"
    counters_exact(herokupool.stats()[alias])


@pytest.mark.parametrize(
    "engine", ["django.db.backends.postgresql", "herokupool.db.backends.postgresql"]
)
def test_a_query_after_close_inside_atomic_raises_what_the_stock_backend_raises(
    dsn: str, alias: str, app_name: str, engine: str
) -> None:
    """Code written against Django's own backend catches what it raises here: InterfaceError
    on psycopg2, OperationalError on psycopg 3."""
    connections.settings[alias] = settings_for(
        dsn, engine=engine, application_name=app_name, MAX_CONNS=1
    )
    if engine.startswith("django."):
        del connections.settings[alias]["OPTIONS"]["MAX_CONNS"]
    wrapper = connections[alias]
    try:
        with transaction.atomic(using=alias):
            run(wrapper, "SELECT 1")
            wrapper.close()
            with pytest.raises(CLOSED_ERROR, match=CLOSED_MESSAGE):
                run(wrapper, "SELECT 1")
        assert run(wrapper, "SELECT 1") == [(1,)]  # outside the block: a new connection
    except ProgrammingError as error:
        pytest.fail(f"{type(error).__name__}: {error}")
    finally:
        wrapper.close()
        delattr(connections._connections, alias)
        del connections.settings[alias]
        herokupool.registry.close(alias)


# ------------------------------------------------------- item 2: server-side cursors


def test_an_abandoned_server_side_cursor_is_closed_on_release(
    make_wrapper: MakeWrapper,
) -> None:
    kept = []
    for _ in range(3):
        # Django names cursors by thread ident and a per-wrapper counter: each new wrapper in
        # this thread declares "_django_curs_<ident>_sync_1" again.
        wrapper = make_wrapper(MAX_CONNS=1, TIMEOUT=2)
        assert run(wrapper, "SELECT count(*) FROM pg_cursors") == [(0,)]
        cursor = wrapper.chunked_cursor()
        cursor.execute("SELECT generate_series(1, 10000)")
        assert len(cursor.fetchmany(100)) == 100
        kept.append(cursor)  # abandoned mid-iteration, still referenced: never closed by GC
        wrapper.close()
    wrapper = make_wrapper(MAX_CONNS=1, TIMEOUT=2)
    assert run(wrapper, "SELECT count(*) FROM pg_cursors") == [(0,)]
    wrapper.close()
    stats = herokupool.stats()[wrapper.alias]
    assert stats["connections_created"] == 1, "cleaned, not discarded"
    counters_exact(stats)


def test_a_queryset_iterator_abandoned_mid_iteration_leaves_no_cursor(
    django_alias: Callable[..., str],
) -> None:
    from tests.testapp.models import Item

    alias = django_alias(MAX_CONNS=1, TIMEOUT=2)
    wrapper = connections[alias]
    with wrapper.schema_editor() as editor:
        editor.create_model(Item)
    try:
        Item.objects.using(alias).bulk_create(Item(name=f"item {n}") for n in range(50))
        wrapper.close()
        for _ in range(3):
            it = Item.objects.using(alias).iterator(chunk_size=10)  # a named WITH HOLD cursor
            next(it)
            wrapper.close()  # request_finished, while `it` is still alive
            assert run(wrapper, "SELECT count(*) FROM pg_cursors") == [(0,)]
            del it
            wrapper.close()
    finally:
        with wrapper.schema_editor() as editor:
            editor.delete_model(Item)
        wrapper.close()
    counters_exact(herokupool.stats()[alias])


def test_a_stale_cursor_closed_after_release_does_not_touch_the_next_borrowers_session(
    make_wrapper: MakeWrapper, dsn: str, table: str
) -> None:
    """A generator finalised after release closes its cursor: that must not send CLOSE into
    the session now lent to someone else (it would fail there and abort their transaction)."""
    first = make_wrapper(MAX_CONNS=1, TIMEOUT=2)
    stale = first.chunked_cursor()
    stale.execute("SELECT generate_series(1, 1000)")
    stale.fetchmany(10)
    first.close()

    second = make_wrapper(MAX_CONNS=1, TIMEOUT=2)
    second.set_autocommit(False)
    run(second, f"INSERT INTO {table} (who) VALUES ('second')")
    with contextlib.suppress(Exception):
        stale.close()  # what cursor_iter's finally does when the generator is collected
    run(second, f"INSERT INTO {table} (who) VALUES ('second again')")
    second.commit()
    second.set_autocommit(True)
    second.close()
    assert committed(dsn, table) == ["second", "second again"]


# --------------------------------------------------------- item 3: interruptions


def test_a_signal_while_queued_for_a_connection_loses_no_slot(make_wrapper: MakeWrapper) -> None:
    options = {"MAX_CONNS": 1, "TIMEOUT": 3}
    holder = make_wrapper(**options)
    pid = backend_pid(holder)
    queued = make_wrapper(**options)
    started = time.monotonic()
    with pytest.raises(Interrupted), interrupting(0.3):
        queued.ensure_connection()
    assert time.monotonic() - started < 3, "the signal ended the wait, not TIMEOUT"
    holder.close()  # must go to the pool, not to the borrower that gave up

    stats = herokupool.stats()[holder.alias]
    assert stats["in_use"] == 0, stats
    assert stats["idle"] == 1, stats
    counters_exact(stats)
    assert backend_pid(queued) == pid, "the pool still serves, with the same connection"
    queued.close()
    counters_exact(herokupool.stats()[holder.alias])


@pytest.mark.slow
def test_a_signal_while_validating_on_a_frozen_backend_loses_no_slot(
    make_cluster: MakeCluster, make_wrapper: MakeWrapper
) -> None:
    cluster = make_cluster()
    url = cluster.dsn("postgres")
    options = {"MAX_CONNS": 1, "TIMEOUT": 2, "TEST_ON_BORROW": True}
    first = make_wrapper(url=url, **options)
    frozen = backend_pid(first)
    first.close()
    os.kill(frozen, signal.SIGSTOP)
    # Without a deadline the validation would block until the backend thaws: thaw it after
    # a while so that such a pool fails this test instead of hanging it.
    thaw = threading.Timer(8, os.kill, (frozen, signal.SIGCONT))
    thaw.start()
    borrower = make_wrapper(url=url, **options)
    started = time.monotonic()
    try:
        with pytest.raises(Interrupted), interrupting(0.5):
            borrower.ensure_connection()
        took = time.monotonic() - started
    finally:
        thaw.cancel()
        os.kill(frozen, signal.SIGCONT)
    assert took < 2 + CONNECT_TIMEOUT + SLACK, f"blocked {took:.1f} s in validation"
    stats = herokupool.stats()[borrower.alias]
    assert stats["in_use"] == 0, stats
    counters_exact(stats)
    assert backend_pid(borrower) != frozen, "the connection in unknown state was discarded"
    borrower.close()
    counters_exact(herokupool.stats()[borrower.alias])


# ----------------------------------------------------------- item 5: time is bounded


@pytest.mark.slow
def test_a_borrow_over_a_silent_network_path_ends_within_timeout(
    make_wrapper: MakeWrapper, relay: TcpRelay, dsn: str
) -> None:
    url = through(relay, dsn)
    options = {"MAX_CONNS": 2, "TIMEOUT": 2, "VALIDATE_AFTER": 0.1}
    first = make_wrapper(url=url, **options)
    backend_pid(first)
    first.close()
    time.sleep(0.2)  # idle past VALIDATE_AFTER: the next borrow validates it
    relay.pause()
    borrower = make_wrapper(url=url, **options)
    borrower.inc_thread_sharing()  # used from the borrowing thread below
    try:
        took, _, error = in_thread(lambda: backend_pid(borrower), join=15)
    finally:
        relay.resume()
    assert took < 2 + CONNECT_TIMEOUT + SLACK, f"borrow blocked {took:.1f} s (TIMEOUT=2)"
    assert isinstance(error, OperationalError), repr(error)
    stats = herokupool.stats()[borrower.alias]
    assert stats["in_use"] == 0, stats
    counters_exact(stats)

    # The path is back: service returns by itself, in the same pool.
    again = make_wrapper(url=url, **options)
    assert backend_pid(again) > 0
    again.close()
    counters_exact(herokupool.stats()[borrower.alias])


@pytest.mark.slow
def test_releasing_a_transaction_over_a_silent_network_path_is_bounded(
    make_wrapper: MakeWrapper, relay: TcpRelay, dsn: str, table: str
) -> None:
    url = through(relay, dsn)
    options = {"MAX_CONNS": 1, "TIMEOUT": 2}
    wrapper = make_wrapper(url=url, **options)
    wrapper.set_autocommit(False)
    run(wrapper, f"INSERT INTO {table} (who) VALUES ('never committed')")
    relay.pause()
    wrapper.inc_thread_sharing()  # closed from the thread below
    try:
        took, _, error = in_thread(wrapper.close, join=15)  # needs a ROLLBACK: blocked
    finally:
        relay.resume()
    assert took < 2 + SLACK, f"release blocked {took:.1f} s"
    assert error is None or isinstance(error, OperationalError), repr(error)
    stats = herokupool.stats()[wrapper.alias]
    assert stats["in_use"] == 0, stats
    counters_exact(stats)
    again = make_wrapper(url=url, **options)
    assert run(again, f"SELECT count(*) FROM {table}") == [(0,)]
    again.close()
    assert committed(dsn, table) == []


@pytest.mark.slow
def test_a_borrow_of_a_frozen_backends_connection_ends_within_timeout(
    make_cluster: MakeCluster, make_wrapper: MakeWrapper
) -> None:
    cluster = make_cluster()
    url = cluster.dsn("postgres")
    options = {"MAX_CONNS": 2, "TIMEOUT": 2, "VALIDATE_AFTER": 0.1}
    first = make_wrapper(url=url, **options)
    frozen = backend_pid(first)
    first.close()
    time.sleep(0.2)
    os.kill(frozen, signal.SIGSTOP)
    borrower = make_wrapper(url=url, **options)
    borrower.inc_thread_sharing()  # used from the borrowing thread below
    try:
        took, pid, error = in_thread(lambda: backend_pid(borrower), join=15)
    finally:
        os.kill(frozen, signal.SIGCONT)
    assert took < 2 + CONNECT_TIMEOUT + SLACK, f"borrow blocked {took:.1f} s (TIMEOUT=2)"
    # The postmaster answers: either a new connection served it, or the deadline ran out.
    assert error is None or isinstance(error, OperationalError), repr(error)
    assert pid != frozen
    borrower.close()
    stats = herokupool.stats()[borrower.alias]
    counters_exact(stats)
    again = make_wrapper(url=url, **options)
    assert backend_pid(again) != frozen
    again.close()


KEEPALIVE_DEFAULTS = {
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
    "tcp_user_timeout": "60000",
}


def test_tcp_keepalives_are_on_by_default_and_user_values_win(
    make_wrapper: MakeWrapper, dsn: str
) -> None:
    wrapper = make_wrapper(MAX_CONNS=1)
    wrapper.ensure_connection()
    params = dsn_parameters(wrapper.connection)
    assert {key: params.get(key) for key in KEEPALIVE_DEFAULTS} == KEEPALIVE_DEFAULTS
    wrapper.close()

    mine = make_wrapper(name=f"{wrapper.alias}b", MAX_CONNS=1, keepalives_idle=5)
    mine.ensure_connection()
    params = dsn_parameters(mine.connection)
    assert params["keepalives_idle"] == "5"
    assert params["keepalives_count"] == "3"
    mine.close()

    from_url = make_wrapper(
        url=f"{dsn}?keepalives=0&tcp_user_timeout=1234", name=f"{wrapper.alias}c", MAX_CONNS=1
    )
    from_url.ensure_connection()
    params = dsn_parameters(from_url.connection)
    assert params["keepalives"] == "0"
    assert params["tcp_user_timeout"] == "1234"
    from_url.close()


# ---------------------------------------------------------------- item 6: MIN_CONNS


def test_min_conns_are_opened_at_creation_and_refilled_when_lost(
    make_wrapper: MakeWrapper, admin: Any, app_name: str, sessions: Callable[[], int]
) -> None:
    wrapper = make_wrapper(MIN_CONNS=3, MAX_CONNS=4)
    borrowed = backend_pid(wrapper)  # creates the pool
    # Generous bounds: wait_until returns as soon as it holds, and a loaded CI machine
    # (two suites on two cores) has taken more than a second to refill.
    assert wait_until(lambda: sessions() == 3, 10), f"{sessions()} sessions, not MIN_CONNS=3"
    wrapper.close()
    victim = next(pid for pid in pids_of(admin, app_name) if pid != borrowed)
    with admin.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", [victim])
    # One snapshot: counted and searched at two moments, the victim could be counted
    # among the three and then be gone.
    assert wait_until(lambda: _three_without(pids_of(admin, app_name), victim), 10), (
        f"{sessions()} sessions after one was terminated"
    )
    # The server lists a session before the pool has counted it.
    assert wait_until(lambda: herokupool.stats()[wrapper.alias]["connections_created"] == 4, 10), (
        herokupool.stats()[wrapper.alias],
        pids_of(admin, app_name),
        victim,
        borrowed,
    )
    stats = herokupool.stats()[wrapper.alias]
    assert stats["connections_lost"] == 1, stats
    counters_exact(stats)


def _three_without(pids: set[int], victim: int) -> bool:
    return len(pids) == 3 and victim not in pids


# ------------------------------------------------------------ item 7: dying threads


def test_a_thread_that_ends_holding_a_connection_gives_it_back_without_gc(
    django_alias: Callable[..., str],
) -> None:
    alias = django_alias(MAX_CONNS=1, TIMEOUT=1)
    pids: list[int] = []

    errors: list[BaseException] = []

    def careless() -> None:
        try:
            pids.append(backend_pid(connections[alias]))  # and never closes it
        except OperationalError as error:
            errors.append(error)

    gc.disable()  # Django's wrappers sit in reference cycles: no collection may help
    try:
        for _ in range(3):  # each thread needs the connection the previous one left
            thread = threading.Thread(target=careless)
            thread.start()
            thread.join()
        assert errors == [], "a thread timed out waiting for the connection"
        assert len(pids) == 3
        assert wait_until(lambda: herokupool.stats()[alias]["in_use"] == 0, 10)
    finally:
        gc.enable()
    assert len(set(pids)) == 1
    stats = herokupool.stats()[alias]
    assert stats["connections_created"] == 1
    counters_exact(stats)


def test_a_thread_that_ends_mid_iteration_leaves_no_cursor_for_the_next_thread(
    django_alias: Callable[..., str],
) -> None:
    alias = django_alias(MAX_CONNS=1, TIMEOUT=1)
    kept: list[Any] = []

    def careless() -> None:
        cursor = connections[alias].chunked_cursor()
        cursor.execute("SELECT generate_series(1, 10000)")
        cursor.fetchmany(10)
        kept.append(cursor)  # abandoned mid-iteration, never closed; the thread ends

    def count_cursors() -> None:
        kept.append(run(connections[alias], "SELECT count(*) FROM pg_cursors"))
        connections[alias].close()

    for target in (careless, count_cursors):
        thread = threading.Thread(target=target)
        thread.start()
        thread.join()
    assert kept[-1] == [(0,)], "the reclaimed connection still had the thread's cursor"
    counters_exact(herokupool.stats()[alias])


def test_a_wrapper_collected_inside_its_pools_lock_does_not_deadlock(
    dsn: str, alias: str, app_name: str
) -> None:
    """Item 4: a finalizer runs in whichever thread triggered the collection, here one that
    holds the pool's lock; the wrapper's finalizer must not take it."""
    from herokupool.db.backends.postgresql.base import DatabaseWrapper

    options = {"application_name": app_name, "MAX_CONNS": 1, "TIMEOUT": 1}
    gc.disable()
    try:
        wrapper = DatabaseWrapper(settings_for(dsn, **options), alias=alias)
        wrapper.ensure_connection()
        pool = wrapper._herokupool_pool
        assert pool is not None
        del wrapper  # in reference cycles: only the cyclic collector frees it

        def collect_inside_the_lock() -> None:
            with pool._lock:
                gc.collect()

        thread = threading.Thread(target=collect_inside_the_lock, daemon=True)
        thread.start()
        thread.join(5)
        assert not thread.is_alive(), "deadlocked: the finalizer took the pool's lock"
    finally:
        gc.enable()
    assert wait_until(lambda: pool.stats()["in_use"] == 0, 10), pool.stats()
    again = DatabaseWrapper(settings_for(dsn, **options), alias=alias)
    again.ensure_connection()  # MAX_CONNS=1: only possible with the connection back
    again.close()
    counters_exact(pool.stats())
    herokupool.registry.close(alias)


def test_a_live_idle_thread_keeps_its_connection(
    django_alias: Callable[..., str],
) -> None:
    alias = django_alias(MAX_CONNS=1, TIMEOUT=0.5)
    holding = threading.Event()
    done = threading.Event()
    pids: list[int] = []

    def holder() -> None:
        pids.append(backend_pid(connections[alias]))
        holding.set()
        done.wait(10)  # alive and idle, however long
        pids.append(backend_pid(connections[alias]))
        connections[alias].close()

    thread = threading.Thread(target=holder, name="idle-holder")
    thread.start()
    try:
        assert holding.wait(5)
        gc.collect()
        time.sleep(0.3)
        with pytest.raises(OperationalError, match="timed out"):
            connections[alias].ensure_connection()
    finally:
        done.set()
        thread.join(5)
    assert pids[0] == pids[1], "the live thread kept its own session"
    counters_exact(herokupool.stats()[alias])


def test_a_wrapper_shared_between_threads_is_not_reclaimed_when_a_user_thread_ends(
    make_wrapper: MakeWrapper,
) -> None:
    shared = make_wrapper(MAX_CONNS=1, TIMEOUT=0.5)
    shared.inc_thread_sharing()  # as LiveServerTestCase does
    try:
        pids: list[int] = []
        thread = threading.Thread(target=lambda: pids.append(backend_pid(shared)))
        thread.start()
        thread.join()
        time.sleep(0.3)
        assert herokupool.stats()[shared.alias]["in_use"] == 1, "still the wrapper's"
        assert backend_pid(shared) == pids[0]
        shared.close()
    finally:
        shared.dec_thread_sharing()
    counters_exact(herokupool.stats()[shared.alias])


# ----------------------------------------------------- item 8: one kill, one reconnect


def test_one_killed_idle_connection_costs_exactly_one_reconnect(
    make_wrapper: MakeWrapper, admin: Any, app_name: str
) -> None:
    options = {"MAX_CONNS": 3, "TIMEOUT": 2}
    wrappers = [make_wrapper(**options) for _ in range(3)]
    old = [backend_pid(wrapper) for wrapper in wrappers]
    for wrapper in wrappers:
        wrapper.close()
    victim = old[-1]  # the last released: the top of the idle stack, borrowed first
    with admin.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", [victim])
    assert wait_until(lambda: victim not in pids_of(admin, app_name), 10)

    again = [make_wrapper(**options) for _ in range(3)]
    now = {backend_pid(wrapper) for wrapper in again}  # all three held at once
    for wrapper in again:
        wrapper.close()
    assert now - set(old) != set(), "the dead one was replaced"
    assert now & set(old) == set(old) - {victim}, "the other two sessions are unchanged"
    stats = herokupool.stats()[again[0].alias]
    assert stats["connections_created"] == 4
    counters_exact(stats)


# --------------------------------------- item 11: executor threads, item 12: connection()


def test_the_timeout_message_names_the_executor_thread_holding_a_connection(
    django_alias: Callable[..., str],
) -> None:
    alias = django_alias(MAX_CONNS=1, TIMEOUT=0.3)
    with ThreadPoolExecutor(max_workers=1) as executor:
        # What sync_to_async(thread_sensitive=False) does: ORM code in an executor thread
        # that lives on and never reaches request_finished.
        executor.submit(lambda: backend_pid(connections[alias])).result()
        with pytest.raises(OperationalError) as raised:
            connections[alias].ensure_connection()
        message = str(raised.value)
        assert "timed out after" in message
        assert "held longest" in message
        assert "ThreadPoolExecutor" in message
        assert "close_old_connections" in message
        executor.submit(lambda: connections[alias].close()).result()
    counters_exact(herokupool.stats()[alias])


@pytest.mark.parametrize("driver_name", INSTALLED)
def test_pool_connection_context_manager_against_a_real_server(
    driver_name: str, dsn: str, table: str
) -> None:
    pool = ConnectionPool(connector(driver_name, dsn), name="ctx", max_conns=1, timeout=2)
    try:
        with pool.connection() as conn, conn.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            pid = cursor.fetchone()[0]
            assert type(conn).__module__.partition(".")[0] == driver_name
            assert pool.stats()["in_use"] == 1
        assert pool.stats()["in_use"] == 0

        def fail_in_a_transaction() -> None:
            with pool.connection() as conn, conn.cursor() as cursor:
                cursor.execute("BEGIN")
                cursor.execute(f"INSERT INTO {table} (who) VALUES ('rolled back')")
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            fail_in_a_transaction()
        assert pool.stats()["in_use"] == 0

        with pool.connection(timeout=1) as conn, conn.cursor() as cursor:
            cursor.execute(f"SELECT pg_backend_pid(), (SELECT count(*) FROM {table})")
            assert cursor.fetchone() == (pid, 0)
        assert committed(dsn, table) == []
        counters_exact(pool.stats())
    finally:
        pool.close()


# ------------------------------------------------------------ issue 16: after close_pools()


def test_a_thread_ending_with_a_connection_after_close_pools_closes_it_at_once(
    django_alias: Callable[..., str], admin: Any, app_name: str
) -> None:
    alias = django_alias(MAX_CONNS=1, TIMEOUT=1)
    holding = threading.Event()
    finish = threading.Event()
    pids: list[int] = []

    def worker() -> None:
        pids.append(backend_pid(connections[alias]))  # and never closes it
        holding.set()
        finish.wait(5)

    gc.disable()  # the session must end without any garbage collection
    try:
        thread = threading.Thread(target=worker)
        thread.start()
        assert holding.wait(5)
        herokupool.close_pools()  # gunicorn's worker_exit, a test database being dropped
        finish.set()
        thread.join(5)
        assert wait_until(lambda: pids[0] not in pids_of(admin, app_name), 10), (
            "the session outlived its thread: nobody closed it"
        )
    finally:
        gc.enable()


# ------------------------------------------------- issue 16: a readable socket is not dead


@pytest.mark.parametrize("driver_name", INSTALLED)
def test_an_idle_connection_with_pending_notifications_is_neither_swept_nor_grows(
    driver_name: str, dsn: str, admin: Any, app_name: str
) -> None:
    connect = connector(driver_name, dsn, application_name=app_name)
    channel = f"hp_{uuid.uuid4().hex[:8]}"
    notifier = psycopg2.connect(dsn)  # NOTIFY reaches listeners of the same database
    notifier.autocommit = True
    pool = ConnectionPool(connect, name="notify", max_conns=2, timeout=2, background=False)
    try:
        listener, other = pool.borrow(), pool.borrow()
        with listener.cursor() as cursor:
            cursor.execute(f"LISTEN {channel}")
            cursor.execute("SELECT pg_backend_pid()")
            pid = cursor.fetchone()[0]
        pool.release(other)
        pool.release(listener)  # on top of the idle stack, still listening
        with notifier.cursor() as cursor:
            for n in range(200):
                cursor.execute(f"NOTIFY {channel}, '{n}'")
        # The listener's socket is readable now.  Maintenance sweeps idle sockets.
        assert wait_until(lambda: bool(select.select([listener], [], [], 0)[0]), 10)
        pool.run_maintenance()
        stats = pool.stats()
        assert (stats["connections_lost"], stats["idle"]) == (0, 2), stats
        assert pid in pids_of(admin, app_name), "a live session was closed as dead"
        with notifier.cursor() as cursor:
            cursor.execute(f"NOTIFY {channel}, 'more'")
        assert wait_until(lambda: bool(select.select([listener], [], [], 0)[0]), 10)
        both = [pool.borrow(), pool.borrow()]
        assert any(conn is listener for conn in both)
        with listener.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            assert cursor.fetchone()[0] == pid
        # What arrived while idle is not handed to the borrower (a notification sent while
        # the borrow checked the connection may still be read along with its query).
        assert len(pending_notifications(listener)) <= 1, pending_notifications(listener)
        for conn in both:
            pool.release(conn)
        assert pool.stats()["connections_lost"] == 0
    finally:
        pool.close()
        notifier.close()


# ------------------------------------------- issue 16: deadlines act only on what they armed


@pytest.mark.slow
def test_a_deadline_racing_a_dropped_connection_never_cuts_an_unrelated_socket(
    dsn: str,
) -> None:
    """The relay closes the validation's connection within about 1 ms of its deadline while
    another thread opens and holds sockets: none of those may ever be shut down, and a
    validation that the server leaves unanswered is still cut."""
    parts = urlsplit(dsn)
    stop = threading.Event()
    victims: list[str] = []

    def bystander() -> None:
        # Sockets that may get the descriptor number libpq just closed; each must stay usable.
        while not stop.is_set():
            a, b = socket.socketpair()
            try:
                time.sleep(0.0005)
                a.sendall(b"x")
                if b.recv(1) != b"x":
                    victims.append("no data")
            except OSError as error:
                victims.append(repr(error))
            finally:
                a.close()
                b.close()

    threads = [threading.Thread(target=bystander) for _ in range(2)]
    for thread in threads:
        thread.start()
    cuts = 0
    try:
        for trial in range(40):
            with TcpRelay(parts.hostname or "127.0.0.1", parts.port or 5432) as relay:
                url = through(relay, dsn)

                def connect(url: str = url) -> Any:
                    conn = psycopg2.connect(url)
                    conn.autocommit = True
                    return conn

                pool = ConnectionPool(
                    connect,
                    name="race",
                    max_conns=1,
                    timeout=0.1,
                    test_on_borrow=True,
                    background=False,
                )
                try:
                    pool.release(pool.borrow())
                    relay.pause()  # the validation gets no answer: its deadline (0.1 s) fires
                    offset = (trial % 5 - 2) * 0.0005  # -1 ms .. +1 ms around the deadline
                    closer = threading.Timer(0.1 + offset, relay.close)
                    closer.start()
                    with contextlib.suppress(psycopg2.Error):
                        pool.release(pool.borrow(timeout=0.1))
                    closer.join()
                    cuts += pool.stats()["connections_lost"] > 0
                finally:
                    pool.close()
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert victims == [], victims[:5]
    assert cuts == 40, "every unanswered validation ends, by the deadline or the close"
