"""Test databases through Django's test runner and pytest-django (spec item 8), and the
ORM through pooled connections (spec item 10).

The runner tests run ``python -m django test`` on the project in tests/projects/shop/ in
a subprocess, each with its own test database name, and then look at the server: the
test databases are gone and no session lingers on them.  A test database can only be
dropped when no session uses it, so ``close_pool()`` must have closed the pooled ones.

The pytest-django tests use this suite's own test database (tests/settings.py) through
``django.db.connection`` and the model ``tests.testapp.models.Item``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.db import connection, transaction
from django.db.backends.postgresql.psycopg_any import errors as pg_errors
from django.db.utils import InternalError

from tests.conftest import Server
from tests.helpers import wait_until
from tests.integration.conftest import MakeWrapper, backend_pid
from tests.projects import Project, assert_passed, query, running
from tests.testapp.models import Item

pytestmark = pytest.mark.integration

# Django warns when an app queries during start-up; the "early" settings do it on purpose.
EARLY_QUERY_WARNING = "ignore:Accessing the database during app initialization:RuntimeWarning"


@pytest.fixture
def shop(pg_server: Server, dsn: str) -> Iterator[Project]:
    with running(pg_server, dsn, "shop") as project:
        yield project


# ------------------------------------------------------------- Django's test runner


def test_manage_py_test_creates_and_drops_the_test_database(shop: Project) -> None:
    report = shop.run(settings="shopproj.settings")
    assert "Creating test database for alias 'default'" in report
    assert_passed(report)
    shop.assert_clean()


def test_keepdb_twice_reuses_the_test_database(shop: Project) -> None:
    first = shop.run("--keepdb", settings="shopproj.settings")
    assert_passed(first)
    assert shop.databases() == [shop.test_db]
    oid = shop.oid()
    second = shop.run("--keepdb", settings="shopproj.settings")
    assert "Using existing test database for alias 'default'" in second
    assert_passed(second)
    assert shop.oid() == oid, "the same database, not a new one with the same name"
    assert wait_until(lambda: shop.sessions() == []), shop.sessions()
    query(shop.server, f'DROP DATABASE "{shop.test_db}"')  # no FORCE: nothing holds it
    shop.assert_clean()


def test_parallel_clones_and_drops_every_test_database(shop: Project) -> None:
    report = shop.run("--parallel", "2", settings="shopproj.settings")
    assert report.count("Cloning test database for alias 'default'") == 2
    assert_passed(report)
    shop.assert_clean()


@pytest.mark.parametrize("args", [(), ("--parallel", "2")], ids=["serial", "parallel"])
def test_the_real_database_touched_before_the_test_database_exists(
    shop: Project, args: tuple[str, ...]
) -> None:
    # An app queries in AppConfig.ready() and the runner still holds a borrowed connection
    # to the real database when CREATE DATABASE runs; that pool then exists through the
    # clones and DROP DATABASE, and the runner queries the real database again after.
    report = shop.run(*args, settings="shopproj.settings_early", warnings=(EARLY_QUERY_WARNING,))
    assert_passed(report)
    shop.assert_clean()


# ------------------------------------------------------------------------ pytest-django


@contextmanager
def observer(server: Server) -> Iterator[Any]:
    """A cursor on the current test database from a separate, unpooled session."""
    conn = server.connect(connection.settings_dict["NAME"])
    try:
        with conn.cursor() as cursor:
            yield cursor
    finally:
        conn.close()


def names_seen_by(server: Server) -> list[str]:
    with observer(server) as cursor:
        cursor.execute("SELECT name FROM testapp_item ORDER BY name")
        return [row[0] for row in cursor.fetchall()]


def pid() -> int:
    return backend_pid(connection)


@pytest.mark.django_db(transaction=True)
def test_pytest_django_rows_persist_and_close_gives_back_the_same_backend(
    pg_server: Server,
) -> None:
    assert connection.settings_dict["NAME"].startswith("test_")
    Item.objects.create(name="first")
    before = pid()
    connection.close()
    assert connection.connection is None
    assert pid() == before, "the same server session, from the pool"
    Item.objects.create(name="second")
    assert names_seen_by(pg_server) == ["first", "second"]


# --------------------------------------------------------------- 10: the ORM, pooled


def open_cursors(holdable: bool) -> int:
    """Server-side cursors open in this connection's session (pg_cursors is per session)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_cursors WHERE is_holdable = %s", [holdable])
        return int(cursor.fetchone()[0])


@pytest.mark.django_db(transaction=True)
def test_queryset_iterator_streams_through_a_server_side_cursor() -> None:
    Item.objects.bulk_create(Item(name=f"i{n:05}") for n in range(2500))
    rows = Item.objects.order_by("id").values_list("name", flat=True).iterator(chunk_size=100)
    first = next(rows)
    # In autocommit Django declares the cursor WITH HOLD; it lives in our session.
    assert open_cursors(holdable=True) == 1
    assert [first, *rows] == [f"i{n:05}" for n in range(2500)]
    assert open_cursors(holdable=True) == 0, "exhausting the iterator closed it"
    with transaction.atomic():
        rows = Item.objects.values_list("id", flat=True).iterator(chunk_size=100)
        next(rows)
        assert open_cursors(holdable=False) == 1
        rows.close()  # abandoned half-way: closing the generator closes the cursor
        assert open_cursors(holdable=False) == 0
    used = pid()
    connection.close()
    assert pid() == used
    assert open_cursors(holdable=True) == open_cursors(holdable=False) == 0


class Abort(Exception):
    pass


def create_then_abort(name: str, on_commit: Callable[[], None] | None = None) -> None:
    with transaction.atomic():
        Item.objects.create(name=name)
        if on_commit is not None:
            transaction.on_commit(on_commit)
        raise Abort


@pytest.mark.django_db(transaction=True)
def test_atomic_blocks_and_nested_savepoints(pg_server: Server) -> None:
    committed: list[str] = []
    with transaction.atomic():
        outer = pid()
        Item.objects.create(name="outer")
        with transaction.atomic():
            Item.objects.create(name="released savepoint")
        with pytest.raises(Abort):
            create_then_abort("rolled back savepoint")
        transaction.on_commit(lambda: committed.append("outer"))
        assert names_seen_by(pg_server) == [], "nothing is visible before the commit"
        assert pid() == outer
    assert committed == ["outer"]
    with pytest.raises(Abort):
        create_then_abort("rolled back block", lambda: committed.append("never"))
    assert committed == ["outer"]
    assert names_seen_by(pg_server) == ["outer", "released savepoint"]
    assert pid() == outer


@pytest.mark.django_db(transaction=True)
def test_autocommit_toggling_and_a_release_inside_a_transaction(pg_server: Server) -> None:
    transaction.set_autocommit(False)
    Item.objects.create(name="committed")
    transaction.commit()
    Item.objects.create(name="rolled back")
    transaction.rollback()
    transaction.set_autocommit(True)
    assert names_seen_by(pg_server) == ["committed"]

    transaction.set_autocommit(False)
    Item.objects.create(name="left open")
    held = pid()
    connection.close()  # inside the transaction: the pool rolls it back
    with observer(pg_server) as cursor:
        cursor.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", [held])
        assert cursor.fetchone()[0] == "idle", "not 'idle in transaction'"
    assert pid() == held
    assert connection.get_autocommit() is True
    assert connection.connection.info.transaction_status == 0  # IDLE, on either driver
    assert names_seen_by(pg_server) == ["committed"]


@pytest.mark.django_db(transaction=True)
def test_close_inside_an_atomic_block_rolls_back_and_the_next_borrow_is_clean(
    pg_server: Server,
) -> None:
    with transaction.atomic():
        Item.objects.create(name="lost")
        held = pid()
        connection.close()  # e.g. close_old_connections() from a signal, mid-block
    assert names_seen_by(pg_server) == []
    assert pid() == held
    assert connection.get_autocommit() is True
    Item.objects.create(name="after")
    assert names_seen_by(pg_server) == ["after"]


def test_create_and_drop_database_through_a_pooled_connection(
    make_wrapper: MakeWrapper, admin: Any
) -> None:
    name = f"hp_created_{uuid.uuid4().hex[:10]}"

    def exists() -> bool:
        with admin.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name])
            return cursor.fetchone() is not None

    wrapper = make_wrapper(MAX_CONNS=1)
    try:
        wrapper.set_autocommit(False)
        with pytest.raises(InternalError) as info, wrapper.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        assert isinstance(info.value.__cause__, pg_errors.ActiveSqlTransaction)
        used = backend_pid_raw(wrapper)
        wrapper.close()  # a failed transaction: rolled back on release
        with wrapper.cursor() as cursor:  # borrowed again, in autocommit
            cursor.execute(f'CREATE DATABASE "{name}"')
        assert exists()
        assert backend_pid(wrapper) == used
        wrapper.close()
        with wrapper.cursor() as cursor:
            cursor.execute(f'DROP DATABASE "{name}"')
        assert not exists()
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}"')


def backend_pid_raw(wrapper: Any) -> int:
    return int(wrapper.connection.info.backend_pid)
