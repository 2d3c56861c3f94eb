"""Fixtures for the demo app: a fresh database, and the Procfile run as Heroku runs it.

``web`` builds (collectstatic, as the Python buildpack does), runs the Procfile's ``release:``
command and then its ``web:`` command exactly as written, through ``/bin/sh -c`` with PORT on
a free loopback port, DATABASE_URL at a database created for this run, WEB_CONCURRENCY=2 and
POOL_MAX_CONNS smaller than gunicorn's threads. Nothing here imports the demo's settings: they
are read by the subprocesses, from the environment each test gives them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from demo.run import SHELL, free_port, group_alive, read_procfile
from tests.conftest import Server, require

ROOT = Path(__file__).resolve().parents[2]
BINDIR = str(Path(sys.executable).parent)  # the virtualenv's: python, gunicorn

WORKERS = 2
THREADS = 8
MAX_CONNS = 2  # < THREADS: a burst must queue in each worker's pool
SECRET_KEY = "demo-tests-" + "k3y-0f-50-characters-or-more-for-check-deploy-xyzw"
#: Heroku's shutdown window: SIGKILL follows SIGTERM after this many seconds.
HEROKU_STOP_WINDOW = 30.0

# Variables a developer's shell (or Heroku CI) may hold that would change what the demo does.
_SCRUBBED = ("DYNO", "PORT", "DATABASE_URL", "SECRET_KEY", "DEBUG", "ALLOWED_HOSTS",
             "WEB_CONCURRENCY", "DJANGO_SETTINGS_MODULE", "GUNICORN_CMD_ARGS")  # fmt: skip


def clean_env(**overrides: str) -> dict[str, str]:
    """os.environ without the demo's settings, the virtualenv first on PATH, plus overrides."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in _SCRUBBED and not key.startswith(("POOL_", "GUNICORN_", "PYTHON"))
    }
    env["PATH"] = os.pathsep.join([BINDIR, env.get("PATH", os.defpath)])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides)
    return env


def manage(
    *args: str, env: Mapping[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``python manage.py ARGS`` with warnings as errors, as the test suite runs."""
    return subprocess.run(
        [sys.executable, "-W", "error", "manage.py", *args],
        cwd=ROOT,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def get(
    url: str, *, timeout: float = 10, headers: Mapping[str, str] | None = None
) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read().decode()


def get_json(url: str) -> tuple[int, dict[str, Any]]:
    status, body = get(url, headers={"Accept": "application/json"})
    return status, json.loads(body)


@pytest.fixture(scope="session")
def demo_extra() -> None:
    """gunicorn and whitenoise: the demo extra (``pip install -e .[test,demo]``)."""
    for name in ("gunicorn", "whitenoise"):
        require(importlib.util.find_spec(name) is not None, f"{name} (the demo extra)")


@dataclass
class DemoDatabase:
    server: Server
    name: str
    url: str

    def sessions(self) -> int:
        """Client sessions on this database right now (pg_stat_activity)."""
        conn = self.server.connect()
        try:
            return self.count_sessions(conn)
        finally:
            conn.close()

    def count_sessions(self, conn: Any) -> int:
        with conn.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = %s AND backend_type = 'client backend'",
                [self.name],
            )
            return int(cursor.fetchone()[0])


@pytest.fixture(scope="session")
def demo_db(pg_server: Server) -> Iterator[DemoDatabase]:
    """A database of its own for this run (unique name), dropped afterwards."""
    name = f"herokupool_demo_{uuid.uuid4().hex[:10]}"
    url = pg_server.create_database(name)
    yield DemoDatabase(pg_server, name, url)
    conn = pg_server.connect()
    try:
        with conn.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        conn.close()


@pytest.fixture(scope="session")
def procfile() -> dict[str, str]:
    return read_procfile(ROOT / "Procfile")


@dataclass
class WebProcess:
    process: subprocess.Popen[str]
    url: str
    env: dict[str, str]
    log: Path

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = HEROKU_STOP_WINDOW) -> float:
        """Signal every process of the command (as Heroku signals a dyno's); seconds to exit."""
        started = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)
        try:
            # Every process of the group, not only the leader: the workers too.
            while time.monotonic() - started < timeout:
                self.process.poll()
                if not group_alive(self.process.pid):
                    break
                time.sleep(0.05)
            return time.monotonic() - started
        finally:
            if group_alive(self.process.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def web_env(db: DemoDatabase, **overrides: str) -> dict[str, str]:
    return clean_env(
        DATABASE_URL=db.url,
        SECRET_KEY=SECRET_KEY,
        WEB_CONCURRENCY=str(WORKERS),
        GUNICORN_THREADS=str(THREADS),
        POOL_MAX_CONNS=str(MAX_CONNS),
        **overrides,
    )


def build_and_release(procfile: Mapping[str, str], env: Mapping[str, str]) -> None:
    """Heroku's build step (collectstatic) and the Procfile's release command, as written."""
    built = manage("collectstatic", "--noinput", env=env)
    assert built.returncode == 0, built.stderr
    release = subprocess.run(
        procfile["release"], shell=True, executable=SHELL, cwd=ROOT, env=dict(env),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert release.returncode == 0, release.stdout + release.stderr


def start_web(
    procfile: Mapping[str, str], env: dict[str, str], log: Path, *, healthy: bool = True
) -> WebProcess:
    """The Procfile's web command as written, in a session of its own; wait until /healthz
    answers 200 (or, with ``healthy=False``, answers at all)."""
    port = free_port()
    env = {**env, "PORT": str(port)}
    with log.open("w", encoding="utf-8") as sink:
        process = subprocess.Popen(
            procfile["web"], shell=True, executable=SHELL, cwd=ROOT, env=env, stdout=sink,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
    web = WebProcess(process, f"http://127.0.0.1:{port}/", env, log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the web command exited ({process.returncode}):\n{web.output()}")
        with contextlib.suppress(OSError, ValueError):
            if get(web.url + "healthz", timeout=5)[0] == 200 or not healthy:
                return web
        time.sleep(0.1)
    web.stop(signal.SIGKILL)
    pytest.fail(f"/healthz did not answer 200 within 30 s:\n{web.output()}")


@pytest.fixture(scope="session")
def web(
    demo_db: DemoDatabase, procfile: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WebProcess]:
    """The demo, built, released and serving from the Procfile's web command."""
    env = web_env(demo_db)
    build_and_release(procfile, env)
    running = start_web(procfile, env, tmp_path_factory.mktemp("web") / "web.log")
    yield running
    running.stop()
