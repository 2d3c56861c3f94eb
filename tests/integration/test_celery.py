"""A real Celery worker (prefork) whose tasks' soft time limit fires inside queries (issue 16).

Celery's soft time limit raises ``SoftTimeLimitExceeded`` from a signal handler at whatever
instruction the worker process's main thread is on: inside a borrow, a query, a release.
Hundreds of such tasks must leave nothing stranded: every later task is served within the
pool's ``TIMEOUT``, each process's pool ends with nothing in use and nobody waiting, and the
server never sees more sessions than the processes' pools may open.  The broker is kombu's
filesystem transport, so the test needs no server besides PostgreSQL.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import wait_until
from tests.integration.conftest import pids_of

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CONCURRENCY = 2
BUSY_TASKS = 200
SLOW_TASKS = 20
LATER_TASKS = 60


def test_soft_time_limits_inside_queries_strand_nothing(
    dsn: str, app_name: str, admin: Any, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "HEROKUPOOL_CELERY_DSN": dsn,
        "HEROKUPOOL_CELERY_APP_NAME": app_name,
        "HEROKUPOOL_CELERY_DIR": str(tmp_path),
        "DJANGO_SETTINGS_MODULE": "tests.integration.celery_app.settings",
        "PYTHONPATH": str(REPO),
        "PYTHONWARNINGS": "ignore",  # the worker is not under test: its own deprecations
    }
    os.environ["HEROKUPOOL_CELERY_DIR"] = str(tmp_path)
    os.environ["HEROKUPOOL_CELERY_DSN"] = dsn
    os.environ["HEROKUPOOL_CELERY_APP_NAME"] = app_name
    from tests.integration.celery_app import tasks

    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.integration.celery_app.tasks",
            "worker",
            "--pool=prefork",
            f"--concurrency={CONCURRENCY}",
            "--loglevel=error",
            "--without-heartbeat",
            "--without-gossip",
            "--without-mingle",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        busy = [tasks.busy.delay(n) for n in range(BUSY_TASKS)]
        slow = [tasks.slow.delay() for _ in range(SLOW_TASKS)]
        outcomes = [result.get(timeout=120, interval=0.02) for result in busy + slow]
        assert outcomes.count("limited") >= BUSY_TASKS, outcomes
        # Every later task is served (TIMEOUT is 2 s: a stranded slot would make them fail).
        later = [tasks.served.delay() for _ in range(LATER_TASKS)]
        pids = {result.get(timeout=60, interval=0.02) for result in later}
        assert pids, "later tasks were served"
        sessions = pids_of(admin, app_name)
        assert len(sessions) <= CONCURRENCY, (sessions, "MAX_CONNS 1 per process")
        stats = [
            tasks.pool_stats.delay().get(timeout=30, interval=0.02) for _ in range(4 * CONCURRENCY)
        ]
        for each in stats:
            assert each["in_use"] == 0, each
            assert each["waiting"] == 0, each
            assert each["borrows"] == each["releases"] + each["in_use"], each
    finally:
        worker.terminate()
        try:
            output, _ = worker.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
            output, _ = worker.communicate()
    assert wait_until(lambda: not pids_of(admin, app_name), 10), "the worker's sessions ended"
    text = output.decode(errors="replace")
    assert "Traceback" not in text, text[-3000:]
