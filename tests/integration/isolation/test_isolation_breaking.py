"""Trying to break issue 15's isolation: what the first acceptance tests did not try.

Each test runs on the stock engine (the control: a new session per request) and on
herokupool's (``MAX_CONNS`` 1: provably the same physical session, by its backend pid).
Request ends are real (``close_old_connections()``).
"""

from __future__ import annotations

import io
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.extensions
import psycopg2.extras
import pytest
from django.db import InterfaceError
from django.utils.safestring import mark_safe

from tests.integration.isolation.conftest import (
    in_thread,
    is_pooled,
    one,
    pid_of,
    request,
)

pytestmark = pytest.mark.integration

#: What a new session shows for the checks below.
TEMP_OBJECTS = "SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()"
ADVISORY = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"


@pytest.fixture
def role(admin: Any) -> Iterator[str]:
    """A NOLOGIN role of this test's own, granted to nobody."""
    name = f"hp_role_{uuid.uuid4().hex[:10]}"
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE ROLE {name}")
    yield name
    with admin.cursor() as cursor:
        cursor.execute(f"DROP ROLE IF EXISTS {name}")


def raw(wrapper: Any) -> Any:
    """psycopg2's own cursor on the wrapper's connection (no Django wrapper)."""
    wrapper.ensure_connection()
    return wrapper.connection.cursor()


def run(sql: Any) -> Callable[[Any], None]:
    def change(wrapper: Any) -> None:
        with raw(wrapper) as cursor:
            cursor.execute(sql)

    return change


def django_run(sql: Any) -> Callable[[Any], None]:
    def change(wrapper: Any) -> None:
        with wrapper.cursor() as cursor:
            cursor.execute(sql)

    return change


@dataclass(frozen=True)
class Miss:
    """Request 1 runs ``change(wrapper)`` (SQL with ``{role}`` / ``{key}`` formatted in);
    request 2 runs ``look``, whose row must equal a new session's."""

    change: tuple[str, ...] | Callable[[Any], None]
    look: str


def _copy_expert(wrapper: Any) -> None:
    with raw(wrapper) as cursor:
        cursor.copy_expert(
            "COPY (SELECT set_config('search_path', 'pg_catalog', false)) TO STDOUT",
            io.StringIO(),
        )


def _callproc_named(wrapper: Any) -> None:
    # An application's function wrapping set_config (see the set_config_function fixture),
    # called with named arguments (psycopg2 >= 2.8): the tracking cursor's callproc() read
    # parameters[-1] of the dict and raised KeyError.
    with raw(wrapper) as cursor:
        cursor.callproc("hp_set_config", {"name": "search_path", "value": "pg_catalog"})


#: Session changes the classifier of herokupool.session did not recognise (each one
#: checked against a real server to change what it says).
MISSES: dict[str, Miss] = {
    # Role changes written as a generic setting: RESET ALL leaves role and
    # session_authorization alone (GUC_NO_RESET_ALL).
    "set_quoted_role": Miss(('SET "role" TO {role}',), "SELECT current_user::text"),
    "set_config_role": Miss(
        ("SELECT set_config('role', '{role}', false)",), "SELECT current_user::text"
    ),
    "set_session_authorization_as_setting": Miss(
        ("SET session_authorization TO {role}",), "SELECT session_user::text"
    ),
    "set_comment_role": Miss(("SET/**/ROLE {role}",), "SELECT current_user::text"),
    "set_session_comment_authorization": Miss(
        ("SET SESSION/**/AUTHORIZATION {role}",), "SELECT session_user::text"
    ),
    # Function calls the regular expressions do not see.
    "quoted_set_config": Miss(
        ("SELECT \"set_config\"('search_path', 'pg_catalog', false)",), "SHOW search_path"
    ),
    "commented_set_config": Miss(
        ("SELECT set_config/**/('search_path', 'pg_catalog', false)",), "SHOW search_path"
    ),
    "set_config_false_behind_a_comment_with_true": Miss(
        ("SELECT set_config('search_path', 'pg_catalog' /* , true) */, false)",),
        "SHOW search_path",
    ),
    "set_config_false_behind_a_dollar_quote_with_true": Miss(
        ("SELECT set_config('hp.x', $$a, true)$$, false)",),
        "SELECT coalesce(current_setting('hp.x', true), '')",
    ),
    "set_config_false_behind_an_escape_string": Miss(
        ("SELECT set_config('hp.x', E'\\', true) --', false)",),
        "SELECT coalesce(current_setting('hp.x', true), '')",
    ),
    "quoted_advisory_lock": Miss(('SELECT "pg_advisory_lock"({key})',), ADVISORY),
    "commented_advisory_lock": Miss(("SELECT pg_advisory_lock/**/({key})",), ADVISORY),
    # Cursors and temporary objects.
    "with_comment_hold_cursor": Miss(
        ("DECLARE hp_c CURSOR WITH/**/HOLD FOR SELECT 1",), "SELECT count(*) FROM pg_cursors"
    ),
    "temp_recursive_view": Miss(
        ("CREATE TEMP RECURSIVE VIEW hp_v (n) AS VALUES (1)",), TEMP_OBJECTS
    ),
    "temp_comment_table": Miss(("CREATE TEMP/**/TABLE hp_t (x int)",), TEMP_OBJECTS),
    "quoted_pg_temp_table": Miss(('CREATE TABLE "pg_temp".hp_t (x int)',), TEMP_OBJECTS),
    "explain_analyze_create_temp_table": Miss(
        ("EXPLAIN ANALYZE CREATE TEMP TABLE hp_t AS SELECT 1",), TEMP_OBJECTS
    ),
    "select_into_comment_temp": Miss(("SELECT 1 AS x INTO/**/TEMP hp_t",), TEMP_OBJECTS),
    "search_path_pg_temp_then_create_table": Miss(
        ("SET search_path = pg_temp, public", "CREATE TABLE hp_t (x int)"), TEMP_OBJECTS
    ),
    # How the statement reaches the cursor.
    "str_subclass_through_django": Miss(
        django_run(mark_safe("SET statement_timeout = '5s'")), "SHOW statement_timeout"
    ),
    "str_subclass_raw": Miss(
        run(mark_safe("SET statement_timeout = '5s'")), "SHOW statement_timeout"
    ),
    "copy_expert": Miss(_copy_expert, "SHOW search_path"),
    "callproc_named_arguments": Miss(_callproc_named, "SHOW search_path"),
}


@pytest.fixture
def set_config_function(dsn: str) -> None:
    """``hp_set_config(name, value)``: an application's wrapper of ``set_config(..., false)``."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute(
            "CREATE OR REPLACE FUNCTION hp_set_config(name text, value text) RETURNS text"
            " LANGUAGE sql AS $$ SELECT set_config(name, value, false) $$"
        )
    conn.close()


@pytest.mark.usefixtures("set_config_function")
@pytest.mark.parametrize("miss", list(MISSES))
def test_a_statement_the_classifier_missed_leaves_nothing_to_the_next_request(
    register: Callable[..., str], engine: str, role: str, miss: str
) -> None:
    case = MISSES[miss]
    alias = register()

    def look(wrapper: Any) -> tuple[Any, int]:
        return tuple(one(wrapper, case.look)), pid_of(wrapper)

    fresh, pid0 = in_thread(lambda: request(alias, look))

    def change(wrapper: Any) -> int:
        pid = pid_of(wrapper)
        key = uuid.uuid4().int & 0x7FFFFFFF
        if callable(case.change):
            case.change(wrapper)
        else:
            for sql in case.change:
                run(sql.format(role=role, key=key))(wrapper)
        return pid

    pid1 = in_thread(lambda: request(alias, change))
    seen, pid2 = in_thread(lambda: request(alias, look))
    if is_pooled(engine):
        assert pid0 == pid1 == pid2, "MAX_CONNS=1: one physical session for all three requests"
    assert seen == fresh, f"after {miss}, the next request saw {seen}, a new session {fresh}"


# ------------------------------------------------------------ client-side state


def test_a_client_encoding_set_on_the_raw_connection_ends_with_its_request(
    register: Callable[..., str], engine: str
) -> None:
    """``connection.connection.set_client_encoding('LATIN1')`` (psycopg2 sends SET
    client_encoding itself, through no cursor): the next request is UTF8 again, on both
    sides, and can write a character LATIN1 has not."""
    alias = register()

    def change(wrapper: Any) -> int:
        pid = pid_of(wrapper)
        wrapper.connection.set_client_encoding("LATIN1")
        return pid

    def look(wrapper: Any) -> tuple[Any, ...]:
        return (
            one(wrapper, "SHOW client_encoding")[0],
            wrapper.connection.encoding,
            one(wrapper, "SELECT %s::text", ["\u20ac"])[0],
            pid_of(wrapper),
        )

    in_thread(lambda: request(alias, change))
    # herokupool closes that session (RESET ALL would reset the server's side only): no
    # claim on the next request's pid.
    *seen, _ = in_thread(lambda: request(alias, look))
    assert seen == ["UTF8", "UTF8", "\u20ac"]
