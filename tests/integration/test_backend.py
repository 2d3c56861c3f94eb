"""The pooled backend against a real PostgreSQL: what the server shows."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from django.db import OperationalError, ProgrammingError
from django.db.backends.postgresql.psycopg_any import IsolationLevel

import herokupool
from herokupool import registry
from herokupool.errors import PoolTimeout
from tests.integration.conftest import (
    IDLE,
    INERROR,
    MakeWrapper,
    backend_pid,
    pids_of,
    raw_backend_pid,
    transaction_status,
)

pytestmark = pytest.mark.integration


def create_table(wrapper: Any, name: str) -> None:
    with wrapper.cursor() as cursor:
        cursor.execute(f"CREATE TABLE IF NOT EXISTS {name} (id serial PRIMARY KEY, v text)")


def drop_table(wrapper: Any, name: str) -> None:
    with wrapper.cursor() as cursor:
        cursor.execute(f"DROP TABLE IF EXISTS {name}")


def count_rows(wrapper: Any, name: str) -> int:
    with wrapper.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {name}")
        return int(cursor.fetchone()[0])


# ------------------------------------------------------------------ 1 and 2: reuse, cap


def test_close_returns_the_connection_and_another_thread_gets_the_same_backend(
    make_wrapper: MakeWrapper, sessions: Callable[[], int]
) -> None:
    wrapper = make_wrapper(MAX_CONNS=2)
    first = backend_pid(wrapper)
    wrapper.close()
    assert sessions() == 1, "closing returned it to the pool: the session stays open"
    seen: list[int] = []

    def other_thread() -> None:
        other = make_wrapper(MAX_CONNS=2)
        seen.append(backend_pid(other))
        other.close()

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert seen == [first]
    assert sessions() == 1


def test_server_connections_never_exceed_max_conns_under_many_threads(
    make_wrapper: MakeWrapper, sessions: Callable[[], int], admin: Any, app_name: str
) -> None:
    max_conns, threads_n, rounds = 3, 16, 15
    peak = 0
    stop = threading.Event()
    errors: list[BaseException] = []

    def watch() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, sessions())
            time.sleep(0.002)

    def work() -> None:
        wrapper = make_wrapper(MAX_CONNS=max_conns, TIMEOUT=30)
        try:
            for _ in range(rounds):
                with wrapper.cursor() as cursor:
                    cursor.execute("SELECT pg_sleep(0.002)")
                wrapper.close()
        except BaseException as error:
            errors.append(error)

    watcher = threading.Thread(target=watch)
    watcher.start()
    workers = [threading.Thread(target=work) for _ in range(threads_n)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    stop.set()
    watcher.join()
    assert errors == []
    assert 1 <= peak <= max_conns
    assert len(pids_of(admin, app_name)) <= max_conns
    stats = herokupool.stats()[make_wrapper().alias]
    assert stats["borrows"] == stats["releases"] == threads_n * rounds
    assert stats["connections_created"] <= max_conns


# -------------------------------------------------------------------- 3: exhaustion


def test_exhaustion_raises_a_django_operational_error_naming_alias_and_numbers(
    make_wrapper: MakeWrapper,
) -> None:
    holders = [make_wrapper(MAX_CONNS=2, TIMEOUT=0.3) for _ in range(2)]
    for holder in holders:
        holder.ensure_connection()
    late = make_wrapper(MAX_CONNS=2, TIMEOUT=0.3)
    started = time.monotonic()
    with pytest.raises(OperationalError) as info:
        late.ensure_connection()
    waited = time.monotonic() - started
    assert 0.25 <= waited < 3
    assert isinstance(info.value.__cause__, PoolTimeout)
    assert re.fullmatch(
        rf"pool '{late.alias}': timed out after 0\.\d s waiting for a connection "
        r"\(2 in use, 0 idle, 0 waiting, max 2\); held longest: 0\.\d s by thread 'MainThread'",
        str(info.value),
    )


def test_unreachable_database_reads_differently_from_exhaustion(
    make_wrapper: MakeWrapper, dsn: str
) -> None:
    from devtools.pgcluster import free_port

    url = re.sub(r"@[^/]+/", f"@127.0.0.1:{free_port()}/", dsn)
    wrapper = make_wrapper(url=url, TIMEOUT=1)
    started = time.monotonic()
    with pytest.raises(OperationalError) as info:
        wrapper.ensure_connection()
    assert time.monotonic() - started < 5
    assert not isinstance(info.value.__cause__, PoolTimeout)
    assert "timed out" not in str(info.value)
    assert re.search(r"connection refused|could not connect", str(info.value), re.I)


# ----------------------------------------------------------- 4: rollback on release


def test_uncommitted_writes_are_rolled_back_on_release(
    make_wrapper: MakeWrapper, alias: str
) -> None:
    wrapper = make_wrapper(MAX_CONNS=1)
    name = f"hp_{alias}"
    create_table(wrapper, name)
    try:
        wrapper.set_autocommit(False)
        with wrapper.cursor() as cursor:
            cursor.execute(f"INSERT INTO {name} (v) VALUES ('never')")
        pid = backend_pid(wrapper)
        wrapper.close()  # inside the open transaction
        reader = make_wrapper(MAX_CONNS=1)
        assert backend_pid(reader) == pid
        assert transaction_status(reader.connection) == IDLE
        assert reader.get_autocommit() is True
        assert count_rows(reader, name) == 0
        reader.close()
    finally:
        drop_table(make_wrapper(MAX_CONNS=1), name)


def test_a_failed_transaction_is_rolled_back_on_release(make_wrapper: MakeWrapper) -> None:
    wrapper = make_wrapper(MAX_CONNS=1)
    wrapper.set_autocommit(False)
    with pytest.raises(ProgrammingError), wrapper.cursor() as cursor:
        cursor.execute("SELECT * FROM no_such_table_anywhere")
    assert transaction_status(wrapper.connection) == INERROR
    pid = raw_backend_pid(wrapper.connection)  # a failed transaction refuses queries
    wrapper.close()
    again = make_wrapper(MAX_CONNS=1)
    assert backend_pid(again) == pid
    assert transaction_status(again.connection) == IDLE


def test_commits_persist_and_a_rolled_back_savepoint_does_not(
    make_wrapper: MakeWrapper, alias: str
) -> None:
    wrapper = make_wrapper(MAX_CONNS=2)
    name = f"hp_{alias}"
    create_table(wrapper, name)
    try:
        wrapper.set_autocommit(False)
        with wrapper.cursor() as cursor:
            cursor.execute(f"INSERT INTO {name} (v) VALUES ('kept')")
        wrapper.commit()
        with wrapper.cursor() as cursor:
            cursor.execute(
                f"SAVEPOINT s1; INSERT INTO {name} (v) VALUES ('gone'); ROLLBACK TO SAVEPOINT s1"
            )
        wrapper.commit()
        wrapper.set_autocommit(True)
        wrapper.close()
        assert count_rows(make_wrapper(MAX_CONNS=2), name) == 1
    finally:
        drop_table(make_wrapper(MAX_CONNS=2), name)


# ---------------------------------------------------------------- 5: dead connections


def test_connections_killed_while_idle_never_reach_the_application(
    make_wrapper: MakeWrapper, admin: Any, app_name: str
) -> None:
    wrappers = [make_wrapper(MAX_CONNS=3) for _ in range(3)]
    old = {backend_pid(w) for w in wrappers}
    for wrapper in wrappers:
        wrapper.close()
    with admin.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            [app_name],
        )
    time.sleep(0.2)  # let the server finish closing the sockets
    fresh = make_wrapper(MAX_CONNS=3)
    new_pid = backend_pid(fresh)  # no error: the dead one was replaced before lending
    assert new_pid not in old
    stats = herokupool.stats()[fresh.alias]
    # The top one was found dead on borrow; the two below it were swept at once by their
    # readable sockets, unused, so no later borrow can be handed one.
    assert stats["connections_lost"] == 3
    assert stats["idle"] == 0
    fresh.close()
    assert pids_of(admin, app_name) == {new_pid}


def test_a_connection_killed_while_in_use_is_discarded_on_release(
    make_wrapper: MakeWrapper, admin: Any
) -> None:
    wrapper = make_wrapper(MAX_CONNS=2)
    pid = backend_pid(wrapper)
    with admin.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
    with pytest.raises(OperationalError), wrapper.cursor() as cursor:
        cursor.execute("SELECT 1")
    wrapper.close()
    stats = herokupool.stats()[wrapper.alias]
    assert stats["connections_lost"] == 1
    assert stats["in_use"] == stats["idle"] == 0
    again = make_wrapper(MAX_CONNS=2)
    assert backend_pid(again) != pid


def test_validation_query_runs_only_after_the_idle_window(make_wrapper: MakeWrapper) -> None:
    wrapper = make_wrapper(MAX_CONNS=1, VALIDATE_AFTER=0.2)
    wrapper.ensure_connection()
    wrapper.close()
    wrapper.ensure_connection()
    wrapper.close()
    assert herokupool.stats()[wrapper.alias]["validations"] == 0
    time.sleep(0.3)
    wrapper.ensure_connection()
    wrapper.close()
    assert herokupool.stats()[wrapper.alias]["validations"] == 1


# ---------------------------------------------------------- 9 and 10: Django's session


def test_session_setup_is_reapplied_on_every_borrow(make_wrapper: MakeWrapper) -> None:
    wrapper = make_wrapper(MAX_CONNS=1, isolation_level=IsolationLevel.SERIALIZABLE)
    wrapper.set_autocommit(False)
    with wrapper.cursor() as cursor:
        cursor.execute("SHOW transaction_isolation")
        assert cursor.fetchone()[0] == "serializable"
        cursor.execute("SET TIME ZONE 'Asia/Tokyo'")
    wrapper.rollback()
    wrapper.close()
    plain = make_wrapper(MAX_CONNS=1, isolation_level=IsolationLevel.SERIALIZABLE)
    with plain.cursor() as cursor:
        cursor.execute("SHOW TIME ZONE")
        assert cursor.fetchone()[0] == "UTC", "Django re-sets the time zone on borrow"
        cursor.execute("SELECT '{\"a\": 1}'::jsonb")
        assert cursor.fetchone()[0] == '{"a": 1}', "jsonb stays undecoded, as Django wants"


def test_server_side_cursors_and_autocommit_only_commands_work(
    make_wrapper: MakeWrapper, alias: str
) -> None:
    wrapper = make_wrapper(MAX_CONNS=1)
    with wrapper.cursor() as cursor:
        cursor.execute("VACUUM")  # refuses to run inside a transaction
    wrapper.set_autocommit(False)
    chunked = wrapper.chunked_cursor()
    chunked.execute("SELECT generate_series(1, 5000)")
    assert sum(1 for _ in chunked) == 5000
    chunked.close()
    wrapper.commit()
    wrapper.set_autocommit(True)
    wrapper.close()


def test_reset_option_runs_discard_all_on_release(make_wrapper: MakeWrapper) -> None:
    wrapper = make_wrapper(MAX_CONNS=1, RESET="DISCARD ALL")
    with wrapper.cursor() as cursor:
        cursor.execute("SET application_name = 'changed'")
        cursor.execute("PREPARE p AS SELECT 1")
    wrapper.close()
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_prepared_statements")
        assert cursor.fetchone()[0] == 0


# ------------------------------------------------------------------ 11 and 14


def test_a_thread_that_dies_after_closing_returns_its_connection(
    make_wrapper: MakeWrapper,
) -> None:
    def request() -> None:
        wrapper = make_wrapper(MAX_CONNS=1, TIMEOUT=2)
        backend_pid(wrapper)
        wrapper.close()  # what request_finished does

    for _ in range(5):
        thread = threading.Thread(target=request)
        thread.start()
        thread.join()
    stats = herokupool.stats()[make_wrapper().alias]
    assert stats["in_use"] == 0
    assert stats["connections_created"] == 1


def test_two_aliases_on_one_url_have_independent_budgets(
    make_wrapper: MakeWrapper, alias: str
) -> None:
    first = make_wrapper(MAX_CONNS=1, TIMEOUT=0.2)
    second = make_wrapper(name=alias + "b", MAX_CONNS=1, TIMEOUT=0.2)
    first.ensure_connection()
    second.ensure_connection()  # the first alias's exhausted budget does not matter
    stats = herokupool.stats()
    assert stats[alias]["in_use"] == 1
    assert stats[alias + "b"]["in_use"] == 1


# ------------------------------------------------------------------------ 8: close_pool


def test_close_pool_closes_idle_sessions_and_later_releases(
    make_wrapper: MakeWrapper, sessions: Callable[[], int]
) -> None:
    held = make_wrapper(MAX_CONNS=2)
    idle = make_wrapper(MAX_CONNS=2)
    held.ensure_connection()
    idle.ensure_connection()
    idle.close()
    assert sessions() == 2
    held.close_pool()
    time.sleep(0.1)
    assert sessions() == 1
    held.close()  # released into a closed pool: closed, not pooled
    time.sleep(0.1)
    assert sessions() == 0
    fresh = make_wrapper(MAX_CONNS=2)
    fresh.ensure_connection()  # a new pool is made on demand
    assert sessions() == 1


@pytest.mark.psycopg3_only
def test_threads_whose_first_connects_race_share_one_pool(
    make_wrapper: MakeWrapper, sessions: Callable[[], int]
) -> None:
    """Django builds psycopg 3's adapters map (``context``) in an lru_cache, which two threads'
    first connects can each fill: two equal maps, two objects. Keyed on the object, the second
    thread got a pool of its own, and a gunicorn worker held MIN_CONNS twice over."""
    from django.db.backends.postgresql.psycopg_any import get_adapters_template

    first = make_wrapper(MIN_CONNS=2, MAX_CONNS=2)
    first.ensure_connection()
    context = first.get_connection_params()["context"]
    get_adapters_template.cache_clear()  # what the racing thread's first call finds
    second = make_wrapper(MIN_CONNS=2, MAX_CONNS=2)
    second.ensure_connection()
    assert second.get_connection_params()["context"] is not context
    first.close()
    second.close()
    assert len(registry._pools[first.alias]) == 1
    time.sleep(0.5)  # a second pool's background thread would have filled to MIN_CONNS by now
    assert sessions() == 2


# ----------------------------------------------------------------- 12 and 13: stats, leaks


def test_stats_and_leak_warning_never_show_the_password(
    make_wrapper: MakeWrapper, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    parts = urlsplit(dsn)
    if parts.password:  # the embedded server's own password: it must not show either
        secret, url = parts.password, dsn
    else:  # a server that trusts us ignores the password given
        secret = "Zq-distinctive-Passw0rd-71"
        host = parts.netloc.rpartition("@")[2]
        url = urlunsplit(parts._replace(netloc=f"{parts.username or ''}:{secret}@{host}"))
    with caplog.at_level(logging.DEBUG, logger="herokupool"):
        wrapper = make_wrapper(url=url, MAX_CONNS=1, TIMEOUT=0.2, LEAK_THRESHOLD=0.05)
        wrapper.ensure_connection()
        other = make_wrapper(url=url, MAX_CONNS=1, TIMEOUT=0.2, LEAK_THRESHOLD=0.05)
        with pytest.raises(OperationalError) as info:
            other.ensure_connection()
        time.sleep(0.1)
        pool = registry._pools[wrapper.alias]
        for p in pool.values():
            p.run_maintenance()
    texts = [
        str(info.value),
        repr(info.value.__cause__),
        repr(herokupool.stats()),
        *(repr(p) for p in pool.values()),
        caplog.text,
    ]
    assert any("borrowed for" in record.getMessage() for record in caplog.records)
    for text in texts:
        assert secret not in text


def test_connect_errors_from_the_driver_carry_no_password(
    make_wrapper: MakeWrapper, dsn: str
) -> None:
    secret = "Zq-distinctive-Passw0rd-72"
    url = urlunsplit(urlsplit(dsn)._replace(netloc=f"postgres:{secret}@127.0.0.1:1"))
    wrapper = make_wrapper(url=url, TIMEOUT=1)
    with pytest.raises(OperationalError) as info:
        wrapper.ensure_connection()
    assert secret not in str(info.value)
    assert secret not in repr(info.value.__cause__)


def test_the_drivers_error_hierarchy_is_kept() -> None:
    """A pool error is the driver's OperationalError, so Django wraps it as its own."""
    from django.db.backends.postgresql.base import Database

    assert issubclass(PoolTimeout, Database.OperationalError)


def test_a_connection_kept_across_requests_is_health_checked_and_discarded(
    make_wrapper: MakeWrapper, admin: Any
) -> None:
    # CONN_MAX_AGE > 0 pins a connection to the thread between requests (herokupool.W001
    # warns), so the pool does not see it on the next request: Django's own
    # CONN_HEALTH_CHECKS must still run, and a dead connection must not be pooled again.
    wrapper = make_wrapper(MAX_CONNS=2)
    wrapper.settings_dict.update(CONN_MAX_AGE=None, CONN_HEALTH_CHECKS=True)
    wrapper.ensure_connection()
    pid = backend_pid(wrapper)
    wrapper.close_if_unusable_or_obsolete()  # request_finished: kept (CONN_MAX_AGE=None)
    assert wrapper.connection is not None
    with admin.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
    time.sleep(0.2)
    wrapper.close_if_unusable_or_obsolete()  # request_started of the next request
    new_pid = backend_pid(wrapper)  # no error reaches the application
    assert new_pid != pid
    stats = herokupool.stats()[wrapper.alias]
    assert stats["connections_discarded"] >= 1
    assert stats["in_use"] == 1
    assert stats["idle"] == 0, "the dead connection was not put back"


def test_an_invalid_isolation_level_is_refused_before_borrowing(
    make_wrapper: MakeWrapper, sessions: Callable[[], int]
) -> None:
    from django.core.exceptions import ImproperlyConfigured

    wrapper = make_wrapper(MAX_CONNS=1, isolation_level=99)
    with pytest.raises(ImproperlyConfigured, match="Invalid transaction isolation level 99"):
        wrapper.ensure_connection()
    assert wrapper.connection is None
    assert sessions() == 0, "no connection was borrowed, so none is left held"


def test_djangos_own_pool_is_never_made(make_wrapper: MakeWrapper) -> None:
    """One pool per alias: the ENGINE's, never Django's psycopg 3 pool beside it."""
    from django.db.backends.postgresql.base import DatabaseWrapper as StockWrapper

    wrapper = make_wrapper(MAX_CONNS=1)
    backend_pid(wrapper)
    assert wrapper.pool is None
    wrapper.close()
    assert wrapper.alias not in StockWrapper._connection_pools
