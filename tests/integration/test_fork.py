"""Fork safety (spec item 7) against a real PostgreSQL.

A forked child must forget the connections it inherited without closing them (closing
sends a Terminate message on a socket its parent still uses) and open its own; the
parent's idle and borrowed connections must go on working, on the same server sessions.

Every child exits through ``os._exit`` (it must never return into pytest) with status 0
only when its own checks passed, and reports what it saw as JSON through a pipe.  The
parent reaps each child against a deadline, killing it rather than hanging.

Forking a multi-threaded process makes Python 3.12+ emit a DeprecationWarning in the
parent ("This process ... is multi-threaded, use of fork() may lead to deadlocks in the
child"), which ``filterwarnings = error`` would raise from ``os.fork()`` itself, after
the child already exists.  The threads here are the pools' maintenance threads (and
pytest's own); the deadlock the warning is about is exactly what these tests exercise:
the pool and the registry replace their locks in the child.  So the tests that fork
ignore that one warning, by message, and nothing else.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.util
import os
import select
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from django.db import connections

import herokupool
from herokupool import registry
from tests.helpers import wait_until
from tests.integration.conftest import MakeWrapper, backend_pid, pids_of, settings_for

pytestmark = pytest.mark.integration

# See the module docstring: why forking tests ignore exactly this warning.
IGNORE_FORK_WARNING = pytest.mark.filterwarnings(
    r"ignore:This process \(pid=\d+\) is multi-threaded, use of fork\(\) may lead to "
    r"deadlocks:DeprecationWarning"
)

CHILD_TIMEOUT = 20.0


@dataclass
class Child:
    """A forked child: its pid and the read end of the pipe it reports through."""

    pid: int
    reports: int

    def result(self, timeout: float = CHILD_TIMEOUT) -> dict[str, Any]:
        """Read the child's report and reap it; kill it and fail if it takes too long."""
        deadline = time.monotonic() + timeout
        data = b""
        try:
            while True:  # until EOF: the child wrote its report and exited
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not select.select([self.reports], [], [], remaining)[0]:
                    self.kill()
                    pytest.fail(f"forked child {self.pid} did not finish within {timeout} s")
                chunk = os.read(self.reports, 65536)
                if not chunk:
                    break
                data += chunk
        finally:
            os.close(self.reports)
        status = self.reap(deadline)
        report: dict[str, Any] = json.loads(data) if data else {"ok": False, "error": "no report"}
        assert report["ok"], f"child exited {status}: {report.get('error')}"
        assert status == 0, f"child exited {status}"
        return report

    def reap(self, deadline: float) -> int:
        while True:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() >= deadline:
                self.kill()
                pytest.fail(f"forked child {self.pid} did not exit in time")
            time.sleep(0.005)

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def fork(body: Callable[[], dict[str, Any]]) -> Child:
    """Run ``body()`` in a forked child that exits 0 only if it returned.

    Whatever happens, the child leaves through ``os._exit``: no pytest code, atexit
    handler or finalizer of the parent's objects runs in it.
    """
    reports, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, reported through the pipe
        code = 1
        try:
            os.close(reports)
            try:
                report = {"ok": True, **body()}
                code = 0
            except BaseException:
                report = {"ok": False, "error": traceback.format_exc()}
            data = json.dumps(report).encode()
            while data:
                data = data[os.write(write_end, data) :]
        finally:
            os._exit(code)
    os.close(write_end)
    return Child(pid, reports)


def pool_stats(alias: str) -> dict[str, int | float]:
    return herokupool.stats()[alias]


@pytest.fixture
def django_alias(dsn: str, alias: str, app_name: str) -> Iterator[str]:
    """Register this test's alias with Django's ``connections`` handler, as an app's
    DATABASES would: the wrappers then live in the handler, which the backend's fork
    hook knows about."""
    connections.settings[alias] = settings_for(dsn, application_name=app_name, MAX_CONNS=2)
    try:
        yield alias
    finally:
        try:
            connections[alias].close()
        finally:
            del connections[alias]
            del connections.settings[alias]
            registry.close(alias)


# ------------------------------------------------------------------- one child


@IGNORE_FORK_WARNING
def test_a_child_opens_its_own_connections_and_the_parents_keep_working(
    make_wrapper: MakeWrapper, alias: str, admin: Any, app_name: str
) -> None:
    held = make_wrapper(MAX_CONNS=3)
    held_pid = backend_pid(held)  # borrowed at fork time
    idle = make_wrapper(MAX_CONNS=3)
    idle_pid = backend_pid(idle)
    idle_raw = idle.connection
    idle.close()  # idle in the pool at fork time
    held_raw = held.connection
    assert {k: pool_stats(alias)[k] for k in ("in_use", "idle")} == {"in_use": 1, "idle": 1}

    def child() -> dict[str, Any]:
        inherited = pool_stats(alias)
        # Releasing the wrapper the parent holds is a no-op here: the parent owns it.
        held.close()
        fresh = make_wrapper(MAX_CONNS=3)
        pid = backend_pid(fresh)
        with fresh.cursor() as cursor:
            cursor.execute("CREATE TEMP TABLE t (v int)")
            cursor.execute("INSERT INTO t SELECT generate_series(1, 100)")
            cursor.execute("SELECT sum(v) FROM t")
            total = cursor.fetchone()[0]
        fresh.close()
        again = backend_pid(held)  # the inherited wrapper now borrows from the child's pool
        held.close()
        # What the interpreter's shutdown would do to the inherited psycopg2 objects:
        # close them.  They were detached from the parent's sockets at fork.
        held_raw.close()
        idle_raw.close()
        stats = pool_stats(alias)
        registry.close(alias)  # end the child's own session cleanly
        return {"inherited": inherited, "pid": pid, "again": again, "sum": total, "stats": stats}

    report = fork(child).result()

    assert report["inherited"]["in_use"] == report["inherited"]["idle"] == 0
    assert report["inherited"]["borrows"] == 0, "a child's counters start at zero"
    assert report["pid"] not in {held_pid, idle_pid}
    assert report["again"] == report["pid"], "the child's own pool reuses its connection"
    assert report["sum"] == 5050
    assert report["stats"]["connections_created"] == 1
    # The parent's sessions survived: the borrowed one answers on the same backend...
    with held.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid(), count(*) FROM pg_class")
        assert cursor.fetchone()[0] == held_pid
    # ...and the idle one is handed out again, not replaced.
    assert backend_pid(make_wrapper(MAX_CONNS=3)) == idle_pid
    stats = pool_stats(alias)
    assert stats["connections_created"] == 2
    assert stats["connections_lost"] == 0
    assert wait_until(lambda: pids_of(admin, app_name) == {held_pid, idle_pid}), pids_of(
        admin, app_name
    )


@IGNORE_FORK_WARNING
def test_a_connection_djangos_handler_holds_at_fork_is_forgotten_in_the_child(
    django_alias: str, admin: Any, app_name: str
) -> None:
    parent_pid = backend_pid(connections[django_alias])  # held by the handler at fork

    def child() -> dict[str, Any]:
        wrapper = connections[django_alias]
        forgotten = wrapper.connection is None
        pid = backend_pid(wrapper)
        wrapper.close()
        again = backend_pid(wrapper)
        wrapper.close()
        registry.close(django_alias)
        return {"forgotten": forgotten, "pid": pid, "again": again}

    report = fork(child).result()

    assert report["forgotten"], "the backend's fork hook dropped the inherited connection"
    assert report["pid"] != parent_pid
    assert report["again"] == report["pid"]
    assert backend_pid(connections[django_alias]) == parent_pid
    assert pool_stats(django_alias)["connections_lost"] == 0
    assert wait_until(lambda: pids_of(admin, app_name) == {parent_pid})


# ------------------------------------------------------- gunicorn's preload_app


@IGNORE_FORK_WARNING
def test_preload_app_master_connects_then_two_workers_use_their_own_pools_concurrently(
    make_wrapper: MakeWrapper, alias: str, admin: Any, app_name: str
) -> None:
    max_conns, threads_n, rounds = 2, 3, 5
    options = {"MAX_CONNS": max_conns, "TIMEOUT": 10}  # the same options: the same pool
    master = make_wrapper(**options)
    master_pid = backend_pid(master)  # e.g. a check at import time, before the fork
    master.close()
    go, release_workers = os.pipe()

    def worker() -> dict[str, Any]:
        holder = make_wrapper(**options)
        first = backend_pid(holder)
        # Hold it until the parent has seen both workers connected at once.
        if not select.select([go], [], [], CHILD_TIMEOUT)[0]:
            raise TimeoutError("the parent never let the workers go on")
        os.read(go, 1)
        holder.close()
        pids: set[int] = set()
        errors: list[str] = []

        def request() -> None:
            wrapper = make_wrapper(**options)
            try:
                for _ in range(rounds):
                    with wrapper.cursor() as cursor:
                        cursor.execute("SELECT pg_backend_pid(), pg_sleep(0.005)")
                        pids.add(cursor.fetchone()[0])
                    wrapper.close()  # what request_finished does
            except Exception:
                errors.append(traceback.format_exc())

        threads = [threading.Thread(target=request) for _ in range(threads_n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stats = pool_stats(alias)
        registry.close(alias)
        return {"first": first, "pids": sorted(pids), "errors": errors, "stats": stats}

    try:
        workers = [fork(worker) for _ in range(2)]
        seen = wait_until(lambda: len(pids_of(admin, app_name)) == 3)
        concurrent = pids_of(admin, app_name)
    finally:
        os.write(release_workers, b"go")  # never leave a worker blocked
        os.close(release_workers)
    try:
        reports = [child.result() for child in workers]
    finally:
        os.close(go)

    assert seen, f"expected the master's and both workers' sessions at once: {concurrent}"
    firsts = {report["first"] for report in reports}
    assert concurrent == {master_pid, *firsts}
    assert len(firsts) == 2
    assert master_pid not in firsts
    for report in reports:
        assert report["errors"] == []
        assert 1 <= len(report["pids"]) <= max_conns, "each worker keeps its own cap"
        assert master_pid not in report["pids"]
        assert report["stats"]["borrows"] == 1 + threads_n * rounds
        assert report["stats"]["connections_created"] <= max_conns
        assert report["stats"]["connections_lost"] == 0
    # The master's idle connection is still the same, healthy session.
    assert backend_pid(make_wrapper(**options)) == master_pid
    assert pool_stats(alias)["connections_lost"] == 0
    assert wait_until(lambda: pids_of(admin, app_name) == {master_pid})


# -------------------------------------------- multiprocessing (Celery prefork shape)


def _close_pools_at_exit() -> None:
    """Pool worker initializer: end this worker's sessions cleanly when it exits."""
    multiprocessing.util.Finalize(None, registry.close_all, exitpriority=10)


def _task(alias: str) -> tuple[int, int]:
    """A task using Django's connection, closed afterwards as Celery's Django fixup does."""
    wrapper = connections[alias]
    try:
        return os.getpid(), backend_pid(wrapper)
    finally:
        wrapper.close()


@IGNORE_FORK_WARNING
def test_multiprocessing_fork_workers_each_reuse_one_connection_of_their_own(
    django_alias: str, admin: Any, app_name: str
) -> None:
    parent_pid = backend_pid(connections[django_alias])  # held by the parent throughout
    context = multiprocessing.get_context("fork")
    with context.Pool(2, initializer=_close_pools_at_exit) as workers:
        results = workers.map_async(_task, [django_alias] * 12, chunksize=1).get(CHILD_TIMEOUT)
        workers.close()
        workers.join()

    by_worker: dict[int, set[int]] = {}
    for worker_pid, server_pid in results:
        by_worker.setdefault(worker_pid, set()).add(server_pid)
    assert all(len(pids) == 1 for pids in by_worker.values()), by_worker
    server_pids = set().union(*by_worker.values())
    assert parent_pid not in server_pids
    assert len(server_pids) == len(by_worker)
    assert backend_pid(connections[django_alias]) == parent_pid
    assert pool_stats(django_alias)["connections_lost"] == 0
    assert wait_until(lambda: pids_of(admin, app_name) == {parent_pid})
