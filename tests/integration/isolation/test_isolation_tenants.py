"""Issue 15, item 1: a wrapper's state about its session stays true (django-tenants).

django-tenants' backend (``django_tenants.postgresql_backend``, composed over
``ORIGINAL_BACKEND``) remembers on the Django wrapper the ``search_path`` it has set
(``search_path_set_schemas``) and, with ``TENANT_LIMIT_SET_CALLS = True``, sends ``SET
search_path`` again only after ``close()``, ``rollback()`` or ``set_tenant()``.  With the
stock engine and ``CONN_MAX_AGE=0`` every request end closes the wrapper, so that memory
is always about the session the wrapper has.  The real library is used, over the stock
engine (control) and over herokupool's; workers pinned to a tenant end each job with
``close_old_connections()``, as a Celery worker or a thread per tenant does.

Each tenant schema and the public schema have a table of the same name whose one row
names its schema: a job reads it unqualified, so the row says which schema the session's
``search_path`` found.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import pytest
from django.db import close_old_connections, connections
from django.test import override_settings

from tests.helpers import wait_until
from tests.integration.conftest import settings_for
from tests.integration.isolation.conftest import forget, is_pooled

pytestmark = pytest.mark.integration


def tenants_wrapper_class(original: str) -> type:
    """django-tenants' ``DatabaseWrapper`` composed over ``original``.

    The library reads ``settings.ORIGINAL_BACKEND`` once, when its module is imported: the
    module is loaded once per original backend, under a name of its own.
    """
    name = f"_hp_django_tenants_over_{original.replace('.', '_')}"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.find_spec("django_tenants.postgresql_backend.base")
        assert spec is not None
        assert spec.origin is not None
        spec = importlib.util.spec_from_file_location(name, spec.origin)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        with override_settings(ORIGINAL_BACKEND=original):
            spec.loader.exec_module(module)
        sys.modules[name] = module
    wrapper: type = module.DatabaseWrapper
    assert wrapper.__mro__[1].__module__ == f"{original}.base"
    return wrapper


@pytest.fixture
def schemas(dsn: str) -> Iterator[tuple[str, list[str]]]:
    """(table, [tenant schemas]): three tenant schemas and a public table, each holding one
    row that names its schema."""
    tag = uuid.uuid4().hex[:10]
    table = f"hp_tenant_rows_{tag}"
    tenants = [f"hp_tenant_{tag}_{n}" for n in range(3)]
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute(f"CREATE TABLE public.{table} (who text)")
        cursor.execute(f"INSERT INTO public.{table} VALUES ('public')")
        for schema in tenants:
            cursor.execute(f"CREATE SCHEMA {schema}")
            cursor.execute(f"CREATE TABLE {schema}.{table} (who text)")
            cursor.execute(f"INSERT INTO {schema}.{table} VALUES (%s)", [schema])
    try:
        yield table, tenants
    finally:
        with conn.cursor() as cursor:
            cursor.execute("SET lock_timeout = '10s'")
            for schema in tenants:
                cursor.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            cursor.execute(f"DROP TABLE IF EXISTS public.{table}")
        conn.close()


@pytest.fixture
def tenant_alias(
    dsn: str, alias: str, app_name: str, engine: str
) -> Iterator[Callable[..., Callable[[], Any]]]:
    """``tenant_alias(**pool_settings)`` -> ``install()``, which gives the calling thread a
    django-tenants wrapper over ``engine`` as ``connections[alias]``, with
    ``TENANT_LIMIT_SET_CALLS = True``."""
    wrapper_class = tenants_wrapper_class(engine)
    limit = override_settings(TENANT_LIMIT_SET_CALLS=True)
    limit.enable()

    def configure(**pool: Any) -> Callable[[], Any]:
        options: dict[str, Any] = {"application_name": app_name}
        if is_pooled(engine):
            options.update({"MAX_CONNS": 1, "TIMEOUT": 10, **pool})
        settings = settings_for(dsn, engine=engine, **options)
        assert settings["CONN_MAX_AGE"] == 0
        connections.settings[alias] = settings

        def install() -> Any:
            # Each thread its own wrapper and settings dict (set_tenant() writes SCHEMA there).
            wrapper = wrapper_class(copy.deepcopy(settings), alias=alias)
            connections[alias] = wrapper
            return wrapper

        return install

    try:
        yield configure
    finally:
        limit.disable()
        forget(alias)


def read(wrapper: Any, table: str) -> tuple[str, int]:
    """One job: which schema's row the session's search_path finds, and the session."""
    try:
        with wrapper.cursor() as cursor:
            cursor.execute(f"SELECT who, pg_backend_pid() FROM {table}")
            who, pid = cursor.fetchone()
            return str(who), int(pid)
    finally:
        close_old_connections()  # the job's end, as request_finished / a task's end


def terminate_idle(admin: Any, app_name: str) -> list[int]:
    """End this test's idle sessions from the server's side, as idle_session_timeout (or a
    failover, MAX_LIFETIME) would; return their pids once they are gone."""
    with admin.cursor() as cursor:
        # Two statements: in one WHERE clause the server may call pg_terminate_backend()
        # before testing the other conditions, i.e. on every session of the server.
        cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND state = 'idle'",
            [app_name],
        )
        pids = [row[0] for row in cursor.fetchall()]
        for pid in pids:
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])

    def gone() -> bool:
        with admin.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", [pids])
            return cursor.fetchone()[0] == 0

    assert wait_until(gone, 5), f"sessions {pids} still there after pg_terminate_backend"
    return pids


def test_a_tenant_worker_reads_its_tenant_after_the_server_ended_its_idle_session(
    tenant_alias: Callable[..., Callable[[], Any]],
    schemas: tuple[str, list[str]],
    engine: str,
    admin: Any,
    app_name: str,
) -> None:
    """Item 1, scenario A: one worker pinned to a tenant with django-tenants
    (``TENANT_LIMIT_SET_CALLS``) calls ``close_old_connections()`` between jobs; between
    jobs the server ends the idle session (``pg_terminate_backend``, as
    idle_session_timeout would).  Every job reads the tenant's row, never public's."""
    table, tenants = schemas
    install = tenant_alias()
    outcome: dict[str, Any] = {"reads": [], "killed": []}

    def worker() -> None:
        wrapper = install()
        wrapper.set_schema(tenants[0])
        for _ in range(4):
            outcome["reads"].append(read(wrapper, table))
            outcome["killed"] += terminate_idle(admin, app_name)

    thread = threading.Thread(target=worker, name="tenant-worker")
    thread.start()
    thread.join(60)
    assert not thread.is_alive()
    reads = outcome["reads"]
    assert len(reads) == 4, "the worker failed: see the captured output"
    if is_pooled(engine):
        assert len(outcome["killed"]) == 4, "herokupool kept each job's session idle: ended"
        assert len({pid for _, pid in reads}) == 4, "each job got a new session"
    assert [who for who, _ in reads] == [tenants[0]] * 4


def test_more_tenant_workers_than_connections_never_read_another_tenants_rows(
    tenant_alias: Callable[..., Callable[[], Any]],
    schemas: tuple[str, list[str]],
    engine: str,
) -> None:
    """Item 1, scenario B: three worker threads, each pinned to its own tenant with
    django-tenants (``TENANT_LIMIT_SET_CALLS``), share a pool of two connections; 20 jobs
    each, with ``close_old_connections()`` between jobs.  Zero reads of another tenant's
    (or public's) rows, as with the stock engine."""
    table, tenants = schemas
    install = tenant_alias(MAX_CONNS=2)
    jobs = 20
    barrier = threading.Barrier(len(tenants))
    reads: dict[str, list[tuple[str, int]]] = {tenant: [] for tenant in tenants}
    errors: list[BaseException] = []

    def worker(tenant: str) -> None:
        try:
            wrapper = install()
            wrapper.set_schema(tenant)
            for _ in range(jobs):
                barrier.wait(timeout=30)  # the jobs of all workers start together
                reads[tenant].append(read(wrapper, table))
        except BaseException as error:
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(t,), name=f"worker-{t}") for t in tenants]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert all(len(done) == jobs for done in reads.values())
    if is_pooled(engine):
        pids = {pid for done in reads.values() for _, pid in done}
        assert len(pids) <= 2, "three workers shared two physical sessions"
    wrong = {tenant: [who for who, _ in done if who != tenant] for tenant, done in reads.items()}
    assert sum(len(w) for w in wrong.values()) == 0, f"reads of other schemas: {wrong}"
