"""The pool on a real PostgreSQL through each driver installed (psycopg2, and psycopg 3 when
importable): what each driver does on its own (the facts the adapters rely on), and each
pool-level guarantee through each adapter.  No Django: ``ConnectionPool`` over a plain
``connect()``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from devtools.relay import TcpRelay
from herokupool import drivers
from herokupool._deadline import Deadline
from herokupool.errors import PoolTimeout
from herokupool.pool import ConnectionPool
from tests.drivers import INSTALLED, connect, connector, module, pending_notifications, query
from tests.helpers import wait_until
from tests.integration.conftest import MakeCluster, pids_of, through
from tests.integration.test_fork import IGNORE_FORK_WARNING, fork

SLACK = 1.5  # seconds of scheduling slack on a loaded CI machine

pytestmark = pytest.mark.parametrize("driver_name", INSTALLED)


@pytest.fixture
def table(dsn: str) -> Iterator[str]:
    name = f"hp_{uuid.uuid4().hex[:10]}"
    conn = connect("psycopg2", dsn)
    query(conn, f"CREATE TABLE {name} (who text)")
    try:
        yield name
    finally:
        query(conn, f"DROP TABLE IF EXISTS {name}")
        conn.close()


def rows(dsn: str, table: str) -> list[tuple[Any, ...]]:
    conn = connect("psycopg2", dsn)
    try:
        return query(conn, f"SELECT who FROM {table}")
    finally:
        conn.close()


def state_of(admin: Any, pid: int) -> str | None:
    found = query(admin, "SELECT state FROM pg_stat_activity WHERE pid = %s", [pid])
    return found[0][0] if found else None


def backend(conn: Any) -> int:
    return int(query(conn, "SELECT pg_backend_pid()")[0][0])


def exact(pool: ConnectionPool) -> dict[str, Any]:
    stats = pool.stats()
    assert stats["borrows"] == stats["releases"] + stats["in_use"], stats
    return stats


@pytest.fixture
def pools() -> Iterator[list[ConnectionPool]]:
    made: list[ConnectionPool] = []
    yield made
    for pool in made:
        pool.close()


def make_pool(pools: list[ConnectionPool], driver_name: str, dsn: str, **options: Any) -> Any:
    params = options.pop("params", {})
    pool = ConnectionPool(connector(driver_name, dsn, **params), **options)
    pools.append(pool)
    return pool


# -------------------------------------------------------------- what each driver does itself


def test_what_rollback_does_after_a_raw_begin_in_autocommit(
    driver_name: str, dsn: str, admin: Any, table: str
) -> None:
    """psycopg2's rollback() sends nothing in autocommit (it did not open the transaction);
    psycopg 3's sends ROLLBACK whenever the server has a transaction open."""
    conn = connect(driver_name, dsn)
    try:
        query(conn, "BEGIN")
        query(conn, f"INSERT INTO {table} VALUES ('raw')")
        assert drivers.get(driver_name).transaction_status(conn) == drivers.INTRANS
        conn.rollback()
        status = drivers.get(driver_name).transaction_status(conn)
        if driver_name == "psycopg2":
            assert status == drivers.INTRANS
            assert state_of(admin, backend(conn)) == "idle in transaction"
            query(conn, "ROLLBACK")
        else:
            assert status == drivers.IDLE
            assert state_of(admin, backend(conn)) == "idle"
        assert rows(dsn, table) == []
    finally:
        conn.close()


def test_an_idle_socket_is_read_without_a_round_trip_and_a_closed_one_raises(
    driver_name: str, dsn: str, admin: Any
) -> None:
    driver = drivers.get(driver_name)
    channel = f"hp_{uuid.uuid4().hex[:8]}"
    conn = connect(driver_name, dsn)
    try:
        query(conn, f"LISTEN {channel}")
        notify(dsn, channel, "hello")
        assert wait_until(lambda: _readable(conn), 2)
        driver.read_input(conn)
        assert [_payload(n) for n in pending_notifications(conn)] == ["hello"]
        driver.forget_messages(conn)
        assert pending_notifications(conn) == []
        assert not _readable(conn), "everything that arrived was read"

        query(admin, "SELECT pg_terminate_backend(%s)", [backend(conn)])
        assert wait_until(lambda: _readable(conn), 2)
        with pytest.raises(driver.errors):
            read_until_closed(driver, conn)
        assert driver.closed(conn)
    finally:
        conn.close()


def notify(dsn: str, channel: str, payload: str) -> None:
    """NOTIFY reaches the listeners of the same database only."""
    conn = connect("psycopg2", dsn)
    try:
        query(conn, f"NOTIFY {channel}, '{payload}'")
    finally:
        conn.close()


def read_until_closed(driver: drivers.Driver, conn: Any) -> None:
    for _ in range(20):  # the FATAL may be read before the close arrives
        driver.read_input(conn)
        time.sleep(0.05)


def _readable(conn: Any) -> bool:
    import select

    return bool(select.select([conn], [], [], 0)[0])


def _payload(notify: Any) -> str:
    return str(notify.payload)


def test_a_query_on_a_silent_server_is_ended_by_the_deadline(
    driver_name: str, relay: TcpRelay, dsn: str
) -> None:
    """No FIN, no RST: the driver would wait forever; the deadline's socket shutdown ends it."""
    driver = drivers.get(driver_name)
    conn = connect(driver_name, through(relay, dsn))
    try:
        assert query(conn, "SELECT 1") == [(1,)]
        relay.pause()
        started = time.monotonic()
        with pytest.raises(driver.operational_error), Deadline(driver.fileno(conn), 0.5) as limit:
            query(conn, "SELECT 1")
        took = time.monotonic() - started
        assert limit.expired
        assert 0.4 < took < 0.5 + SLACK, took
        assert driver.closed(conn)
    finally:
        relay.resume()
        conn.close()


# ------------------------------------------------------------- the pool, through each adapter


def test_the_pool_picks_the_adapter_of_its_connections(
    driver_name: str, dsn: str, pools: list[ConnectionPool]
) -> None:
    pool = make_pool(pools, driver_name, dsn, name="pick")
    conn = pool.borrow()
    assert type(conn).__module__.partition(".")[0] == driver_name
    assert pool._driver is drivers.get(driver_name)
    pool.release(conn)


def test_a_raw_begin_is_rolled_back_on_release(
    driver_name: str, dsn: str, admin: Any, table: str, pools: list[ConnectionPool]
) -> None:
    pool = make_pool(pools, driver_name, dsn, name="raw", max_conns=1, timeout=2)
    conn = pool.borrow()
    pid = backend(conn)
    query(conn, "BEGIN")
    query(conn, f"INSERT INTO {table} VALUES ('raw begin')")
    pool.release(conn)
    assert state_of(admin, pid) == "idle"
    again = pool.borrow()
    assert again is conn
    assert backend(again) == pid
    assert drivers.get(driver_name).transaction_status(again) == drivers.IDLE
    pool.release(again)
    assert rows(dsn, table) == []
    assert exact(pool)["connections_discarded"] == 0


def test_a_transaction_the_driver_manages_is_never_committed_by_a_release(
    driver_name: str, dsn: str, admin: Any, table: str, pools: list[ConnectionPool]
) -> None:
    """psycopg2's own transaction (autocommit off) is rolled back and the connection kept.
    psycopg 3's ``transaction()`` block still open at release cannot be ended by anyone but
    its block (psycopg refuses ``rollback()`` inside it), and its exit would later act on the
    connection (a COMMIT): the pool discards it, so the late exit touches nobody's session."""
    pool = make_pool(pools, driver_name, dsn, name="block", max_conns=1, timeout=2)
    conn = pool.borrow()
    pid = backend(conn)
    block: Any = None
    if driver_name == "psycopg2":
        conn.autocommit = False
        query(conn, f"INSERT INTO {table} VALUES ('own transaction')")
    else:
        block = conn.transaction()
        block.__enter__()
        query(conn, f"INSERT INTO {table} VALUES ('transaction block')")
        with pytest.raises(module("psycopg").ProgrammingError, match="rollback"):
            conn.rollback()
    pool.release(conn)
    stats = exact(pool)
    nxt = pool.borrow()
    if driver_name == "psycopg2":
        assert nxt is conn
        assert (stats["connections_discarded"], state_of(admin, pid)) == (0, "idle")
    else:
        assert nxt is not conn
        assert stats["connections_discarded"] == 1
        assert wait_until(lambda: state_of(admin, pid) is None, 2), "the session was closed"
        # The borrower's block ends late: psycopg sees its connection closed and does
        # nothing (no COMMIT reaches anyone's session).
        assert not block.__exit__(None, None, None)
    assert drivers.get(driver_name).transaction_status(nxt) == drivers.IDLE
    assert rows(dsn, table) == []
    pool.release(nxt)


def test_session_characteristics_are_reset_on_release(
    driver_name: str, dsn: str, pools: list[ConnectionPool]
) -> None:
    pool = make_pool(pools, driver_name, dsn, name="session", max_conns=1, timeout=2)
    conn = pool.borrow()
    if driver_name == "psycopg2":
        conn.set_session(isolation_level="SERIALIZABLE", readonly=True, deferrable=True)
    else:
        conn.isolation_level = module("psycopg").IsolationLevel.SERIALIZABLE
        conn.read_only = True
        conn.deferrable = True
    assert drivers.get(driver_name).session_changed(conn)
    pool.release(conn)
    conn = pool.borrow()
    assert not drivers.get(driver_name).session_changed(conn)
    conn.autocommit = False  # the characteristics show in the next transaction
    try:
        assert query(conn, "SHOW transaction_isolation") == [("read committed",)]
        assert query(conn, "SHOW transaction_read_only") == [("off",)]
        assert query(conn, "SHOW transaction_deferrable") == [("off",)]
    finally:
        conn.rollback()
        conn.autocommit = True
    pool.release(conn)


def test_an_idle_connection_the_server_ended_is_replaced_without_an_error(
    driver_name: str, dsn: str, admin: Any, app_name: str, pools: list[ConnectionPool]
) -> None:
    pool = make_pool(
        pools, driver_name, dsn, name="killed", max_conns=2, params={"application_name": app_name}
    )
    first, second = pool.borrow(), pool.borrow()
    pids = {backend(first), backend(second)}
    pool.release(first)
    pool.release(second)
    for pid in pids:
        query(admin, "SELECT pg_terminate_backend(%s)", [pid])
    assert wait_until(lambda: not pids & pids_of(admin, app_name), 2)
    conn = pool.borrow()
    assert backend(conn) not in pids
    pool.release(conn)
    stats = exact(pool)
    assert stats["connections_lost"] == 2, stats
    assert stats["idle"] == 1, stats


def test_validation_never_leaves_a_prepared_statement(
    driver_name: str, dsn: str, pools: list[ConnectionPool]
) -> None:
    """psycopg 3 prepares a query run prepare_threshold (5) times: not the pool's own."""
    pool = make_pool(
        pools, driver_name, dsn, name="prepared", max_conns=1, validate_after=0.0, timeout=2
    )
    for _ in range(12):
        pool.release(pool.borrow())
    conn = pool.borrow()
    assert pool.stats()["validations"] >= 12
    assert query(conn, "SELECT count(*) FROM pg_prepared_statements") == [(0,)]
    pool.release(conn)


def test_notifications_left_unread_are_dropped_on_release(
    driver_name: str, dsn: str, admin: Any, pools: list[ConnectionPool]
) -> None:
    pool = make_pool(pools, driver_name, dsn, name="unread", max_conns=1, timeout=2)
    channel = f"hp_{uuid.uuid4().hex[:8]}"
    conn = pool.borrow()
    query(conn, f"LISTEN {channel}")
    notify(dsn, channel, "one")
    assert wait_until(lambda: _readable(conn), 2)
    query(conn, "SELECT 1")  # reads the notification along with the answer
    assert pending_notifications(conn)
    pool.release(conn)
    assert pool.borrow() is conn
    assert pending_notifications(conn) == []
    query(conn, f"UNLISTEN {channel}")
    pool.release(conn)


def in_thread(target: Any, join: float) -> tuple[float, Any, BaseException | None]:
    outcome: list[Any] = [None, None]

    def run() -> None:
        try:
            outcome[0] = target()
        except BaseException as error:
            outcome[1] = error

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(join)
    assert not thread.is_alive(), f"still blocked after {join} s"
    return time.monotonic() - started, outcome[0], outcome[1]


@pytest.mark.slow
def test_a_borrow_validating_over_a_silent_path_ends_within_timeout(
    driver_name: str, relay: TcpRelay, dsn: str, pools: list[ConnectionPool]
) -> None:
    pool = make_pool(
        pools,
        driver_name,
        through(relay, dsn),
        name="silent",
        max_conns=1,
        timeout=1.0,
        validate_after=0.0,
        params={"connect_timeout": 2},
    )
    pool.release(pool.borrow())
    relay.pause()
    took, _, error = in_thread(pool.borrow, join=15)
    assert took < 1.0 + 2 + SLACK, f"borrow blocked {took:.1f} s (timeout 1 s)"
    assert isinstance(error, drivers.get(driver_name).operational_error), repr(error)
    stats = exact(pool)
    assert stats["in_use"] == 0, stats
    assert stats["connections_lost"] == 1, stats
    relay.resume()
    pool.release(pool.borrow())  # the path is back: served again by the same pool


@pytest.mark.slow
def test_releasing_a_transaction_over_a_silent_path_is_bounded(
    driver_name: str, relay: TcpRelay, dsn: str, table: str, pools: list[ConnectionPool]
) -> None:
    pool = make_pool(pools, driver_name, through(relay, dsn), name="silent", timeout=1.0)
    conn = pool.borrow()
    query(conn, "BEGIN")
    query(conn, f"INSERT INTO {table} VALUES ('never')")
    relay.pause()
    took, _, error = in_thread(lambda: pool.release(conn), join=15)
    assert error is None
    assert took < 1.0 + SLACK, f"release blocked {took:.1f} s (timeout 1 s)"
    assert drivers.get(driver_name).closed(conn)
    stats = exact(pool)
    assert (stats["in_use"], stats["idle"], stats["connections_discarded"]) == (0, 0, 1), stats
    relay.resume()
    assert rows(dsn, table) == []


@pytest.mark.slow
def test_a_restart_while_idle_costs_no_borrow_an_error(
    driver_name: str, make_cluster: MakeCluster, pools: list[ConnectionPool]
) -> None:
    cluster = make_cluster()
    pool = make_pool(pools, driver_name, cluster.dsn("postgres"), name="restart", max_conns=3)
    held = [pool.borrow() for _ in range(3)]
    old = {backend(conn) for conn in held}
    for conn in held:
        pool.release(conn)
    cluster.restart("fast")
    conn = pool.borrow()
    assert backend(conn) not in old
    pool.release(conn)
    stats = exact(pool)
    assert stats["connections_lost"] == 3, stats
    assert stats["idle"] == 1, stats


@IGNORE_FORK_WARNING
def test_a_forked_child_forgets_inherited_connections_without_closing_them(
    driver_name: str, dsn: str, admin: Any, app_name: str, pools: list[ConnectionPool]
) -> None:
    pool = make_pool(
        pools, driver_name, dsn, name="fork", max_conns=2, params={"application_name": app_name}
    )
    conn = pool.borrow()
    parent = backend(conn)
    pool.release(conn)

    def child() -> dict[str, Any]:
        mine = pool.borrow()
        pid = backend(mine)
        pool.release(mine)
        pool.close()
        return {"pid": pid, "stats": pool.stats()}

    report = fork(child).result()
    assert report["pid"] != parent
    assert report["stats"]["connections_created"] == 1
    conn = pool.borrow()
    assert conn is not None
    assert backend(conn) == parent, "the parent's session survived the child"
    pool.release(conn)


# ------------------------------------------------------------------------------ redaction

SECRET = "Pw-s3cret"


#: A role no server has: refused on a server that trusts every login (CI's) as on one that
#: checks passwords, so a connect with the password always fails.
NOBODY = "hp_no_such_role"


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    netloc = f"{NOBODY}:{password}@{parts.hostname}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def conninfo(url: str, password: str) -> str:
    parts = urlsplit(url)
    return (
        f"host={parts.hostname} port={parts.port or 5432} user={parts.username or 'postgres'} "
        f"dbname={parts.path.lstrip('/')} password={password}"
    )


@pytest.mark.parametrize(
    ("how", "password"),
    [
        # Refused by the server: libpq's message names the role, not the password.
        ("url", SECRET),
        # Not valid percent-encoding: libpq quotes the token it could not decode.
        ("url", f"{SECRET}%zz"),
        # A space in an unquoted conninfo value: libpq quotes what follows it.
        ("conninfo", f"x {SECRET}"),
    ],
)
def test_no_password_in_the_pools_errors_or_logs(
    driver_name: str, dsn: str, how: str, password: str, caplog: pytest.LogCaptureFixture
) -> None:
    target = with_password(dsn, password) if how == "url" else conninfo(dsn, password)
    calls: list[int] = []
    connecting, give_up = threading.Event(), threading.Event()

    def connect_badly() -> Any:
        calls.append(1)
        if len(calls) == 2:  # the second attempt hangs, holding the only slot
            connecting.set()
            give_up.wait(10)
        return connect(driver_name, target)

    pool = ConnectionPool(connect_badly, name="secret", max_conns=1, timeout=0.3)
    texts: list[str] = []
    try:
        with caplog.at_level(logging.DEBUG, logger="herokupool"):
            with pytest.raises(drivers.get(driver_name).errors) as refused:
                pool.borrow()
            texts += [str(refused.value), repr(refused.value), repr(refused.value.__cause__)]
            texts += [repr(refused.value.__context__)]
            holder = threading.Thread(target=_quietly(pool.borrow), daemon=True)
            holder.start()
            assert connecting.wait(5)
            # The pool is full of a connection attempt: a borrower times out, and the
            # message (and its cause) name the last attempt's error.
            with pytest.raises(PoolTimeout, match="the last attempt to connect failed") as out:
                pool.borrow()
            texts += [str(out.value), repr(out.value), repr(out.value.__cause__)]
            give_up.set()
            holder.join(5)
    finally:
        give_up.set()
        pool.close()
    texts += [record.getMessage() for record in caplog.records]
    texts += [repr(pool), repr(pool.stats())]
    assert any("could not open a connection" in text for text in texts), texts
    for text in texts:
        assert SECRET not in text, text


def _quietly(call: Any) -> Any:
    def run() -> None:
        with contextlib.suppress(Exception):
            call()

    return run


def test_a_connection_its_borrower_lost_is_closed_and_its_slot_freed_without_a_warning(
    driver_name: str, dsn: str, admin: Any, app_name: str, pools: list[ConnectionPool]
) -> None:
    """CPython frees it the moment the last reference goes, and the driver closes it.
    psycopg 3 would warn (ResourceWarning, an error under -W error) about a connection
    freed open: not about a pooled one, whose loss the pool reports itself."""
    pool = make_pool(
        pools, driver_name, dsn, name="lost", max_conns=1, params={"application_name": app_name}
    )
    conn = pool.borrow()
    pid = backend(conn)
    del conn
    gc.collect()
    assert wait_until(lambda: pid not in pids_of(admin, app_name), 2), "the session ended"
    again = pool.borrow(timeout=2)  # the slot is free again
    assert backend(again) != pid
    pool.release(again)


def test_one_sweep_finds_a_backend_terminated_while_idle(
    driver_name: str, dsn: str, admin: Any, app_name: str, pools: list[ConnectionPool]
) -> None:
    """Its FATAL and its close both wait on the socket; one read takes only the FATAL (libpq
    hands an error that arrives while idle to the notice processor, and raises for the close
    only at the next read): a sweep that read once would keep it until the next one."""
    pool = make_pool(
        pools,
        driver_name,
        dsn,
        name="sweep",
        max_conns=2,
        background=False,
        params={"application_name": app_name},
    )
    first, second = pool.borrow(), pool.borrow()
    victim = backend(first)
    pool.release(first)
    pool.release(second)
    query(admin, "SELECT pg_terminate_backend(%s)", [victim])
    assert wait_until(lambda: victim not in pids_of(admin, app_name), 2)
    time.sleep(0.2)  # the close has reached the client's socket too
    pool.run_maintenance()
    stats = exact(pool)
    assert (stats["connections_lost"], stats["idle"]) == (1, 1), stats
