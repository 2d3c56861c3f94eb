"""Async code and short-lived threads (spec item 11) against a real PostgreSQL.

Django gives each thread its own connection and closes it when a request finishes
(``close_old_connections`` on ``request_finished``): with herokupool that returns it to
the pool.  These tests run the ORM from many threads at once, through
``sync_to_async(thread_sensitive=False)`` and through Django's own ASGI handler (which
serves each request's sync code in a thread of its own), on a pool smaller than the
number of threads, and check the server never sees more than MAX_CONNS sessions and
every connection comes back.

A thread that ends WITHOUT closing its connection (outside the request cycle) gives it
back when its wrapper is garbage-collected: the last test shows that.

The tests use pytest-django's test database and ``tests.testapp.models.Item``; the
``own_pool`` fixture gives the default alias a pool of its own for one test, with its
own ``application_name`` so ``sessions()`` counts exactly that pool's server sessions.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIHandler
from django.db import close_old_connections, connection
from django.http import HttpRequest, JsonResponse
from django.urls import path

import herokupool
from herokupool import registry
from tests.helpers import wait_until
from tests.integration.conftest import pids_of
from tests.testapp.models import Item

pytestmark = pytest.mark.integration

OwnPool = Callable[..., dict[str, Any]]


@pytest.fixture
def own_pool(monkeypatch: pytest.MonkeyPatch, app_name: str) -> Iterator[OwnPool]:
    """``own_pool(MAX_CONNS=..., ...)``: set the default alias's OPTIONS for this test.

    Pools are keyed by OPTIONS, so every thread's wrapper then borrows from a new pool;
    the returned function gives that pool's stats.
    """
    options = connection.settings_dict["OPTIONS"]  # shared by every thread's wrapper
    connection.close()  # the main thread too borrows from the new pool from now on

    def configure(**settings: Any) -> dict[str, Any]:
        monkeypatch.setitem(options, "application_name", app_name)
        for key, value in settings.items():
            monkeypatch.setitem(options, key, value)
        return options

    yield configure
    connection.close()
    registry.close("default")  # this test's pool, and the suite's (recreated on demand)


def stats() -> dict[str, int | float]:
    return herokupool.stats()["default"]  # the newest pool of the alias: this test's


class Peak:
    """Watch the server's session count for this test's pool from a thread."""

    def __init__(self, sessions: Callable[[], int]) -> None:
        self.sessions = sessions
        self.value = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch)

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.value = max(self.value, self.sessions())
            time.sleep(0.002)

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def pid_and_sleep(seconds: float) -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid(), pg_sleep(%s)", [seconds])
        return int(cursor.fetchone()[0])


# ------------------------------------------------ sync_to_async(thread_sensitive=False)


@pytest.mark.django_db(transaction=True)
def test_concurrent_sync_to_async_orm_calls_share_max_conns_connections(
    own_pool: OwnPool, sessions: Callable[[], int]
) -> None:
    max_conns, tasks_n = 3, 12
    own_pool(MAX_CONNS=max_conns, TIMEOUT=10)

    def request(n: int) -> tuple[int, str, int]:
        try:
            Item.objects.create(name=f"task-{n}")
            server_pid = pid_and_sleep(0.02)
            found = Item.objects.filter(name=f"task-{n}").count()
            # Thread names, unlike idents, are never reused by a later thread.
            return server_pid, threading.current_thread().name, found
        finally:
            close_old_connections()  # what request_finished does after every request

    async def main(executor: ThreadPoolExecutor) -> list[tuple[int, str, int]]:
        view = sync_to_async(request, thread_sensitive=False, executor=executor)
        return await asyncio.gather(*(view(n) for n in range(tasks_n)))

    with Peak(sessions) as peak, ThreadPoolExecutor(max_workers=tasks_n) as executor:
        results = asyncio.run(main(executor))

    assert [found for _, _, found in results] == [1] * tasks_n
    assert len({thread for _, thread, _ in results}) > max_conns, "more threads than connections"
    assert 1 <= peak.value <= max_conns
    assert len({server_pid for server_pid, _, _ in results}) <= max_conns
    pool = stats()
    assert pool["in_use"] == 0, "every connection came back"
    assert pool["borrows"] == pool["releases"] == tasks_n
    assert pool["waits"] >= 1
    assert pool["connections_created"] <= max_conns
    assert Item.objects.count() == tasks_n


# --------------------------------------------------------- Django's ASGI handler


def sync_view(request: HttpRequest, n: int) -> JsonResponse:
    Item.objects.create(name=f"sync-{n}")
    # asgiref runs each request's sync code in a single-thread executor of its own; thread
    # names, unlike idents, are never reused by a later thread.
    return JsonResponse({"pid": pid_and_sleep(0.03), "thread": threading.current_thread().name})


async def async_view(request: HttpRequest, n: int) -> JsonResponse:
    await Item.objects.acreate(name=f"async-{n}")
    server_pid = await sync_to_async(pid_and_sleep)(0.03)
    return JsonResponse({"pid": server_pid, "items": await Item.objects.acount()})


urlpatterns = [path("sync/<int:n>", sync_view), path("async/<int:n>", async_view)]


async def asgi_get(app: ASGIHandler, url: str) -> tuple[int, dict[str, Any]]:
    """One GET through Django's ASGI handler, as an ASGI server would send it."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": url,
        "raw_path": url.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    incoming = [{"type": "http.request", "body": b"", "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if incoming:
            return incoming.pop()
        await asyncio.Event().wait()  # the client stays connected until cancelled
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body)


@pytest.mark.django_db(transaction=True)
def test_concurrent_asgi_requests_return_their_connections(
    own_pool: OwnPool, sessions: Callable[[], int], settings: Any
) -> None:
    settings.ROOT_URLCONF = __name__
    max_conns, requests_n = 3, 10
    own_pool(MAX_CONNS=max_conns, TIMEOUT=10)
    app = ASGIHandler()
    threads_before = threading.active_count()

    async def main() -> list[tuple[int, dict[str, Any]]]:
        urls = [f"/{'sync' if n % 2 else 'async'}/{n}" for n in range(requests_n)]
        return await asyncio.gather(*(asgi_get(app, url) for url in urls))

    with Peak(sessions) as peak:
        responses = asyncio.run(main())

    assert [status for status, _ in responses] == [200] * requests_n
    # Each request's sync code ran in a thread of its own: more threads than connections.
    assert len({body["thread"] for _, body in responses if "thread" in body}) > max_conns
    assert 1 <= peak.value <= max_conns
    assert len({body["pid"] for _, body in responses}) <= max_conns
    pool = stats()
    assert pool["in_use"] == 0, "request_finished closed every request's connection"
    assert pool["borrows"] == pool["releases"] >= requests_n
    assert pool["connections_created"] <= max_conns
    assert Item.objects.count() == requests_n
    # The request threads are gone (asgiref ends them with their request's context).
    assert wait_until(lambda: threading.active_count() <= threads_before + 1)


# ------------------------------------------------------------------ dying threads


@pytest.mark.django_db(transaction=True)
def test_a_thread_that_dies_after_its_request_returns_its_connection(
    own_pool: OwnPool, sessions: Callable[[], int]
) -> None:
    own_pool(MAX_CONNS=1, TIMEOUT=2)
    seen: list[int] = []

    def request(n: int) -> None:
        try:
            Item.objects.create(name=f"thread-{n}")
            seen.append(pid_and_sleep(0))
        finally:
            close_old_connections()

    for n in range(4):  # with MAX_CONNS=1 a leak would make the next thread time out
        thread = threading.Thread(target=request, args=(n,))
        thread.start()
        thread.join()
    assert len(seen) == 4
    assert len(set(seen)) == 1, "one server session, reused by each thread"
    pool = stats()
    assert pool["in_use"] == 0
    assert pool["connections_created"] == 1
    assert sessions() == 1
    assert Item.objects.count() == 4


@pytest.mark.django_db(transaction=True)
def test_a_thread_that_dies_without_closing_gives_its_connection_back(
    own_pool: OwnPool, admin: Any, app_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Django's wrapper dies with its thread; when it is collected, the pool takes the
    # connection back (Django's own backend would close the socket then), with a warning.
    own_pool(MAX_CONNS=1, TIMEOUT=0.3)
    seen: list[int] = []

    def careless_background_job() -> None:
        Item.objects.create(name="from a thread")
        seen.append(pid_and_sleep(0))
        # ...and returns without close_old_connections()

    with caplog.at_level(logging.WARNING, logger="herokupool"):
        thread = threading.Thread(target=careless_background_job)
        thread.start()
        thread.join()
        del thread
        gc.collect()  # the thread's wrapper is gone: its connection comes back
        # ...through the pool's own thread (release_later), within milliseconds.
        deadline = time.monotonic() + 5
        while stats()["in_use"] and time.monotonic() < deadline:
            time.sleep(0.01)
    (server_pid,) = seen
    assert stats()["in_use"] == 0
    assert stats()["idle"] == 1
    assert pids_of(admin, app_name) == {server_pid}, "kept open in the pool, not closed"
    assert Item.objects.filter(name="from a thread").count() == 1  # MAX_CONNS=1: reused
    assert pid_and_sleep(0) == server_pid
    assert any("ended without releasing it" in record.getMessage() for record in caplog.records), (
        caplog.text
    )
