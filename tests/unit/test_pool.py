"""The pool's logic on fake connections and an injected clock: no database, no sleeping
beyond the few short real timeouts that waiting needs."""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from typing import Any

import psycopg2
import pytest
from psycopg2 import extensions as ext

from herokupool.errors import PoolClosed, PoolError, PoolTimeout
from herokupool.pool import ConnectionPool
from tests.helpers import wait_until
from tests.unit.fakes import FakeClock, FakeConnection, FakeDriver

# Every test here runs once per driver installed (see tests/unit/conftest.py).
pytestmark = pytest.mark.usefixtures("flavour")


def make_pool(driver: FakeDriver | None = None, **kwargs: object) -> ConnectionPool:
    kwargs.setdefault("background", False)
    kwargs.setdefault("validate_after", None)
    return ConnectionPool(driver or FakeDriver(), **kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------- sizing and reuse


def test_release_then_borrow_reuses_the_same_connection() -> None:
    driver = FakeDriver()
    pool = make_pool(driver)
    first = pool.borrow()
    pool.release(first)
    assert pool.borrow() is first
    assert len(driver.opened) == 1


def test_the_most_recently_used_connection_is_lent_first() -> None:
    pool = make_pool(max_conns=3)
    a, b, c = pool.borrow(), pool.borrow(), pool.borrow()
    for conn in (a, b, c):
        pool.release(conn)
    assert pool.borrow() is c


def test_never_opens_more_than_max_conns() -> None:
    driver = FakeDriver()
    pool = make_pool(driver, max_conns=2, timeout=0.05)
    pool.borrow()
    pool.borrow()
    with pytest.raises(PoolTimeout):
        pool.borrow()
    assert len(driver.opened) == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_conns": 0}, "max_conns (0) must be at least 1"),
        ({"min_conns": 3, "max_conns": 2}, "min_conns (3) must be between 0 and max_conns (2)"),
        ({"timeout": 0}, "timeout (0) must be greater than 0"),
    ],
)
def test_rejects_impossible_sizes(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        make_pool(name="db", **kwargs)


# ----------------------------------------------------------------------- timeouts


@pytest.mark.parametrize("timeout", [0, 0.0, -1, -5.5])
def test_a_borrow_with_no_time_left_times_out_at_once(timeout: float) -> None:
    pool = make_pool(max_conns=1)
    pool.borrow()
    raised: list[BaseException] = []

    def borrow() -> None:
        try:
            pool.borrow(timeout)
        except PoolTimeout as error:
            raised.append(error)

    # In a thread: a lock's acquire(timeout=-1) would wait for ever.
    borrower = threading.Thread(target=borrow, daemon=True)
    borrower.start()
    borrower.join(5)
    assert raised, "still waiting"
    assert "timed out after 0.0 s" in str(raised[0])


def test_a_borrow_may_wait_longer_than_a_lock_can() -> None:
    pool = make_pool(max_conns=1)
    held = pool.borrow()
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(pool.borrow(timeout=1e300)), daemon=True)
    waiter.start()
    assert wait_until(lambda: pool.stats()["waiting"] == 1)
    pool.release(held)
    waiter.join(5)
    assert got == [held], "served, not OverflowError from threading.TIMEOUT_MAX"


def test_timeout_message_names_the_pool_and_the_numbers() -> None:
    pool = make_pool(name="replica", max_conns=2, timeout=0.05)
    pool.borrow()
    pool.borrow()
    with pytest.raises(PoolTimeout) as info:
        pool.borrow()
    assert re.fullmatch(
        r"pool 'replica': timed out after 0\.\d s waiting for a connection "
        r"\(2 in use, 0 idle, 0 waiting, max 2\); "
        r"held longest: 0\.\d s by thread 'MainThread'",
        str(info.value),
    )
    assert info.value.__cause__ is None
    assert isinstance(info.value, psycopg2.OperationalError)
    stats = pool.stats()
    assert (stats["timeouts"], stats["waits"], stats["waiting"]) == (1, 1, 0)


def test_timeout_after_a_failed_connect_reads_as_unreachable() -> None:
    driver = FakeDriver()
    pool = make_pool(driver, max_conns=1, timeout=0.05)
    held = pool.borrow()
    pool.discard(held)
    driver.fail_with = psycopg2.OperationalError("connection refused\nIs the server running?")
    with pytest.raises(psycopg2.OperationalError, match="connection refused"):
        pool.borrow()
    driver.fail_with = None
    blocker = pool.borrow()  # the slot is free again after the failure
    driver.fail_with = psycopg2.OperationalError("connection refused")
    pool.discard(blocker)
    with pytest.raises(psycopg2.OperationalError):
        pool.borrow()
    # Now exhaust the pool while the last connect attempt had failed.
    driver.fail_with = None
    pool2 = make_pool(driver, name="p2", max_conns=1, timeout=0.05)
    pool2.borrow()
    pool2._last_error = psycopg2.OperationalError("connection refused")
    with pytest.raises(PoolTimeout) as info:
        pool2.borrow()
    assert "the last attempt to connect failed: connection refused" in str(info.value)
    assert isinstance(info.value.__cause__, psycopg2.OperationalError)


def test_a_waiter_that_timed_out_is_never_handed_a_connection() -> None:
    # Race a release against a waiter's timeout many times: afterwards every connection
    # is either idle or held by exactly one thread, and the counters add up.
    driver = FakeDriver()
    pool = make_pool(driver, max_conns=1)
    for _ in range(300):
        held = pool.borrow()
        results: list[object] = []

        def waiter(results: list[object] = results) -> None:
            try:
                results.append(pool.borrow(timeout=random.choice([0.0, 0.0005, 0.001])))
            except PoolTimeout as error:
                results.append(error)

        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(random.choice([0.0, 0.0005, 0.001]))
        pool.release(held)
        thread.join()
        (result,) = results
        stats = pool.stats()
        if isinstance(result, PoolTimeout):
            assert (stats["in_use"], stats["idle"]) == (0, 1)
        else:
            assert result is held
            assert (stats["in_use"], stats["idle"]) == (1, 0)
            pool.release(result)
        assert stats["waiting"] == 0
    stats = pool.stats()
    assert stats["borrows"] == stats["releases"] + stats["in_use"]
    assert len(driver.opened) == 1


# ----------------------------------------------------------------------- fairness


def test_waiters_are_served_in_arrival_order() -> None:
    pool = make_pool(max_conns=1, timeout=5)
    held = pool.borrow()
    served: list[int] = []

    def borrower(n: int) -> None:
        conn = pool.borrow()
        served.append(n)
        pool.release(conn)

    threads = []
    for n in range(6):
        thread = threading.Thread(target=borrower, args=(n,))
        thread.start()
        assert wait_until(lambda n=n: pool.stats()["waiting"] == n + 1)
        threads.append(thread)
    pool.release(held)
    for thread in threads:
        thread.join()
    assert served == list(range(6))


def test_a_releasing_thread_cannot_jump_the_queue() -> None:
    pool = make_pool(max_conns=1, timeout=5)
    conn = pool.borrow()
    got: list[object] = []
    thread = threading.Thread(target=lambda: got.append(pool.borrow()))
    thread.start()
    assert wait_until(lambda: pool.stats()["waiting"] == 1)
    pool.release(conn)
    # The connection went to the waiter: borrowing again right away must wait.
    with pytest.raises(PoolTimeout):
        pool.borrow(timeout=0.02)
    thread.join()
    assert got == [conn]


def test_concurrent_borrowers_keep_the_counters_consistent() -> None:
    driver = FakeDriver()
    pool = make_pool(driver, max_conns=3, timeout=5)
    in_hand: set[int] = set()
    guard = threading.Lock()
    errors: list[str] = []

    def worker() -> None:
        for _ in range(300):
            conn = pool.borrow()
            with guard:
                if id(conn) in in_hand:
                    errors.append("a connection was lent twice")
                in_hand.add(id(conn))
            with guard:
                in_hand.discard(id(conn))
            pool.release(conn)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    stats = pool.stats()
    assert stats["borrows"] == stats["releases"] == 8 * 300
    assert stats["in_use"] == 0
    assert len(driver.opened) <= 3


# -------------------------------------------------------- release by transaction status


@pytest.mark.parametrize("status", [ext.TRANSACTION_STATUS_INTRANS, ext.TRANSACTION_STATUS_INERROR])
def test_a_transaction_left_open_is_rolled_back_and_autocommit_restored(status: int) -> None:
    pool = make_pool()
    conn = pool.borrow()
    conn.begin()
    conn.status = status
    conn.isolation_level = ext.ISOLATION_LEVEL_SERIALIZABLE
    pool.release(conn)
    assert conn.rollbacks == 1
    assert conn.autocommit is True
    assert conn.isolation_level is None
    assert pool.borrow() is conn
    assert conn.get_transaction_status() == ext.TRANSACTION_STATUS_IDLE


@pytest.mark.parametrize("status", [ext.TRANSACTION_STATUS_ACTIVE, ext.TRANSACTION_STATUS_UNKNOWN])
def test_a_busy_or_broken_connection_is_discarded(status: int) -> None:
    driver = FakeDriver()
    pool = make_pool(driver)
    conn = pool.borrow()
    conn.status = status
    pool.release(conn)
    assert conn.closed
    assert pool.stats()["connections_discarded"] == 1
    assert pool.borrow() is not conn


def test_a_connection_lost_while_in_use_costs_itself_and_the_idle_ones_that_died_too() -> None:
    clock = FakeClock()
    driver = FakeDriver()
    pool = make_pool(driver, max_conns=4, clock=clock)
    a, b, c, d = pool.borrow(), pool.borrow(), pool.borrow(), pool.borrow()
    pool.release(b)
    pool.release(c)
    c.kill()  # died with a (a restart): its socket says so
    clock.advance(1)
    a.closed = 2  # the driver noticed the server went away mid-query
    pool.release(a)
    stats = pool.stats()
    assert stats["connections_lost"] == 2
    assert c.closed, "an idle connection whose socket shows it died is swept"
    assert not b.closed, "a healthy idle connection is kept: one kill, one reconnect"
    assert stats["idle"] == 1
    # d was in use: it comes back healthy and stays.
    pool.release(d)
    assert not d.closed
    assert pool.stats()["idle"] == 2


def test_reset_query_runs_on_every_release() -> None:
    pool = make_pool(reset="DISCARD ALL")
    conn = pool.borrow()
    pool.release(conn)
    assert conn.executed == ["DISCARD ALL"]


def test_a_failing_reset_discards_the_connection() -> None:
    pool = make_pool(reset="DISCARD ALL")
    conn = pool.borrow()
    conn.server_gone = True
    pool.release(conn)
    assert conn.closed
    assert pool.stats()["idle"] == 0


def test_release_of_a_stranger_is_refused() -> None:
    pool = make_pool(name="db")
    with pytest.raises(ValueError, match="pool 'db': this connection was not borrowed"):
        pool.release(FakeConnection())


# ------------------------------------------------------------------------ closing


def test_release_into_a_closed_pool_closes_the_connection() -> None:
    pool = make_pool(max_conns=2)
    held, idle = pool.borrow(), pool.borrow()
    pool.release(idle)
    pool.close()
    assert idle.closed
    assert not held.closed
    pool.release(held)
    assert held.closed
    with pytest.raises(PoolClosed, match="pool 'default' is closed"):
        pool.borrow()


def test_closing_wakes_waiters_with_pool_closed() -> None:
    pool = make_pool(max_conns=1, timeout=5)
    pool.borrow()
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            pool.borrow()
        except PoolError as error:
            errors.append(error)

    thread = threading.Thread(target=waiter)
    thread.start()
    assert wait_until(lambda: pool.stats()["waiting"] == 1)
    pool.close()
    thread.join()
    assert len(errors) == 1
    assert isinstance(errors[0], PoolClosed)


# ---------------------------------------------------------- lifetime and idle expiry


def test_a_connection_past_max_lifetime_is_closed_on_release_not_under_a_borrower() -> None:
    clock = FakeClock()
    pool = make_pool(max_lifetime=100.0, clock=clock)
    conn = pool.borrow()
    clock.advance(150)
    assert not conn.closed, "never closed under its borrower"
    pool.release(conn)
    assert conn.closed
    assert pool.stats()["connections_closed"] == 1


def test_lifetime_has_jitter_but_never_exceeds_max_lifetime() -> None:
    clock = FakeClock()
    pool = make_pool(max_conns=50, max_lifetime=100.0, clock=clock)
    conns = [pool.borrow() for _ in range(50)]
    for conn in conns:
        pool.release(conn)
    clock.advance(89.9)
    pool.run_maintenance()
    assert pool.stats()["idle"] == 50, "nothing expires before 90% of max_lifetime"
    clock.advance(5)
    pool.run_maintenance()
    remaining = pool.stats()["idle"]
    assert 0 < remaining < 50, "expiry is spread between 90% and 100% of max_lifetime"
    clock.advance(5.2)
    pool.run_maintenance()
    assert pool.stats()["idle"] == 0


def test_extra_idle_connections_close_after_max_idle_down_to_min_conns() -> None:
    clock = FakeClock()
    pool = make_pool(max_conns=4, min_conns=1, max_idle=60.0, clock=clock)
    conns = [pool.borrow() for _ in range(4)]
    for conn in conns:
        pool.release(conn)
    clock.advance(30)
    pool.run_maintenance()
    assert pool.stats()["idle"] == 4, "returned connections above min stay until max_idle"
    clock.advance(31)
    pool.run_maintenance()
    stats = pool.stats()
    assert stats["idle"] == 1
    assert stats["connections_closed"] == 3
    # The one kept is the most recently used.
    assert pool.borrow() is conns[-1]


def test_maintenance_refills_to_min_conns() -> None:
    driver = FakeDriver()
    pool = make_pool(driver, max_conns=4, min_conns=2)
    pool.run_maintenance()
    assert pool.stats()["idle"] == 2
    assert len(driver.opened) == 2


def test_background_thread_prefills_min_conns() -> None:
    driver = FakeDriver()
    pool = ConnectionPool(driver, max_conns=4, min_conns=2, max_idle=0.2)
    try:
        assert wait_until(lambda: pool.stats()["idle"] == 2)
    finally:
        pool.close()


# ------------------------------------------------------------- health on borrow


def test_a_connection_killed_while_idle_is_replaced_before_lending() -> None:
    clock = FakeClock()
    driver = FakeDriver()
    pool = make_pool(driver, max_conns=3, clock=clock)
    a, b = pool.borrow(), pool.borrow()
    pool.release(a)
    pool.release(b)
    clock.advance(0.1)
    b.kill()  # the most recently used: the next one lent
    a.kill()
    conn = pool.borrow()
    assert conn not in (a, b)
    assert not conn.closed
    stats = pool.stats()
    assert stats["connections_lost"] == 2, "the other dead idle connection is swept too"
    assert stats["idle"] == 0
    assert a.closed
    assert (stats["borrows"], stats["releases"], stats["in_use"]) == (3, 2, 1)


def test_one_killed_backend_costs_one_reconnect() -> None:
    driver = FakeDriver()
    pool = make_pool(driver, max_conns=3)
    a, b, c = pool.borrow(), pool.borrow(), pool.borrow()
    for conn in (a, b, c):
        pool.release(conn)
    c.kill()  # the most recently used: lent first
    assert pool.borrow() is b, "the next idle connection, no new one"
    assert len(driver.opened) == 3
    assert not a.closed
    assert pool.stats()["connections_lost"] == 1


def test_a_quiet_socket_costs_no_query_within_the_validation_window() -> None:
    clock = FakeClock()
    pool = make_pool(validate_after=0.5, clock=clock)
    conn = pool.borrow()
    pool.release(conn)
    clock.advance(0.4)
    assert pool.borrow() is conn
    assert conn.executed == []
    pool.release(conn)
    clock.advance(0.6)
    assert pool.borrow() is conn
    assert conn.executed == ["SELECT 1"]
    assert pool.stats()["validations"] == 1


@pytest.mark.parametrize(
    ("setting", "value", "validated"),
    [
        ("validate_after", 1.0, ["SELECT 1"]),  # idle for 2 s: past the new window
        ("validate_after", 5.0, []),
        ("test_on_borrow", True, ["SELECT 1"]),
        ("test_on_borrow", False, []),
    ],
)
def test_validation_settings_changed_on_a_live_pool_take_effect_at_the_next_borrow(
    setting: str, value: object, validated: list[str]
) -> None:
    """The fast path reads one number made from both settings: changing either one on the
    pool remakes it."""
    clock = FakeClock()
    pool = make_pool(clock=clock)  # validate_after None: never validated by idle time
    conn = pool.borrow()
    pool.release(conn)
    clock.advance(2.0)
    setattr(pool, setting, value)
    assert getattr(pool, setting) == value
    assert pool.borrow() is conn
    assert conn.executed == validated


def test_the_idle_socket_is_polled_outside_the_pools_lock() -> None:
    """poll() lets go of the GIL: polled under the pool's lock, every other borrower and
    releaser would queue on the lock behind a thread waiting to get the GIL back."""
    pool = make_pool()
    conn = pool.borrow()
    pool.release(conn)
    entry = pool._entries.idle[-1]
    poll = entry.poll
    assert poll is not None
    locked_while_polling = []

    def spy() -> Any:
        locked_while_polling.append(pool._lock.locked())
        return poll()

    entry.poll = spy
    assert pool.borrow() is conn
    assert locked_while_polling == [False]
    pool.release(conn)
    conn.notify(b"NOTIFY")  # found readable on the fast path: read, then checked with a query
    assert pool.borrow() is conn
    assert locked_while_polling[1] is False
    assert conn.executed == ["SELECT 1"]
    stats = pool.stats()
    assert (stats["borrows"], stats["validations"], stats["in_use"]) == (3, 1, 1), stats


def test_test_on_borrow_validates_every_time() -> None:
    pool = make_pool(test_on_borrow=True)
    conn = pool.borrow()  # freshly opened: nothing to validate
    assert conn.executed == []
    for _ in range(2):
        pool.release(conn)
        assert pool.borrow() is conn
    assert conn.executed == ["SELECT 1", "SELECT 1"]


def test_validation_never_leaves_a_transaction_open() -> None:
    pool = make_pool(test_on_borrow=True)
    conn = pool.borrow()
    pool.release(conn)
    conn.autocommit = False  # as if something turned autocommit off while idle
    assert pool.borrow() is conn
    assert conn.get_transaction_status() == ext.TRANSACTION_STATUS_IDLE


def test_connect_failure_reaches_the_borrower_and_frees_the_slot_for_a_waiter() -> None:
    driver = FakeDriver()
    pool = make_pool(driver, max_conns=1, timeout=5)
    held = pool.borrow()
    outcome: list[object] = []

    def waiter() -> None:
        try:
            outcome.append(pool.borrow())
        except psycopg2.OperationalError as error:
            outcome.append(error)

    thread = threading.Thread(target=waiter)
    thread.start()
    assert wait_until(lambda: pool.stats()["waiting"] == 1)
    driver.fail_with = psycopg2.OperationalError("connection refused")
    pool.discard(held)  # frees the slot: the waiter connects, and fails at once
    thread.join(timeout=5)
    assert isinstance(outcome[0], psycopg2.OperationalError)
    assert not isinstance(outcome[0], PoolTimeout)
    assert pool.stats()["connections_failed"] == 1
    driver.fail_with = None
    assert pool.borrow() is not held  # recovered without a restart


# ------------------------------------------------------------------------- leaks


def test_a_long_borrow_is_reported_once_with_the_borrowers_stack(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    pool = make_pool(name="db", leak_threshold=5.0, clock=clock)

    def forgetful_task() -> object:
        return pool.borrow()

    forgetful_task()
    clock.advance(6)
    with caplog.at_level(logging.WARNING, logger="herokupool.pool"):
        pool.run_maintenance()
        pool.run_maintenance()
    leaks = [r for r in caplog.records if "borrowed for" in r.getMessage()]
    assert len(leaks) == 1
    assert "pool 'db'" in leaks[0].getMessage()
    assert "forgetful_task" in leaks[0].getMessage()
    assert pool.stats()["leaks"] == 1


@pytest.mark.parametrize("path", ["idle", "opened", "handed over", "checked"])
def test_a_leak_report_ends_with_the_borrowers_frame_on_every_path(
    caplog: pytest.LogCaptureFixture, path: str
) -> None:
    """The stack a leak report shows is the borrower's, down to its own call of borrow():
    none of the pool's frames, whichever way the connection came."""
    clock = FakeClock()
    pool = make_pool(name="db", leak_threshold=5.0, max_conns=1, clock=clock, timeout=5)
    if path in ("idle", "checked"):
        pool.release(pool.borrow())
        if path == "checked":
            pool.test_on_borrow = True
    got: list[object] = []

    def forgetful_task() -> None:
        got.append(pool.borrow())

    if path == "handed over":
        held = pool.borrow()
        thread = threading.Thread(target=forgetful_task)
        thread.start()
        assert wait_until(lambda: pool.stats()["waiting"] == 1)
        pool.release(held)
        thread.join(timeout=5)
    else:
        forgetful_task()
    clock.advance(6)
    with caplog.at_level(logging.WARNING, logger="herokupool.pool"):
        pool.run_maintenance()
    [leak] = [r.getMessage() for r in caplog.records if "borrowed for" in r.getMessage()]
    frames = [line for line in leak.splitlines() if line.strip().startswith("File ")]
    assert "forgetful_task" in frames[-1], leak
    assert not [f for f in frames if "herokupool" in f and "pool.py" in f], leak


# ------------------------------------------------------------------------- stats


def test_stats_measures_and_counters() -> None:
    pool = make_pool(max_conns=3, min_conns=1)
    a = pool.borrow()
    b = pool.borrow()
    pool.release(a)
    stats = pool.stats()
    assert {k: stats[k] for k in ("max", "min", "in_use", "idle", "waiting")} == {
        "max": 3,
        "min": 1,
        "in_use": 1,
        "idle": 1,
        "waiting": 0,
    }
    assert stats["borrows"] == 2
    assert stats["releases"] == 1
    assert stats["connections_created"] == 2
    pool.release(b)


def test_repr_shows_the_state_not_the_parameters() -> None:
    secret = "pa55-Distinctive-9f1c"
    pool = ConnectionPool(lambda: FakeConnection(), name="default", background=False)
    pool._connect_params = {"password": secret}  # even if someone attached them
    assert repr(pool) == "<ConnectionPool 'default' open: 0 in use, 0 idle, 0 waiting, max 4>"
    assert secret not in repr(pool)
