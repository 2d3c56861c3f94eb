"""Issue 15, item 2: no session state a request leaves behind reaches the next request.

Request 1 (thread A) changes its session and ends normally; request 2 (thread B) must
observe what a new connection observes.  "What a new connection observes" is measured,
not assumed: request 0 looks before anything was changed.  On the stock engine each
request is a new session; on herokupool (``MAX_CONNS=1``) all three are provably the same
physical session (same ``pg_backend_pid()``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.extensions
import pytest
from django.db import DatabaseError

from tests.helpers import wait_until
from tests.integration.isolation.conftest import (
    DRIVER,
    in_thread,
    is_pooled,
    one,
    pid_of,
    request,
)

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Leak:
    """Request 1 runs ``change`` (the last statement raising, if ``fails``); request 2 runs
    ``look``, whose row must equal a new session's.  ``{role}`` stands for a role the test
    creates, ``{key}`` for an advisory lock key of its own (another run on the same server
    must not make this one wait)."""

    change: tuple[str, ...]
    look: str
    fails: bool = False


LEAKS = {
    "set_statement_timeout": Leak(("SET statement_timeout = '5s'",), "SHOW statement_timeout"),
    "set_lock_timeout": Leak(("SET lock_timeout = '3s'",), "SHOW lock_timeout"),
    # RESET ALL cannot remove a placeholder variable once defined, only empty it: an empty
    # value counts as unset, the value itself must not reach the next request.
    "set_config_session": Leak(
        ("SELECT set_config('hp.tenant', 'acme', false)",),
        "SELECT coalesce(current_setting('hp.tenant', true), '')",
    ),
    "set_search_path": Leak(("SET search_path = pg_catalog",), "SHOW search_path"),
    "set_role": Leak(("SET ROLE {role}",), "SELECT current_user::text"),
    "set_session_authorization": Leak(
        ("SET SESSION AUTHORIZATION {role}",), "SELECT session_user || '/' || current_user"
    ),
    "listen": Leak(("LISTEN hp_channel",), "SELECT count(*) FROM pg_listening_channels()"),
    "temp_table": Leak(
        ("CREATE TEMP TABLE hp_temp (x int)",),
        "SELECT (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()),"
        " to_regclass('hp_temp')::text",
    ),
    "prepare": Leak(
        ("PREPARE hp_prepared AS SELECT 1",), "SELECT count(*) FROM pg_prepared_statements"
    ),
    "advisory_lock": Leak(
        ("SELECT pg_advisory_lock({key})",),
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
    ),
    "cursor_with_hold": Leak(
        ("DECLARE hp_held CURSOR WITH HOLD FOR SELECT 1",), "SELECT count(*) FROM pg_cursors"
    ),
    # django-pg-zero-downtime-migrations' schema editor: timeouts set around a DDL and
    # restored without try/finally, so a failing DDL leaves them set.
    "zero_downtime_migrations_failed_ddl": Leak(
        (
            "SET lock_timeout = '2s'",
            "SET statement_timeout = '5s'",
            "ALTER TABLE hp_no_such_table ADD COLUMN x int",
        ),
        "SELECT current_setting('lock_timeout') || '/' || current_setting('statement_timeout')",
        fails=True,
    ),
}


def through_django(wrapper: Any, sql: str) -> None:
    with wrapper.cursor() as cursor:
        cursor.execute(sql)


def through_raw_connection(wrapper: Any, sql: str) -> None:
    wrapper.ensure_connection()
    with wrapper.connection.cursor() as cursor:  # the driver's own cursor, no Django wrapper
        cursor.execute(sql)


VIAS: dict[str, Callable[[Any, str], None]] = {
    "django_cursor": through_django,
    "raw_cursor": through_raw_connection,
}


@pytest.mark.parametrize("via", list(VIAS))
@pytest.mark.parametrize("leak", list(LEAKS))
def test_a_request_leaves_no_session_state_to_the_next_request(
    register: Callable[..., str], engine: str, role: str, leak: str, via: str
) -> None:
    """Item 2: what request 1 did to its session (``SET``, ``set_config(..., false)``,
    ``SET ROLE``, ``SET SESSION AUTHORIZATION``, ``LISTEN``, a temp table, ``PREPARE``, an
    advisory lock, a ``WITH HOLD`` cursor, zero-downtime-migrations' timeouts left by a
    failed DDL), through Django's cursor or the raw psycopg2 connection, is not seen by
    request 2 in another thread on the same physical session: it sees a new session."""
    case = LEAKS[leak]
    alias = register()

    def look(wrapper: Any) -> tuple[Any, int]:
        return tuple(one(wrapper, case.look)), pid_of(wrapper)

    fresh, pid0 = in_thread(lambda: request(alias, look))

    def change(wrapper: Any) -> int:
        pid = pid_of(wrapper)
        key = uuid.uuid4().int & 0x7FFFFFFF
        *ok, last = (sql.format(role=role, key=key) for sql in case.change)
        for sql in ok:
            VIAS[via](wrapper, sql)
        if case.fails:
            with pytest.raises((DatabaseError, DRIVER.Error)):
                VIAS[via](wrapper, last)
        else:
            VIAS[via](wrapper, last)
        return pid

    pid1 = in_thread(lambda: request(alias, change))
    seen, pid2 = in_thread(lambda: request(alias, look))
    if is_pooled(engine):
        assert pid0 == pid1 == pid2, "MAX_CONNS=1: one physical session for all three requests"
    assert seen == fresh, (
        f"after {case.change!r}, the next request saw {seen}, a new session {fresh}"
    )


def advisory_lock_holders(admin: Any, key: int) -> list[int]:
    with admin.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objid = %s AND granted",
            [key],
        )
        return [row[0] for row in cursor.fetchall()]


def test_a_session_advisory_lock_is_free_once_its_request_ended(
    register: Callable[..., str], engine: str, admin: Any
) -> None:
    """Item 2: a session advisory lock taken and never released by a request is not held
    by an idle pooled session between requests (another session can take it), nor by the
    next borrower of that session without knowing."""
    key = uuid.uuid4().int & 0x7FFFFFFF
    alias = register()

    def take(wrapper: Any) -> int:
        one(wrapper, "SELECT pg_advisory_lock(%s)", [key])
        return pid_of(wrapper)

    pid1 = in_thread(lambda: request(alias, take))
    # The stock engine's session ends with the request; its backend may take a moment to exit.
    assert wait_until(lambda: not advisory_lock_holders(admin, key), 10), (
        f"between requests the lock is held by {advisory_lock_holders(admin, key)} "
        f"(request 1 ran on {pid1})"
    )
    with admin.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s)", [key])
        assert cursor.fetchone()[0] is True, "another session can take the lock"
        cursor.execute("SELECT pg_advisory_unlock(%s)", [key])

    def held(wrapper: Any) -> tuple[int, int]:
        count = one(
            wrapper,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
        )[0]
        return pid_of(wrapper), count

    pid2, count = in_thread(lambda: request(alias, held))
    if is_pooled(engine):
        assert pid2 == pid1, "MAX_CONNS=1: the same physical session"
    assert count == 0


@pytest.mark.psycopg2_only
def test_a_typecaster_registered_on_the_raw_connection_ends_with_its_request(
    register: Callable[..., str], engine: str
) -> None:
    """Item 2 (client-side state): a typecaster registered with
    ``psycopg2.extensions.register_type(caster, connection.connection)`` in request 1 is not
    applied in request 2 (a new connection has no such caster)."""
    alias = register()
    caster = psycopg2.extensions.new_type(
        (23,), "HP_INT4_AS_TEXT", lambda value, cursor: None if value is None else f"cast:{value}"
    )

    def customise(wrapper: Any) -> int:
        pid = pid_of(wrapper)  # before the caster: pg_backend_pid() is an int4 too
        psycopg2.extensions.register_type(caster, wrapper.connection)
        assert one(wrapper, "SELECT 7::int4")[0] == "cast:7"
        return pid

    def plain(wrapper: Any) -> tuple[Any, Any]:
        return one(wrapper, "SELECT 7::int4")[0], one(wrapper, "SELECT pg_backend_pid()")[0]

    pid1 = in_thread(lambda: request(alias, customise))
    value, pid2 = in_thread(lambda: request(alias, plain))
    if is_pooled(engine):
        assert pid2 in (pid1, f"cast:{pid1}"), "MAX_CONNS=1: the same physical session"
    assert value == 7


@pytest.mark.psycopg2_only
def test_notices_of_a_request_are_not_seen_by_the_next(
    register: Callable[..., str], engine: str
) -> None:
    """Item 2 (client-side state): the server's notices collected on the raw connection
    (``connection.connection.notices``) during request 1 are not in request 2's list (a new
    connection's is empty of them)."""
    alias = register()

    def notify(wrapper: Any) -> int:
        one(wrapper, "DO $$ BEGIN RAISE NOTICE 'hp-secret-of-request-1'; END $$")
        assert any("hp-secret-of-request-1" in n for n in wrapper.connection.notices)
        return pid_of(wrapper)

    def notices(wrapper: Any) -> tuple[list[str], int]:
        wrapper.ensure_connection()
        return list(wrapper.connection.notices), pid_of(wrapper)

    pid1 = in_thread(lambda: request(alias, notify))
    seen, pid2 = in_thread(lambda: request(alias, notices))
    if is_pooled(engine):
        assert pid2 == pid1, "MAX_CONNS=1: the same physical session"
    assert not [n for n in seen if "hp-secret-of-request-1" in n]
