"""The pool across server restarts, outages and a full server (issue 2, items 5 and 6).

Each test runs its own private PostgreSQL (devtools.pgcluster, a copy of one initdb made for the
module) so that it can restart, stop, freeze and fill it; the shared test server is never touched.
What is asserted is what the application and the server see: errors raised or not, how long they
took, backend pids, and the pool's counters.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg2
import pytest
from django.db import OperationalError

import herokupool
from herokupool.errors import PoolTimeout
from tests.integration.conftest import MakeCluster, MakeWrapper, backend_pid, postmaster_pid

pytestmark = pytest.mark.integration

# A borrower's failure while the server is away must come within the pool's TIMEOUT (or libpq's
# connect_timeout, which the backend derives from it) plus this much.
SLACK = 2.0
# From the server accepting connections again to the first request served.
RECOVERY_TARGET = 1.0


def connect(cluster: Any) -> Any:
    conn = psycopg2.connect(cluster.dsn("postgres"), connect_timeout=5)
    conn.autocommit = True
    return conn


def server_pids(cluster: Any, app_name: str) -> set[int]:
    """The backends of ``app_name`` on ``cluster`` (a fresh observer connection each time:
    the server may have restarted since the last look)."""
    conn = connect(cluster)
    try:
        with conn.cursor() as cursor:
            cursor.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s", [app_name]
            )
            return {row[0] for row in cursor.fetchall()}
    finally:
        conn.close()


def request(make_wrapper: MakeWrapper, url: str, **options: Any) -> tuple[float, int]:
    """One "request" as Django runs it: borrow, query, close.  Returns (duration, backend pid)."""
    started = time.monotonic()
    wrapper = make_wrapper(url=url, **options)
    try:
        pid = backend_pid(wrapper)
    finally:
        wrapper.close()
    return time.monotonic() - started, pid


def in_threads(count: int, target: Callable[[int], None]) -> None:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive(), "a borrower hung"


def timed_requests(
    count: int, make_wrapper: MakeWrapper, url: str, **options: Any
) -> list[tuple[float, BaseException | None]]:
    """``count`` concurrent requests; each one's duration and its OperationalError (or None)."""
    outcomes: list[tuple[float, BaseException | None]] = []

    def client(_: int) -> None:
        started = time.monotonic()
        try:
            request(make_wrapper, url, **options)
        except OperationalError as error:
            outcomes.append((time.monotonic() - started, error))
        else:
            outcomes.append((time.monotonic() - started, None))

    in_threads(count, client)
    return outcomes


def warm_up(make_wrapper: MakeWrapper, url: str, count: int, **options: Any) -> set[int]:
    """Open ``count`` pooled connections at once and return them idle; their backend pids."""
    wrappers = [make_wrapper(url=url, **options) for _ in range(count)]
    pids = {backend_pid(wrapper) for wrapper in wrappers}
    for wrapper in wrappers:
        wrapper.close()
    assert len(pids) == count
    return pids


# ------------------------------------------------------------------- (a) restart while idle


def test_a_restart_while_connections_idle_costs_no_request(
    make_cluster: MakeCluster, make_wrapper: MakeWrapper, alias: str, app_name: str
) -> None:
    cluster = make_cluster()
    url = cluster.dsn("postgres")
    options = {"MAX_CONNS": 3, "TIMEOUT": 5}
    old = warm_up(make_wrapper, url, 3, **options)

    cluster.restart("fast")
    back = time.monotonic()  # pg_ctl start -w has returned: the server accepts connections
    _, first = request(make_wrapper, url, **options)
    recovery = time.monotonic() - back

    assert first not in old
    assert recovery < RECOVERY_TARGET, f"first request served {recovery:.3f} s after the restart"
    stats = herokupool.stats()[alias]
    # The top idle connection was found dead on borrow (its socket readable: the server's
    # FATAL 57P01 and EOF) and replaced in the same borrow; the two below it were swept by
    # the same zero-timeout poll, unused, so no later borrow can be handed one.
    assert stats["connections_lost"] == 3
    assert stats["connections_discarded"] == 0
    assert stats["idle"] == 1
    assert stats["in_use"] == 0
    assert server_pids(cluster, app_name) == {first}
    print(f"\nrestart: first request {recovery * 1000:.0f} ms after the server was back")


def test_a_burst_of_requests_right_after_a_restart_all_succeed_on_new_backends(
    make_cluster: MakeCluster, make_wrapper: MakeWrapper, alias: str, app_name: str
) -> None:
    cluster = make_cluster()
    url = cluster.dsn("postgres")
    options = {"MAX_CONNS": 3, "TIMEOUT": 5}
    old = warm_up(make_wrapper, url, 3, **options)

    cluster.restart("fast")
    errors: list[BaseException] = []
    seen: list[int] = []

    def client(_: int) -> None:
        for _ in range(5):
            try:
                seen.append(request(make_wrapper, url, **options)[1])
            except BaseException as error:
                errors.append(error)

    in_threads(8, client)  # more threads than MAX_CONNS: some wait, FIFO

    assert errors == []
    assert len(seen) == 40
    assert not set(seen) & old, "a connection from before the restart was handed out"
    stats = herokupool.stats()[alias]
    # Racing borrowers may each find one dead before the first retires the rest: every old
    # connection is dropped exactly once, by one path or the other.
    assert stats["connections_lost"] >= 1
    assert stats["connections_lost"] + stats["connections_discarded"] == 3
    assert stats["connections_created"] <= 3 + 3
    assert stats["in_use"] == 0
    assert server_pids(cluster, app_name) <= set(seen)


# ------------------------------------------------------------------- (b) the server is down


UNREACHABLE = re.compile(r"connection refused|could not connect|timeout expired", re.I)


@pytest.mark.slow
def test_b_while_the_server_is_down_borrowers_fail_fast_then_recover(
    make_cluster: MakeCluster, make_wrapper: MakeWrapper, alias: str
) -> None:
    cluster = make_cluster()
    url = cluster.dsn("postgres")
    timeout = 2.0
    options = {"MAX_CONNS": 2, "TIMEOUT": timeout}
    warm_up(make_wrapper, url, 2, **options)

    cluster.stop("fast")
    outage_ends = time.monotonic() + 2.0
    failures: list[tuple[float, BaseException]] = []
    unexpected: list[str] = []

    def client(_: int) -> None:
        # More clients than MAX_CONNS: waiters are woken by each failed connect, never left
        # to sit out TIMEOUT.
        while time.monotonic() < outage_ends:
            started = time.monotonic()
            try:
                request(make_wrapper, url, **options)
            except OperationalError as error:
                failures.append((time.monotonic() - started, error))
            else:
                unexpected.append("a request succeeded while the server was down")
            time.sleep(0.05)

    in_threads(5, client)
    assert unexpected == []
    assert len(failures) >= 20
    slowest = max(duration for duration, _ in failures)
    assert slowest < timeout + SLACK
    for _, error in failures:
        assert not isinstance(error.__cause__, PoolTimeout), str(error)
        assert "timed out after" not in str(error)
        assert UNREACHABLE.search(str(error)), str(error)

    cluster.start()
    back = time.monotonic()
    request(make_wrapper, url, **options)
    recovery = time.monotonic() - back
    assert recovery < RECOVERY_TARGET
    errors: list[BaseException] = []

    def after(_: int) -> None:
        for _ in range(5):
            try:
                request(make_wrapper, url, **options)
            except BaseException as error:
                errors.append(error)

    in_threads(4, after)
    assert errors == []
    stats = herokupool.stats()[alias]  # the same pool, never recreated
    assert stats["connections_failed"] == len(failures)
    assert stats["connections_lost"] + stats["connections_discarded"] == 2
    assert stats["in_use"] == 0
    print(
        f"\noutage: {len(failures)} requests failed, slowest in {slowest * 1000:.0f} ms; "
        f"first request {recovery * 1000:.0f} ms after the server was back"
    )


@pytest.mark.slow
def test_b_a_frozen_server_cannot_hang_a_borrower_past_connect_timeout(
    make_cluster: MakeCluster, make_wrapper: MakeWrapper, alias: str
) -> None:
    """A postmaster that accepts TCP but never answers (SIGSTOP): libpq's connect_timeout,
    which the backend sets from TIMEOUT, bounds every borrower."""
    cluster = make_cluster()
    url = cluster.dsn("postgres")
    timeout = 1.0  # connect_timeout becomes libpq's minimum, 2 s
    options = {"MAX_CONNS": 2, "TIMEOUT": timeout}
    os.kill(postmaster_pid(cluster), signal.SIGSTOP)
    try:
        outcomes = timed_requests(4, make_wrapper, url, **options)
    finally:
        os.kill(postmaster_pid(cluster), signal.SIGCONT)

    assert len(outcomes) == 4
    assert all(error is not None for _, error in outcomes)
    slowest = max(duration for duration, _ in outcomes)
    assert slowest < 2.0 + SLACK
    messages = [str(error) for _, error in outcomes]
    # The two that connected waited for libpq; the two queued behind them hit the pool's TIMEOUT.
    assert sum("timeout expired" in message for message in messages) == 2
    timed_out = [message for message in messages if "timed out after" in message]
    assert len(timed_out) == 2
    for message in timed_out:  # not "exhausted": the slots were held by connection attempts
        assert re.search(r"\(0 in use, .*\); 2 still connecting to the server$", message), message
    request(make_wrapper, url, **options)  # thawed: served again by the same pool
    assert herokupool.stats()[alias]["connections_failed"] == 2


# ---------------------------------------------------------------- (c) the server is full


def test_c_a_full_server_gives_a_clear_error_quickly_and_the_pool_recovers(
    make_cluster: MakeCluster, make_wrapper: MakeWrapper, alias: str
) -> None:
    cluster = make_cluster(max_connections="4", superuser_reserved_connections="0")
    url = cluster.dsn("postgres")
    timeout = 2.0
    options = {"MAX_CONNS": 2, "TIMEOUT": timeout}
    holder = make_wrapper(url=url, **options)
    held_pid = backend_pid(holder)  # the pool's one connection, in use

    fillers: list[Any] = []
    try:
        for _ in range(3):  # take every remaining slot, as another client would
            fillers.append(connect(cluster))
        with pytest.raises(psycopg2.OperationalError, match="too many clients"):
            fillers.append(connect(cluster))

        outcomes = timed_requests(3, make_wrapper, url, **options)
        assert len(outcomes) == 3
        for duration, error in outcomes:
            assert error is not None
            assert "too many clients" in str(error), str(error)
            assert not isinstance(error.__cause__, PoolTimeout)
            assert duration < timeout + SLACK
        slowest = max(duration for duration, _ in outcomes)

        # The pool's own connection still serves while the server is full.
        holder.close()
        assert request(make_wrapper, url, **options)[1] == held_pid
    finally:
        # Keep one to watch the others' backends exit: a slot is free only once they have.
        observer = fillers.pop(0)
        for conn in fillers:
            conn.close()
    try:
        deadline = time.monotonic() + 5
        while _client_backends(observer) > 2:  # the pool's idle connection and the observer
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        observer.close()

    pids: list[int] = []

    def after(_: int) -> None:
        pids.append(request(make_wrapper, url, **options)[1])

    in_threads(4, after)
    assert len(pids) == 4
    stats = herokupool.stats()[alias]
    assert stats["connections_failed"] == 3
    assert stats["in_use"] == 0
    assert stats["idle"] <= 2
    print(f"\nfull server: 3 borrowers refused, slowest in {slowest * 1000:.0f} ms")


def _client_backends(conn: Any) -> int:
    with conn.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
        )
        return int(cursor.fetchone()[0])


# --------------------------------------------------------- (d) a request in flight at restart


def test_d_the_request_in_flight_at_a_restart_fails_and_its_connection_is_dropped(
    make_cluster: MakeCluster, make_wrapper: MakeWrapper, alias: str, app_name: str
) -> None:
    cluster = make_cluster()
    url = cluster.dsn("postgres")
    options = {"MAX_CONNS": 3, "TIMEOUT": 5}
    old = warm_up(make_wrapper, url, 2, **options)
    failed: list[BaseException] = []
    borrowed: list[int] = []
    running = threading.Event()

    def slow_request() -> None:
        busy = make_wrapper(url=url, **options)  # Django's wrappers belong to one thread
        try:
            borrowed.append(backend_pid(busy))
            running.set()
            with busy.cursor() as cursor:
                cursor.execute("SELECT pg_sleep(30)")
        except BaseException as error:
            failed.append(error)
        finally:
            busy.close()  # what Django's request_finished does, error or not

    thread = threading.Thread(target=slow_request)
    thread.start()
    assert running.wait(5)
    busy_pid = borrowed[0]
    assert busy_pid in old
    deadline = time.monotonic() + 5
    while not _running_sleep(cluster, busy_pid):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    cluster.restart("fast")
    thread.join(10)
    assert not thread.is_alive()

    assert len(failed) == 1
    assert isinstance(failed[0], OperationalError)
    assert re.search(r"terminating connection|server closed the connection", str(failed[0]))
    stats = herokupool.stats()[alias]
    # The broken connection was dropped on release. The idle one from before, dead too, is
    # swept by its readable socket then, or, when the server's FIN reaches it a moment
    # after, found dead by the next borrow: never handed out either way.
    assert stats["connections_lost"] >= 1
    assert stats["connections_discarded"] == 0
    assert stats["in_use"] == 0
    _, pid = request(make_wrapper, url, **options)
    assert pid not in old
    assert server_pids(cluster, app_name) == {pid}
    stats = herokupool.stats()[alias]
    assert (stats["connections_lost"], stats["idle"]) == (2, 1)


def _running_sleep(cluster: Any, pid: int) -> bool:
    conn = connect(cluster)
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT state, query FROM pg_stat_activity WHERE pid = %s", [pid])
            row = cursor.fetchone()
    finally:
        conn.close()
    return row is not None and row[0] == "active" and "pg_sleep" in row[1]
