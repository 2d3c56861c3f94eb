"""The pool's promises at the edges, on fake connections: interruptions at every step,
silent servers, finalizers, a dead connection handed to a waiter, leftover transactions.

After every scenario the counters must add up: ``borrows == releases + in_use``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import random
import threading
import time
from typing import Any

import psycopg2
import pytest
from psycopg2 import extensions as ext

from herokupool._waiting import Waiter
from herokupool.errors import PoolClosed, PoolTimeout
from herokupool.pool import ConnectionPool
from tests.helpers import Interrupted, assert_counted_once, interrupting, wait_until
from tests.unit.fakes import FakeClock, FakeConnection, FakeDriver, move_session
from tests.unit.test_pool import make_pool

# Every test here runs once per driver installed (see tests/unit/conftest.py).
pytestmark = pytest.mark.usefixtures("flavour")


def assert_exact(pool: ConnectionPool) -> dict[str, int | float]:
    stats = pool.stats()
    assert stats["borrows"] == stats["releases"] + stats["in_use"], stats
    assert stats["in_use"] + stats["idle"] + stats["connecting"] <= stats["max"], stats
    assert_counted_once(stats)
    return stats


def interrupt_next_poll(entry: Any, error: type[BaseException]) -> None:
    """The next poll of ``entry``'s socket raises ``error`` (a signal handler's exception
    landing in it); the ones after poll again."""
    poll = entry.poll

    def interrupting() -> Any:
        entry.poll = poll  # once
        raise error

    entry.poll = interrupting


# ------------------------------------------------------- interruptions lose nothing


def test_a_borrower_interrupted_while_queued_leaves_the_line() -> None:
    pool = make_pool(max_conns=1, timeout=5)
    held_by_other_thread: list[Any] = []
    thread = threading.Thread(target=lambda: held_by_other_thread.append(pool.borrow()))
    thread.start()
    thread.join()
    with pytest.raises(Interrupted), interrupting(0.05):
        pool.borrow()
    assert pool.stats()["waiting"] == 0
    pool.release(held_by_other_thread[0])
    stats = assert_exact(pool)
    assert (stats["in_use"], stats["idle"]) == (0, 1), "the release must not go to the leaver"
    assert pool.borrow(timeout=0.1) is held_by_other_thread[0]


def interrupt_after_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every queued borrower get an interruption right after it was woken: the
    serve wins the race, then the interruption lands before the waiter looks."""
    original_wait = Waiter.wait

    def wait_then_interrupt(self: Waiter, timeout: float) -> None:
        original_wait(self, timeout)
        raise Interrupted

    monkeypatch.setattr(Waiter, "wait", wait_then_interrupt)


def borrow_in_thread(pool: ConnectionPool) -> tuple[threading.Thread, list[BaseException]]:
    """Start a thread that borrows and records what it raised; wait until it queues."""
    errors: list[BaseException] = []

    def borrower() -> None:
        try:
            pool.borrow()
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=borrower)
    thread.start()
    assert wait_until(lambda: pool.stats()["waiting"] == 1)
    return thread, errors


def test_an_interruption_just_after_being_served_hands_the_connection_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = make_pool(max_conns=1, timeout=5)
    held = pool.borrow()
    interrupt_after_waiting(monkeypatch)
    thread, errors = borrow_in_thread(pool)
    pool.release(held)
    thread.join()
    assert isinstance(errors[0], Interrupted)
    stats = assert_exact(pool)
    assert (stats["in_use"], stats["idle"]) == (0, 1)


def test_an_interruption_after_being_given_a_slot_frees_the_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    driver = FakeDriver()
    pool = make_pool(driver, max_conns=1, timeout=5)
    held = pool.borrow()
    interrupt_after_waiting(monkeypatch)
    thread, errors = borrow_in_thread(pool)
    pool.discard(held)  # frees the slot: the waiter is told to open a connection in it
    thread.join()
    monkeypatch.undo()
    assert isinstance(errors[0], Interrupted)
    stats = assert_exact(pool)
    assert (stats["connecting"], stats["in_use"]) == (0, 0)
    assert pool.borrow(timeout=0.1) is not None


def test_an_interruption_during_validation_discards_the_connection() -> None:
    driver = FakeDriver()
    pool = make_pool(driver, test_on_borrow=True)
    conn = pool.borrow()
    pool.release(conn)
    conn.interrupt = Interrupted()
    with pytest.raises(Interrupted):
        pool.borrow()
    assert conn.closed, "its state is unknown: discarded"
    stats = assert_exact(pool)
    assert (stats["in_use"], stats["idle"], stats["connections_discarded"]) == (0, 0, 1)
    assert pool.borrow() is not conn


def test_an_interruption_during_the_rollback_on_release_discards_the_connection() -> None:
    pool = make_pool(max_conns=1)
    conn = pool.borrow()
    conn.begin()
    conn.interrupt = Interrupted()
    with pytest.raises(Interrupted):
        pool.release(conn)
    assert conn.closed
    stats = assert_exact(pool)
    assert (stats["in_use"], stats["idle"]) == (0, 0)
    assert pool.borrow(timeout=0.1) is not conn, "the slot is free again"


def test_an_interruption_during_the_reset_on_release_discards_the_connection() -> None:
    pool = make_pool(max_conns=1, reset="DISCARD ALL")
    conn = pool.borrow()
    conn.interrupt = Interrupted()
    with pytest.raises(Interrupted):
        pool.release(conn)
    assert conn.closed
    assert_exact(pool)
    assert pool.borrow(timeout=0.1) is not conn


def test_an_interruption_in_the_release_fast_path_discards_the_connection() -> None:
    """``unchanged()`` answers the release's first question: an exception landing in it (a
    signal handler's) leaves the session's state unknown, as one in the rollback does."""
    asked: list[object] = []

    def interrupted(conn: object) -> bool:
        asked.append(conn)
        raise Interrupted()

    pool = make_pool(max_conns=1, unchanged=interrupted)
    conn = pool.borrow()
    with pytest.raises(Interrupted):
        pool.release(conn)
    assert asked == [conn]
    assert conn.closed
    stats = assert_exact(pool)
    assert (stats["in_use"], stats["idle"], stats["connections_discarded"]) == (0, 0, 1)
    assert pool.borrow(timeout=0.1) is not conn, "the slot is free again"


def test_an_interruption_while_connecting_frees_the_slot() -> None:
    driver = FakeDriver()
    pool = make_pool(driver, max_conns=1)
    driver.fail_with = Interrupted()
    with pytest.raises(Interrupted):
        pool.borrow()
    driver.fail_with = None
    assert pool.stats()["connecting"] == 0
    assert pool.borrow(timeout=0.1) is not None
    assert pool._last_error is None, "an interruption is not a connection error"


def test_interruptions_at_random_steps_keep_the_counters_exact() -> None:
    driver = FakeDriver()
    pool = make_pool(driver, max_conns=3, timeout=0.2, test_on_borrow=True)
    rng = random.Random(1234)
    lock = threading.Lock()

    def worker(seed: int) -> None:
        local = random.Random(seed)
        for _ in range(200):
            try:
                conn = pool.borrow(timeout=local.choice([0.0, 0.001, 0.01]))
            except (PoolTimeout, Interrupted, psycopg2.OperationalError):
                continue
            if local.random() < 0.2:
                conn.begin()
            if local.random() < 0.1:
                conn.interrupt = Interrupted()  # lands in the rollback or the next validation
            with contextlib.suppress(Interrupted):
                pool.release(conn)

    with lock:
        seeds = [rng.randrange(1 << 30) for _ in range(6)]
    threads = [threading.Thread(target=worker, args=(seed,)) for seed in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = assert_exact(pool)
    assert (stats["in_use"], stats["waiting"], stats["connecting"]) == (0, 0, 0)
    assert driver.open_count == stats["idle"]


# -------------------------------------------------------------- time is bounded


def test_validation_on_a_silent_server_is_cut_at_the_borrowers_timeout() -> None:
    driver = FakeDriver()
    pool = make_pool(driver, timeout=0.3, test_on_borrow=True)
    conn = pool.borrow()
    pool.release(conn)
    conn.hang = True
    began = time.monotonic()
    fresh = pool.borrow()  # the silent one is cut and replaced in the same turn
    elapsed = time.monotonic() - began
    assert fresh is not conn
    assert conn.closed
    assert elapsed < 5, f"the borrow took {elapsed:.1f} s; the deadline did not cut the query"
    stats = assert_exact(pool)
    assert stats["connections_lost"] == 1


def test_a_rollback_on_a_silent_server_is_cut_and_the_connection_discarded() -> None:
    pool = make_pool(max_conns=1, timeout=0.3)
    conn = pool.borrow()
    conn.begin()
    conn.hang = True
    began = time.monotonic()
    pool.release(conn)
    assert time.monotonic() - began < 5
    assert conn.closed
    stats = assert_exact(pool)
    assert (stats["in_use"], stats["idle"]) == (0, 0)
    assert stats["connections_discarded"] + stats["connections_lost"] == 1


# ------------------------------------------------------------ sessions left clean


def test_a_raw_begin_in_autocommit_is_rolled_back_on_release() -> None:
    # psycopg2's rollback() sends nothing in autocommit: the pool must end it itself.
    pool = make_pool()
    conn = pool.borrow()
    with conn.cursor() as cursor:
        cursor.execute("BEGIN")
        cursor.execute("INSERT INTO t VALUES (1)")
    assert conn.get_transaction_status() == ext.TRANSACTION_STATUS_INTRANS
    pool.release(conn)
    assert conn.get_transaction_status() == ext.TRANSACTION_STATUS_IDLE
    assert conn.executed[-1] == "ROLLBACK"
    assert pool.borrow() is conn


def test_cleanup_sql_runs_before_the_connection_is_pooled_again() -> None:
    pool = make_pool()
    conn = pool.borrow()
    pool.release(conn, cleanup="CLOSE ALL")
    assert conn.executed == ["CLOSE ALL"]
    again = pool.borrow()
    pool.release(again)
    assert conn.executed == ["CLOSE ALL"], "no round trip for a borrower that asked none"


def test_a_clean_release_costs_no_round_trip() -> None:
    pool = make_pool()
    conn = pool.borrow()
    pool.release(conn)
    assert conn.executed == []
    assert conn.rollbacks == 0


# --------------------------------------------- finalizers and the background thread


def test_release_later_never_takes_the_lock_and_the_connection_comes_back() -> None:
    pool = make_pool(max_conns=1)
    conn = pool.borrow()
    with pool._lock:  # as a finalizer running in a thread inside the pool's lock
        pool.release_later(conn)
    assert pool.stats()["in_use"] == 1, "nothing happened under the lock"
    assert pool.borrow(timeout=0.1) is conn, "taken back at the next borrow"
    assert_exact(pool)


def test_release_later_is_served_promptly_by_the_background_thread() -> None:
    pool = make_pool(max_conns=1, background=True)
    conn = pool.borrow()
    pool.release_later(conn)
    assert wait_until(lambda: pool.stats()["idle"] == 1, timeout=2)
    assert_exact(pool)
    pool.close()


def test_release_later_of_a_connection_released_meanwhile_is_ignored() -> None:
    pool = make_pool()
    conn = pool.borrow()
    pool.release_later(conn)
    pool.release(conn)
    pool.run_maintenance()
    stats = assert_exact(pool)
    assert (stats["releases"], stats["idle"]) == (1, 1)


def test_min_conns_are_opened_at_creation_and_refilled_promptly() -> None:
    driver = FakeDriver()
    pool = make_pool(driver, min_conns=2, max_conns=3, background=True)
    # The maintenance interval is 30 s for these settings: this must not wait for it.
    assert wait_until(lambda: pool.stats()["idle"] == 2, timeout=2)
    conn = pool.borrow()
    pool.discard(conn)
    assert wait_until(lambda: len(driver.opened) == 3 and pool.stats()["idle"] == 2, timeout=2)
    pool.close()


def test_a_failing_refill_does_not_retry_in_a_loop() -> None:
    driver = FakeDriver()
    pool = make_pool(driver, min_conns=1, max_conns=2)
    driver.fail_with = psycopg2.OperationalError("connection refused")
    pool.run_maintenance()
    pool.run_maintenance()
    assert pool.stats()["connections_failed"] == 2, "one attempt per maintenance run"
    assert pool._tasks.empty()


# ------------------------------------------------------- turns and dead connections


def test_a_waiter_handed_a_dead_connection_keeps_its_turn() -> None:
    driver = FakeDriver()
    clock = FakeClock()
    pool = make_pool(driver, max_conns=1, timeout=5, clock=clock)
    held = pool.borrow()
    served: list[tuple[str, Any]] = []

    def borrower(name: str) -> None:
        conn = pool.borrow()
        served.append((name, conn))

    first = threading.Thread(target=borrower, args=("first",))
    first.start()
    assert wait_until(lambda: pool.stats()["waiting"] == 1)
    second = threading.Thread(target=borrower, args=("second",))
    second.start()
    assert wait_until(lambda: pool.stats()["waiting"] == 2)
    held.kill()  # dies on its way back: the first waiter finds it dead
    pool.release(held)
    first.join(timeout=5)
    assert [name for name, _ in served] == ["first"], "the first waiter is served first"
    assert served[0][1] is not held
    assert pool.stats()["waiting"] == 1
    pool.release(served[0][1])
    second.join(timeout=5)
    assert [name for name, _ in served] == ["first", "second"]
    pool.release(served[1][1])
    assert_exact(pool)


def test_a_waiter_handed_a_dead_connection_keeps_the_slot_it_freed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The slot a waiter frees by dropping the dead connection it was handed stays its own: a
    borrower arriving meanwhile does not take it, and the waiter is lent a new connection at
    once.  (It used to go round again without the slot: when the arrival took it, the waiter
    queued again, but a waiter served once could never be served again; it waited its whole
    timeout, then took its first turn's dead connection for a new one and counted it closed
    a second time.)"""
    driver = FakeDriver()
    pool = make_pool(driver, max_conns=1, timeout=30)
    held = pool.borrow()
    sweep = ConnectionPool._sweep
    arrivals: list[Any] = []

    def dropped_then_arrival(self: ConnectionPool) -> int:
        # The waiter dropped the dead connection and looks for others like it: a borrower
        # arrives meanwhile.
        if not arrivals:
            try:
                arrivals.append(pool.borrow(timeout=0))
            except PoolTimeout as error:
                arrivals.append(error)
        return sweep(self)

    monkeypatch.setattr(ConnectionPool, "_sweep", dropped_then_arrival)
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.append(pool.borrow()))
    thread.start()
    assert wait_until(lambda: pool.stats()["waiting"] == 1)
    held.kill()  # dies on its way back: the waiter finds it dead
    pool.release(held)
    thread.join(timeout=5)
    try:
        assert not thread.is_alive(), "the waiter was not lent a connection"
        assert [type(arrival) for arrival in arrivals] == [PoolTimeout], arrivals
        assert got == [driver.opened[-1]]
        assert got[0] is not held
    finally:
        for conn in [*got, *arrivals]:
            if not isinstance(conn, PoolTimeout):
                pool.release(conn)
        pool.close()
    stats = assert_exact(pool)
    assert (stats["connections_created"], stats["connections_lost"]) == (2, 1), stats
    assert (stats["connections_closed"], stats["connections_discarded"]) == (1, 0), stats


def test_borrowers_through_repeated_deaths_of_handed_connections_all_served_all_counted() -> None:
    """Six threads take turns on two connections, and one in five comes back dead (a backend
    terminated while lent, as the fault suite's repeated pg_terminate_backend does): every
    borrow is served within its timeout, whoever finds the dead one, and every connection is
    counted once."""
    driver = FakeDriver(keep=False)
    pool = make_pool(driver, max_conns=2, timeout=3)
    rng = random.Random(7)
    kills = [rng.random() < 0.2 for _ in range(6 * 150)]
    errors: list[BaseException] = []

    def borrower(index: int) -> None:
        try:
            for turn in range(150):
                conn = pool.borrow()
                time.sleep(0)
                if kills[index * 150 + turn]:
                    conn.kill()
                pool.release(conn)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=borrower, args=(index,)) for index in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    pool.run_maintenance()  # finds the dead ones still idle
    stats = assert_exact(pool)
    assert stats["connections_lost"] == sum(kills), stats
    assert stats["borrows"] == 6 * 150, stats


@pytest.mark.parametrize("kept", ["slot", "idle"])
def test_an_interruption_after_a_dead_connection_was_dropped_strands_nothing(
    monkeypatch: pytest.MonkeyPatch, kept: str
) -> None:
    """An exception (a signal handler's) landing just after a borrower dropped a dead
    connection, while it owns what replaced it (a free slot, or the top idle connection
    reserved for checking): the borrower gets the exception, what it owned is put right at
    once, every connection is counted once, and the pool lends again."""
    driver = FakeDriver()
    pool = make_pool(driver, max_conns=2, timeout=5)
    dead = pool.borrow()
    if kept == "idle":
        pool.release(pool.borrow())  # another one, idle under the dead one
    pool.release(dead)  # on top: the next borrow takes it
    dead.kill()
    pool.validate_after = 0  # a query before every borrow: the death is found by the check
    sweep = ConnectionPool._sweep

    def interrupted(self: ConnectionPool) -> int:
        monkeypatch.setattr(ConnectionPool, "_sweep", sweep)  # once
        raise Interrupted

    monkeypatch.setattr(ConnectionPool, "_sweep", interrupted)
    with pytest.raises(Interrupted):
        pool.borrow()
    stats = assert_exact(pool)
    assert (stats["in_use"], stats["connecting"], stats["connections_lost"]) == (0, 0, 1), stats
    assert stats["connections_discarded"] == (1 if kept == "idle" else 0), stats
    conn = pool.borrow()
    assert not conn.closed
    pool.release(conn)
    assert_exact(pool)


@pytest.mark.parametrize("meanwhile", ["killed", "notified", "interrupted"])
def test_a_connection_handed_to_a_waiter_is_polled_before_it_is_lent(
    monkeypatch: pytest.MonkeyPatch, meanwhile: str
) -> None:
    """A waiter lends a connection handed over by a release in one step, without the query
    a check would send, after the same zero-timeout poll the fast path makes: what reached
    the socket between the hand-over and the waiter waking up (a terminated backend, a
    notification) gets it checked with a query first, in the same turn, kept for the waiter
    meanwhile (a borrower arriving then does not get it); an exception landing in that poll
    leaves it in the pool, untouched."""
    driver = FakeDriver()
    pool = make_pool(driver, max_conns=1, timeout=5)
    held = pool.borrow()
    handed: list[Any] = []
    wait = Waiter.wait
    take_back = ConnectionPool._take_back
    arrivals: list[BaseException | Any] = []

    def taken_back(self: ConnectionPool, *args: Any) -> None:
        take_back(self, *args)
        if meanwhile != "notified":
            return
        # Another borrower arrives between the poll and the check.
        try:
            arrivals.append(pool.borrow(timeout=0))
        except PoolTimeout as error:
            arrivals.append(error)

    monkeypatch.setattr(ConnectionPool, "_take_back", taken_back)

    def woken(waiter: Waiter, timeout: float) -> None:
        wait(waiter, timeout)
        if handed or waiter.entry is None:
            return  # the waiter of this test only, once
        conn = waiter.entry.conn
        handed.append(conn)
        if meanwhile == "killed":
            conn.kill()
        elif meanwhile == "notified":
            conn.notify()
        else:
            interrupt_next_poll(waiter.entry, Interrupted)

    monkeypatch.setattr(Waiter, "wait", woken)
    got: list[Any] = []

    def borrower() -> None:
        try:
            got.append(pool.borrow(timeout=1))
        except (Interrupted, PoolTimeout) as error:
            got.append(error)

    thread = threading.Thread(target=borrower)
    thread.start()
    assert wait_until(lambda: pool.stats()["waiting"] == 1)
    pool.release(held)
    thread.join(timeout=5)
    assert handed == [held], "the release handed its connection to the waiter"
    stats = assert_exact(pool)
    if meanwhile == "killed":
        assert got[0] is not held, "a dead connection was lent"
        assert held.closed
        assert stats["connections_lost"] == 1, stats
    elif meanwhile == "notified":
        assert len(arrivals) == 1
        assert isinstance(arrivals[0], PoolTimeout), "taken from the waiter whose turn it was"
        assert got[0] is held
        assert held.executed == ["SELECT 1"], "lent without the check a readable socket needs"
        assert stats["validations"] == 1, stats
    else:
        assert isinstance(got[0], Interrupted)
        assert (stats["in_use"], stats["idle"]) == (0, 1), stats
        monkeypatch.setattr(Waiter, "wait", wait)
        assert pool.borrow(timeout=0.1) is held, "the same connection, not a new one"
        assert held.executed == ["SELECT 1"], "checked before it was lent again"
        got[0] = held
    pool.release(got[0])
    assert_exact(pool)


def test_an_expired_connection_is_replaced_in_the_same_turn() -> None:
    driver = FakeDriver()
    clock = FakeClock()
    pool = make_pool(driver, max_conns=1, max_lifetime=10, clock=clock)
    conn = pool.borrow()
    pool.release(conn)
    clock.advance(11)
    fresh = pool.borrow()
    assert fresh is not conn
    assert conn.closed
    stats = assert_exact(pool)
    assert (stats["borrows"], stats["connections_closed"]) == (2, 1)


# --------------------------------------------------------------------- messages


def test_the_timeout_message_names_the_thread_holding_a_connection_and_the_callers_hint() -> None:
    seen: list[int] = []

    def describe_holder(ident: int) -> str:
        seen.append(ident)
        return "a hint from the caller"

    pool = make_pool(max_conns=1, timeout=0.05, describe_holder=describe_holder)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as executor:
        holder = executor.submit(threading.get_ident).result()
        executor.submit(pool.borrow).result()  # the thread lives on; nobody releases
        with pytest.raises(PoolTimeout) as info:
            pool.borrow()
    message = str(info.value)
    assert "held longest:" in message
    assert "by thread 'ThreadPoolExecutor-" in message
    assert message.endswith("(a hint from the caller)")
    assert seen == [holder]


def test_connection_context_manager_releases_however_the_block_ends() -> None:
    pool = make_pool(max_conns=1)
    with pool.connection() as conn:
        assert pool.stats()["in_use"] == 1
    assert pool.stats()["idle"] == 1

    def fail_inside_a_transaction() -> None:
        with pool.connection() as again:
            assert again is conn
            again.begin()
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        fail_inside_a_transaction()
    assert conn.get_transaction_status() == ext.TRANSACTION_STATUS_IDLE
    assert_exact(pool)
    pool.close()
    with pytest.raises(PoolClosed), pool.connection():
        pass


def test_close_releases_what_release_later_was_given() -> None:
    pool = make_pool()
    conn = pool.borrow()
    pool.release_later(conn)
    pool.close()
    assert isinstance(conn, FakeConnection)
    assert conn.closed


def test_release_later_runs_the_cleanup_it_was_given() -> None:
    pool = make_pool()
    conn = pool.borrow()
    pool.release_later(conn, cleanup="CLOSE ALL")
    pool.run_maintenance()
    assert conn.executed == ["CLOSE ALL"]
    stats = assert_exact(pool)
    assert stats["idle"] == 1


def test_maintenance_replaces_idle_connections_the_server_ended() -> None:
    driver = FakeDriver()
    pool = make_pool(driver, min_conns=2, max_conns=2)
    pool.run_maintenance()
    first, second = driver.opened
    second.kill()  # pg_terminate_backend / idle_session_timeout while idle
    pool.run_maintenance()
    assert second.closed
    assert not first.closed
    assert len(driver.opened) == 3
    stats = assert_exact(pool)
    assert (stats["idle"], stats["connections_lost"]) == (2, 1)


class SoftTimeLimit(Exception):
    """Like Celery's SoftTimeLimitExceeded: an ``Exception`` a signal handler raises."""


@pytest.mark.parametrize("step", ["validation", "rollback", "reset"])
def test_a_signal_handlers_exception_is_never_swallowed(step: str) -> None:
    """An ``Exception`` that is not the driver's, landing in the pool's own query, is an
    interruption: it reaches the caller (a Celery task whose soft limit fired must stop), and
    the connection of unknown state is discarded. Before, the pool took it for a failed query
    and swallowed it: the task ran on past its soft limit."""
    pool = make_pool(max_conns=1, test_on_borrow=step == "validation", reset="DISCARD ALL")
    conn = pool.borrow()
    if step == "validation":
        pool.release(conn)
    elif step == "rollback":
        conn.begin()
    conn.interrupt = SoftTimeLimit()
    step_that_queries = pool.borrow if step == "validation" else lambda: pool.release(conn)
    with pytest.raises(SoftTimeLimit):
        step_that_queries()
    assert conn.closed, "its state is unknown: discarded"
    stats = assert_exact(pool)
    assert (stats["in_use"], stats["idle"]) == (0, 0)
    assert pool.borrow(timeout=0.1) is not conn, "the slot is free again"


def test_an_interruption_in_the_fast_paths_poll_keeps_the_connection() -> None:
    """The fast path takes the idle connection, then polls its socket outside the lock: a
    signal handler's exception landing as the poll returns must leave the connection in the
    pool (checked with a query before it is lent again), not lent to nobody."""
    pool = make_pool(max_conns=1)
    conn = pool.borrow()
    pool.release(conn)
    interrupt_next_poll(pool._entries.idle[-1], SoftTimeLimit)
    with pytest.raises(SoftTimeLimit):
        pool.borrow()
    stats = assert_exact(pool)
    assert (stats["in_use"], stats["idle"]) == (0, 1), stats
    assert pool.borrow(timeout=0.1) is conn, "the same connection, not a new one"
    assert conn.executed == ["SELECT 1"], "checked before it was lent again"
    pool.release(conn)
    assert_exact(pool)


def test_a_connection_taken_back_into_a_pool_closed_meanwhile_is_closed() -> None:
    pool = make_pool(max_conns=1)
    conn = pool.borrow()
    pool.release(conn)
    entry = pool._entries.idle[-1]

    def closing_the_pool() -> Any:
        pool.close()  # another thread closes the pool while this borrow polls
        return 1  # readable: the connection goes back

    entry.poll = closing_the_pool
    with pytest.raises(PoolClosed):
        pool.borrow()
    assert conn.closed, "not left open in a closed pool"
    stats = assert_exact(pool)
    assert (stats["in_use"], stats["idle"]) == (0, 0), stats


def test_a_connection_found_readable_by_a_sweep_is_validated_before_it_is_lent() -> None:
    """A killed backend sends its FATAL before it closes the socket.  A sweep that reads the
    FATAL before the close arrives cannot tell it from a notification: the connection stays,
    but the next borrow must check it with a query, however recently it was used."""
    driver = FakeDriver()
    pool = make_pool(driver, max_conns=2, validate_after=0.5)
    a, b = pool.borrow(), pool.borrow()
    pool.release(a)
    pool.release(b)  # b on top of the idle stack
    a.notify(b"FATAL")  # a's backend was terminated: its FATAL arrived, not yet the close
    a.ending = True
    b.kill()
    conn = pool.borrow()  # b is found dead; the sweep reads a's FATAL and keeps a
    assert conn is not a, "a connection that had traffic while idle was lent unchecked"
    assert conn is not b
    stats = pool.stats()
    assert stats["connections_lost"] == 2, stats
    assert stats["borrows"] == stats["releases"] + stats["in_use"], stats
    pool.release(conn)


def test_a_connection_a_maintenance_sweep_read_from_is_not_lent_by_the_fast_path() -> None:
    driver = FakeDriver()
    pool = make_pool(driver, max_conns=2, validate_after=0.5)
    a, b = pool.borrow(), pool.borrow()
    pool.release(a)
    pool.release(b)
    a.notify(b"FATAL")  # its FATAL arrived, not yet the close
    a.ending = True
    b.kill()
    pool.run_maintenance()  # the sweep: b is dead, a is kept (only read, not queried)
    assert pool.stats()["idle"] == 1
    conn = pool.borrow()  # a is on top, its socket quiet, used just now
    assert conn is not a, "the fast path lent a connection a sweep could not vouch for"
    pool.release(conn)
    assert pool.stats()["connections_lost"] == 2


# ----------------------------------------------- a new object per loan (successor)


def test_each_clean_release_hands_the_session_to_the_successors_object() -> None:
    """With ``successor`` (psycopg 3's backend) the next borrower gets the object it
    returned; the released one is closed to whoever kept it, and the pool no longer knows
    it: releasing it again is refused."""
    pool = make_pool(max_conns=1, successor=move_session)
    first = pool.borrow()
    pool.release(first)
    assert first.closed, "closed to whoever kept it, at once"
    second = pool.borrow()
    assert second is not first
    assert second.moved_from == first.id
    assert not second.closed
    with pytest.raises(ValueError, match="not borrowed from this pool"):
        pool.release(first)
    pool.release(second)
    third = pool.borrow()
    assert third is not second
    assert third.moved_from == first.id
    stats = assert_exact(pool)
    assert (stats["connections_created"], stats["borrows"], stats["in_use"]) == (1, 3, 1)


def test_a_queued_borrower_is_handed_the_successors_object() -> None:
    pool = make_pool(max_conns=1, successor=move_session, timeout=5)
    first = pool.borrow()
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(pool.borrow()))
    waiter.start()
    wait_until(lambda: pool.stats()["waiting"] == 1)
    pool.release(first)
    waiter.join()
    assert got[0] is not first
    assert got[0].moved_from == first.id
    assert first.closed
    pool.release(got[0])
    assert_exact(pool)


def test_a_connection_not_kept_is_closed_without_a_successor() -> None:
    """Discarded or expired: the session ends with the object it was lent as."""
    moved: list[Any] = []

    def successor(conn: Any) -> Any:
        moved.append(conn)
        return move_session(conn)

    clock = FakeClock()
    pool = make_pool(max_conns=2, successor=successor, max_lifetime=10, clock=clock)
    broken = pool.borrow()
    pool.discard(broken)
    expired = pool.borrow()
    clock.advance(20)
    pool.release(expired)
    assert moved == []
    assert broken.closed
    assert expired.closed
    stats = assert_exact(pool)
    assert (stats["connections_discarded"], stats["connections_closed"]) == (1, 1)


@pytest.mark.parametrize("when", ["before", "after"])
def test_an_interruption_around_the_hand_over_closes_the_session_once(when: str) -> None:
    """A signal handler's exception landing as the successor starts (the session still in
    the released object) or as it returns (already in the new one, which the pool never
    got): either way the session is closed, counted once, and its slot is free."""
    made: list[Any] = []

    def successor(conn: Any) -> Any:
        if when == "after":
            made.append(move_session(conn))
        raise Interrupted()

    pool = make_pool(max_conns=1, successor=successor)
    conn = pool.borrow()
    sockets = conn._client, conn._server
    with pytest.raises(Interrupted):
        pool.release(conn)
    made.clear()  # the new object's last reference, if any: its sockets close with it
    assert all(sock.fileno() == -1 for sock in sockets), "the session is closed"
    stats = assert_exact(pool)
    assert (stats["in_use"], stats["idle"], stats["connections_discarded"]) == (0, 0, 1)
    assert pool.borrow(timeout=0.1) is not None, "the slot is free again"
