"""gunicorn's gevent worker with psycogreen: a tested configuration (issue 9, item 10).

The app (tests/integration/gevent_app) runs under ``gunicorn -k gevent`` with psycogreen
patched in ``post_fork``, one worker, POOL_MAX_CONNS=2: more greenlets than connections.
Some requests give up waiting with a ``gevent.Timeout`` and some kill a greenlet that waits
for or holds a connection; afterwards the pool's counters, read through a view, must be
exact and every slot free, and the app must still serve.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from tests.integration.conftest import pids_of

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.integration.gevent_app"
HOST = "127.0.0.1"
MAX_CONNS = 2
Response = tuple[int, dict[str, Any]]


class Server:
    def __init__(self, port: int, process: subprocess.Popen[bytes], log: Path) -> None:
        self.port = port
        self.process = process
        self.log = log

    def get(self, path: str, timeout: float = 15.0) -> Response:
        connection = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            connection.request("GET", path, headers={"Connection": "close"})
            response = connection.getresponse()
            raw = response.read()
        finally:
            connection.close()
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, {"body": raw.decode(errors="replace")}

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


@pytest.fixture
def gevent_server(dsn: str, app_name: str, tmp_path: Path) -> Iterator[Server]:
    from devtools.pgcluster import free_port

    port = free_port(HOST)
    log = tmp_path / "gunicorn.log"
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("POOL_", "DJANGO_", "DATABASE_URL", "DYNO"))
    }
    env.update(
        DJANGO_SETTINGS_MODULE=f"{APP}.settings",
        DATABASE_URL=f"{dsn}?{urlencode({'application_name': app_name})}",
        POOL_MAX_CONNS=str(MAX_CONNS),
        POOL_TIMEOUT="10",
        PYTHONUNBUFFERED="1",
    )
    command = [
        sys.executable, "-m", "gunicorn",
        "--config", str(ROOT / "tests/integration/gevent_app/gunicorn_conf.py"),
        "--bind", f"{HOST}:{port}", f"{APP}.wsgi",
    ]  # fmt: skip
    with log.open("ab") as sink:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=sink,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    server = Server(port, process, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                pytest.fail(f"gunicorn exited ({process.returncode}):\n{server.output()}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                if server.get("/healthz", timeout=2)[0] == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"gunicorn did not answer within 30 s:\n{server.output()}")
            time.sleep(0.05)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # the session this master leads
            process.wait()


def concurrently(server: Server, paths: list[tuple[float, str]]) -> list[Response]:
    """GET each ``(delay, path)`` from a thread of its own, ``delay`` seconds after the start."""
    results: list[Response] = [(0, {})] * len(paths)

    def client(index: int, delay: float, path: str) -> None:
        time.sleep(delay)
        try:
            results[index] = server.get(path)
        except Exception as error:
            results[index] = (0, {"error": repr(error)})

    threads = [
        threading.Thread(target=client, args=(index, delay, path))
        for index, (delay, path) in enumerate(paths)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


def test_gunicorn_gevent_worker_keeps_the_pool_exact_through_gevent_timeouts_and_kills(
    gevent_server: Server, admin: Any, app_name: str
) -> None:
    # 8 greenlets hold a connection 300 ms each on MAX_CONNS=2: about 1.2 s of queue.  Into it
    # come 3 greenlets that give up after 100 ms with gevent.Timeout, and 2 requests that kill
    # a greenlet: one while it waits, one (later) while it may hold a connection.
    paths = [(0.0, "/sleep/300")] * 8
    paths += [(0.15, "/give-up/100")] * 3
    paths += [(0.2, "/killed/100"), (0.3, "/killed/600")]
    results = concurrently(gevent_server, paths)

    output = gevent_server.output()
    assert [status for status, _ in results] == [200] * len(paths), (results, output)
    sleepers = {body["pid"] for _, body in results[:8]}
    assert len(sleepers) <= MAX_CONNS
    assert [body["gave_up"] for _, body in results[8:11]] == [True] * 3, "the pool was busy"

    def settled() -> dict[str, Any]:
        deadline = time.monotonic() + 5
        while True:
            status, stats = gevent_server.get("/stats")
            assert status == 200
            if stats["in_use"] == 0 or time.monotonic() > deadline:
                return stats

    stats = settled()
    assert stats["in_use"] == 0, (stats, output)
    assert stats["waiting"] == 0, stats
    assert stats["borrows"] == stats["releases"] + stats["in_use"], stats
    assert stats["timeouts"] == 0, "gevent.Timeout is not the pool's TIMEOUT"

    # Still serving, with every slot: MAX_CONNS concurrent borrowers are all served at once.
    after = concurrently(gevent_server, [(0.0, "/sleep/200")] * 6)
    assert [status for status, _ in after] == [200] * 6, after
    assert len(pids_of(admin, app_name)) <= MAX_CONNS
    stats = settled()
    assert stats["in_use"] == 0, stats
    assert stats["borrows"] == stats["releases"], stats
    assert "Traceback" not in gevent_server.output(), gevent_server.output()
