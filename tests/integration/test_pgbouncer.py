"""herokupool behind PgBouncer in transaction mode (issue 6, "Behind PgBouncer").

The topology: each process's pool -> one PgBouncer (devtools.pgbouncer, transaction mode,
``default_pool_size`` POOL_SIZE) -> the test server.  Settings come from ``herokupool.config()``
reading ``DATABASE_CONNECTION_POOL_URL``, the variable Heroku's connection pooling sets, so
PgBouncer handling (``DISABLE_SERVER_SIDE_CURSORS``) is switched on the way users get it.

The module owns a database of its own on the test server, so that the server connections
PgBouncer opens can be counted in pg_stat_activity by ``datname``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dj_database_url
import psycopg2
import pytest
from django.db import connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.postgresql.psycopg_any import IsolationLevel

import herokupool
from devtools.pgbouncer import PgBouncer, find_pgbouncer
from herokupool import registry
from tests.conftest import Server, require
from tests.drivers import libpq_connection
from tests.integration.conftest import IDLE, transaction_status
from tests.testapp.models import Item

pytestmark = [pytest.mark.integration, pytest.mark.pgbouncer]

POOL_SIZE = 3  # PgBouncer's default_pool_size: server connections per (database, user)
POOL_URL_ENV = "DATABASE_CONNECTION_POOL_URL"
ROOT = Path(__file__).resolve().parents[2]

MakeWrapper = Callable[..., BaseDatabaseWrapper]


@pytest.fixture(scope="module")
def pgbouncer_available() -> None:
    require(find_pgbouncer() is not None, "pgbouncer")


@pytest.fixture(scope="module")
def bouncer_db(
    pgbouncer_available: None, pg_server: Server, django_db_blocker: Any
) -> Iterator[str]:
    """A database for this module with the testapp_item table, dropped at the end."""
    from django.db.backends.postgresql.base import DatabaseWrapper

    name = f"hp_bouncer_{uuid.uuid4().hex[:8]}"
    url = pg_server.create_database(name)
    with django_db_blocker.unblock():
        settings = connections.configure_settings({"default": dj_database_url.parse(url)})
        alias = f"setup_{name}"
        wrapper = connections[alias] = DatabaseWrapper(settings["default"], alias=alias)
        try:
            with wrapper.schema_editor() as editor:
                editor.create_model(Item)
        finally:
            wrapper.close()
            del connections[alias]
    yield name
    conn = pg_server.connect()
    try:
        with conn.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        conn.close()


def start_bouncer(pg_server: Server) -> PgBouncer:
    parts = urlsplit(pg_server.url)
    bouncer = PgBouncer(
        parts.hostname or "127.0.0.1",
        parts.port or 5432,
        pool_mode="transaction",
        default_pool_size=POOL_SIZE,
        max_client_conn=100,
        users=(parts.username or "postgres",),
        password=parts.password,
    )
    bouncer.start()
    return bouncer


@pytest.fixture(scope="module")
def bouncer(pgbouncer_available: None, pg_server: Server) -> Iterator[PgBouncer]:
    bouncer = start_bouncer(pg_server)
    yield bouncer
    bouncer.stop()


@pytest.fixture
def bouncer_settings(
    bouncer: PgBouncer, bouncer_db: str, alias: str, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., dict[str, Any]]:
    """``bouncer_settings(**pool_options)`` -> this test's alias settings, via config().

    The variable is set here, before any thread starts: setenv racing libpq's getenv in
    another thread could crash the process.  ``via=`` (main thread only) points it elsewhere.
    """
    monkeypatch.setenv(POOL_URL_ENV, bouncer.dsn(bouncer_db))

    def settings(*, via: PgBouncer | None = None, **pool_options: Any) -> dict[str, Any]:
        if via is not None:
            monkeypatch.setenv(POOL_URL_ENV, via.dsn(bouncer_db))
        databases = herokupool.config(POOL_URL_ENV, **pool_options)
        return connections.configure_settings(databases)["default"]  # Django's defaults added

    return settings


@pytest.fixture
def make_wrapper(
    bouncer_settings: Callable[..., dict[str, Any]], alias: str
) -> Iterator[MakeWrapper]:
    """``make_wrapper(**pool_options)`` -> a wrapper through PgBouncer, also installed as
    ``connections[alias]`` in the calling thread so that the ORM can use it."""
    from herokupool.db.backends.postgresql.base import DatabaseWrapper

    made: list[BaseDatabaseWrapper] = []

    def make(**pool_options: Any) -> BaseDatabaseWrapper:
        wrapper = DatabaseWrapper(bouncer_settings(**pool_options), alias=alias)
        connections[alias] = wrapper  # per thread, like Django's own handler
        made.append(wrapper)
        return wrapper

    yield make
    for wrapper in made:
        with contextlib.suppress(Exception):  # another thread's wrapper refuses; its pool closes
            wrapper.close()
    registry.close(alias)
    with contextlib.suppress(AttributeError):
        del connections[alias]


def server_backends(admin: Any, dbname: str, state: str | None = None) -> int:
    """PgBouncer's server connections as the server sees them (only it uses ``dbname``):
    client backends, not an autovacuum worker the server starts on that database."""
    with admin.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
            "AND backend_type = 'client backend' AND (%s::text IS NULL OR state = %s)",
            [dbname, state, state],
        )
        return int(cursor.fetchone()[0])


def client_connections(bouncer: PgBouncer, dbname: str) -> int:
    return sum(
        int(row["cl_active"]) + int(row["cl_waiting"])
        for row in bouncer.show("POOLS")
        if row["database"] == dbname
    )


class Peak:
    """Samples a count in a thread and keeps the maximum."""

    def __init__(self, sample: Callable[[], int], interval: float) -> None:
        self.value = 0
        self._sample = sample
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.value = max(self.value, self._sample())
            time.sleep(self._interval)

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_threads(count: int, target: Callable[[int], None]) -> list[BaseException]:
    errors: list[BaseException] = []

    def guarded(index: int) -> None:
        try:
            target(index)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive(), "a thread hung"
    return errors


def count_items(wrapper: BaseDatabaseWrapper, prefix: str) -> int:
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM testapp_item WHERE name LIKE %s", [prefix + "%"])
        return int(cursor.fetchone()[0])


# ------------------------------------------------------------------------------ threads


def test_many_threads_share_pgbouncers_few_server_connections(
    make_wrapper: MakeWrapper, bouncer: PgBouncer, bouncer_db: str, admin: Any, alias: str
) -> None:
    max_conns, threads_n, rounds = 6, 16, 8
    tag = f"thr-{uuid.uuid4().hex[:8]}-"

    def work(index: int) -> None:
        wrapper = make_wrapper(max_conns=max_conns, timeout=20)
        items = Item.objects.using(alias)
        for r in range(rounds):
            items.create(name=f"{tag}{index}-{r}-a")  # autocommit: one statement
            with transaction.atomic(using=alias):  # several statements, one server connection
                items.create(name=f"{tag}{index}-{r}-b")
                assert items.filter(name__startswith=f"{tag}{index}-").count() == 2 * r + 2
            with wrapper.cursor() as cursor:
                cursor.execute("SELECT pg_sleep(0.002)")
            wrapper.close()  # the end of a request

    with (
        Peak(lambda: server_backends(admin, bouncer_db), 0.002) as servers,
        Peak(lambda: client_connections(bouncer, bouncer_db), 0.02) as clients,
    ):
        errors = run_threads(threads_n, work)

    assert errors == []
    assert 1 <= servers.value <= POOL_SIZE
    assert clients.value <= max_conns
    stats = herokupool.stats()[alias]
    assert stats["borrows"] == stats["releases"] == threads_n * rounds
    # More client connections than PgBouncer has server connections: it multiplexed them.
    assert POOL_SIZE < stats["connections_created"] <= max_conns
    assert count_items(make_wrapper(), tag) == threads_n * rounds * 2
    print(
        f"\npgbouncer, 16 threads: {stats['connections_created']} client connections, "
        f"peak {servers.value} server connections (pool size {POOL_SIZE})"
    )


# ---------------------------------------------------------------------------- processes


CHILD = textwrap.dedent(
    """
    import json, sys, threading

    import django
    from django.conf import settings

    import herokupool

    settings.configure(
        DATABASES=herokupool.config("DATABASE_CONNECTION_POOL_URL", max_conns=3, timeout=20),
        INSTALLED_APPS=["tests.testapp"],
        USE_TZ=True,
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
    )
    django.setup()

    from django.db import connection, transaction
    from tests.testapp.models import Item

    tag, threads_n, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    errors = []

    def work(index):
        try:
            for r in range(rounds):
                Item.objects.create(name=f"{tag}{index}-{r}-a")
                with transaction.atomic():
                    Item.objects.create(name=f"{tag}{index}-{r}-b")
                mine = Item.objects.filter(name__startswith=f"{tag}{index}-").order_by("id")
                assert sum(1 for _ in mine.iterator(chunk_size=3)) == 2 * r + 2
                connection.close()
        except BaseException as error:
            errors.append(repr(error))
        finally:
            connection.close()

    print("ready", flush=True)
    sys.stdin.readline()  # "go": both processes start together
    threads = [threading.Thread(target=work, args=(i,)) for i in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps({
        "errors": errors,
        "stats": herokupool.stats()["default"],
        "disable_server_side_cursors": settings.DATABASES["default"]["DISABLE_SERVER_SIDE_CURSORS"],
    }))
    """
)


def test_two_processes_share_pgbouncers_server_connections(
    bouncer: PgBouncer, bouncer_db: str, admin: Any, make_wrapper: MakeWrapper
) -> None:
    threads_n, rounds = 8, 6
    tag = f"proc-{uuid.uuid4().hex[:8]}-"
    env = {
        **os.environ,
        POOL_URL_ENV: bouncer.dsn(bouncer_db),
        "PYTHONPATH": str(ROOT),
        "PYTHONDEVMODE": "1",
    }
    children = [
        subprocess.Popen(
            [sys.executable, "-W", "error", "-c", CHILD, f"{tag}{n}-", str(threads_n), str(rounds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        for n in range(2)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            assert child.stderr is not None
            if child.stdout.readline().strip() != "ready":  # it died: show why
                pytest.fail(child.stderr.read())
        with Peak(lambda: server_backends(admin, bouncer_db), 0.002) as servers:
            outputs = [child.communicate("go\n", timeout=60) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.communicate()

    results = []
    for child, (out, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    for result in results:
        assert result["errors"] == []
        assert result["disable_server_side_cursors"] is True
        assert result["stats"]["borrows"] == result["stats"]["releases"]
        assert result["stats"]["connections_created"] <= 3
    assert 1 <= servers.value <= POOL_SIZE
    assert count_items(make_wrapper(), tag) == 2 * threads_n * rounds * 2
    created = sum(result["stats"]["connections_created"] for result in results)
    print(
        f"\npgbouncer, 2 processes x {threads_n} threads: {created} client connections, "
        f"peak {servers.value} server connections (pool size {POOL_SIZE})"
    )


# ------------------------------------------------------------------------- chunked reads


def test_iterator_reads_in_chunks_with_server_side_cursors_disabled(
    make_wrapper: MakeWrapper, alias: str, admin: Any, bouncer_db: str
) -> None:
    wrapper = make_wrapper(max_conns=4)
    assert wrapper.settings_dict["DISABLE_SERVER_SIDE_CURSORS"] is True
    tag = f"it-{uuid.uuid4().hex[:8]}-"
    items = Item.objects.using(alias)
    items.bulk_create(Item(name=f"{tag}{i:04d}") for i in range(1000))
    mine = items.filter(name__startswith=tag).order_by("id")
    expected = list(mine.values_list("name", flat=True))
    assert len(expected) == 1000

    def declared_cursors() -> list[str]:
        # A server-side cursor would leave DECLARE/FETCH "_django_curs_..." as the backend's
        # last query mid-iteration; pg_cursors itself is visible only inside that session.
        with admin.cursor() as cursor:
            cursor.execute(
                "SELECT query FROM pg_stat_activity WHERE datname = %s AND query LIKE %s",
                [bouncer_db, "%_django_curs_%"],
            )
            return [row[0] for row in cursor.fetchall()]

    for atomic in (False, True):  # autocommit (WITH HOLD cursors) and inside a transaction
        with transaction.atomic(using=alias) if atomic else contextlib.nullcontext():
            iterator = mine.iterator(chunk_size=64)
            first = next(iterator)
            assert declared_cursors() == []
            assert [first.name, *(item.name for item in iterator)] == expected
    wrapper.close()

    def read(_: int) -> None:
        mine = Item.objects.using(alias).filter(name__startswith=tag).order_by("id")
        wrapper = make_wrapper(max_conns=4)  # this thread's wrapper, as connections[alias]
        for _ in range(3):
            assert [i.name for i in mine.iterator(chunk_size=50)] == expected
            wrapper.close()

    assert run_threads(8, read) == []


# ------------------------------------------------------------ validation and rollback


def test_an_open_transaction_is_rolled_back_on_release_and_frees_the_server(
    make_wrapper: MakeWrapper, bouncer: PgBouncer, bouncer_db: str, admin: Any, alias: str
) -> None:
    name = f"rb-{uuid.uuid4().hex[:8]}"
    wrapper = make_wrapper(max_conns=1, test_on_borrow=True)
    wrapper.set_autocommit(False)
    with wrapper.cursor() as cursor:
        cursor.execute(
            "INSERT INTO testapp_item (name, data, created) VALUES (%s, '{}', now())", [name]
        )
    session = libpq_connection(wrapper.connection)
    # In transaction mode the open transaction pins one server connection to this client.
    assert server_backends(admin, bouncer_db, "idle in transaction") == 1
    wrapper.close()

    assert server_backends(admin, bouncer_db, "idle in transaction") == 0
    pools = [row for row in bouncer.show("POOLS") if row["database"] == bouncer_db]
    assert sum(int(row["sv_active"]) for row in pools) == 0, "the server went back to PgBouncer"
    reader = make_wrapper(max_conns=1, test_on_borrow=True)
    reader.ensure_connection()
    assert libpq_connection(reader.connection) is session, "the same client connection, kept"
    assert transaction_status(reader.connection) == IDLE
    assert count_items(reader, name) == 0, "the uncommitted row was rolled back"
    stats = herokupool.stats()[alias]
    assert stats["validations"] == 1, "SELECT 1 through PgBouncer on borrowing an idle one"
    assert stats["connections_lost"] == stats["connections_discarded"] == 0


def test_server_connections_killed_behind_pgbouncer_do_not_reach_the_pool(
    make_wrapper: MakeWrapper, bouncer: PgBouncer, bouncer_db: str, admin: Any, alias: str
) -> None:
    wrapper = make_wrapper(max_conns=2, validate_after=0.05)
    wrapper.ensure_connection()
    session = libpq_connection(wrapper.connection)
    wrapper.close()
    with admin.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
            [bouncer_db],
        )
    deadline = time.monotonic() + 5
    while bouncer.server_connections(bouncer_db) or server_backends(admin, bouncer_db):
        assert time.monotonic() < deadline, "pgbouncer kept a dead server connection"
        time.sleep(0.01)
    time.sleep(0.06)  # past validate_after: the next borrow validates through PgBouncer

    again = make_wrapper(max_conns=2, validate_after=0.05)
    assert count_items(again, "no-such-") == 0  # PgBouncer opened a new server connection
    assert libpq_connection(again.connection) is session
    stats = herokupool.stats()[alias]
    assert stats["validations"] == 1
    assert stats["connections_lost"] == 0, "PgBouncer absorbed it: the client side never broke"


def test_a_pgbouncer_restart_costs_no_request(
    pg_server: Server,
    bouncer_settings: Callable[..., dict[str, Any]],
    alias: str,
) -> None:
    from herokupool.db.backends.postgresql.base import DatabaseWrapper

    own = start_bouncer(pg_server)  # restarted here: not the module's
    try:
        settings = bouncer_settings(via=own, max_conns=2)
        first, second = (DatabaseWrapper(settings, alias=alias) for _ in range(2))
        first.ensure_connection()
        second.ensure_connection()
        first.close()
        second.close()

        own.restart()  # immediate shutdown: the pool's client connections are cut
        again = DatabaseWrapper(settings, alias=alias)
        with again.cursor() as cursor:
            cursor.execute("SELECT 1")
            assert cursor.fetchone() == (1,)
        again.close()
        stats = herokupool.stats()[alias]
        assert stats["connections_lost"] == 2, "one found on borrow, the other swept"
        assert stats["connections_discarded"] == 0
    finally:
        registry.close(alias)
        own.stop()


def test_an_isolation_level_option_never_leaks_to_other_pgbouncer_clients(
    pg_server: Server, bouncer_settings: Callable[..., dict[str, Any]], alias: str, bouncer_db: str
) -> None:
    """OPTIONS isolation_level must travel with each BEGIN, as with Django's own backend; a
    session default (SET default_transaction_isolation) would stay on PgBouncer's server
    connection and reach whichever client gets it next."""
    from herokupool.db.backends.postgresql.base import DatabaseWrapper

    parts = urlsplit(pg_server.url)
    # One server connection: every client of this PgBouncer shares it.
    own = PgBouncer(
        parts.hostname or "127.0.0.1",
        parts.port or 5432,
        default_pool_size=1,
        users=(parts.username or "postgres",),
        password=parts.password,
    )
    own.start()
    other = None
    try:
        settings = bouncer_settings(via=own, max_conns=1)
        settings["OPTIONS"]["isolation_level"] = IsolationLevel.SERIALIZABLE
        other = psycopg2.connect(own.dsn(bouncer_db))
        other.autocommit = True

        def others_default() -> str:
            with other.cursor() as cursor:
                cursor.execute("SHOW default_transaction_isolation")
                return str(cursor.fetchone()[0])

        for _ in range(2):  # a new connection, then a pooled one
            wrapper = DatabaseWrapper(settings, alias=alias)
            with wrapper.cursor() as cursor:
                cursor.execute("SELECT 1")  # autocommit
            assert others_default() == "read committed"
            wrapper.set_autocommit(False)
            with wrapper.cursor() as cursor:
                cursor.execute("SHOW transaction_isolation")
                assert cursor.fetchone()[0] == "serializable"
            wrapper.commit()
            wrapper.set_autocommit(True)
            wrapper.close()
            assert others_default() == "read committed"
    finally:
        if other is not None:
            other.close()
        registry.close(alias)
        own.stop()


def test_server_side_binding_without_prepared_statements_works_through_pgbouncer(
    bouncer_settings: Callable[..., dict[str, Any]], alias: str, bouncer_db: str, pg_server: Server
) -> None:
    """Django's advice for PgBouncer in transaction mode on psycopg 3: no server-side
    prepared statements (``prepare_threshold`` None, Django's default), which holds with
    ``server_side_binding`` too.  4 threads x 25 requests of the same ORM queries through
    PgBouncer's 3 server connections, on 2 pooled client connections: every one answers
    (a statement prepared on one server connection and executed by name on another would
    fail).  On psycopg2, which never prepares, the same settings but ``server_side_binding``,
    which only psycopg 3 knows."""
    from django.db import close_old_connections
    from django.db.backends.postgresql.psycopg_any import is_psycopg3

    settings = bouncer_settings(max_conns=2)
    if is_psycopg3:
        settings["OPTIONS"]["server_side_binding"] = True
    assert settings["OPTIONS"].get("prepare_threshold") is None
    connections.settings[alias] = settings
    try:
        name = f"ssb-{uuid.uuid4().hex[:8]}"

        def worker(index: int) -> None:
            for n in range(25):
                try:
                    Item.objects.using(alias).create(name=f"{name}-{index}-{n}")
                    assert Item.objects.using(alias).filter(name__startswith=name).count() >= 1
                finally:
                    close_old_connections()

        assert run_threads(4, worker) == []
        check = pg_server.connect(bouncer_db)
        try:
            with check.cursor() as cursor:
                cursor.execute("SELECT count(*) FROM testapp_item WHERE name LIKE %s", [name + "%"])
                assert cursor.fetchone()[0] == 100
        finally:
            check.close()
    finally:
        registry.close(alias)
        connections.settings.pop(alias, None)
