"""A Celery app whose tasks run queries when their soft time limit fires.

The broker is kombu's filesystem transport and results go to files: no server besides
PostgreSQL.  The folders come from ``HEROKUPOOL_CELERY_DIR``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import django
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.integration.celery_app.settings")
django.setup()

from django.db import connection  # noqa: E402  (after django.setup())

import herokupool  # noqa: E402

folder = Path(os.environ["HEROKUPOOL_CELERY_DIR"])
for sub in ("queue", "processed", "results"):
    (folder / sub).mkdir(parents=True, exist_ok=True)

app = Celery("herokupool_celery_test")
app.conf.update(
    broker_url="filesystem://",
    broker_transport_options={
        "data_folder_in": str(folder / "queue"),
        "data_folder_out": str(folder / "queue"),
        "processed_folder": str(folder / "processed"),
        "polling_interval": 0.05,
        "control_folder": str(folder / "control"),  # not the current directory
    },
    result_backend=f"file://{folder / 'results'}",
    worker_prefetch_multiplier=1,
    task_acks_late=False,
    broker_connection_retry_on_startup=True,
)


@app.task(soft_time_limit=0.05)
def busy(seed: int) -> str:
    """Short queries in a loop, giving the connection back now and then, until the soft
    time limit lands: anywhere in a borrow, a query or a release."""
    try:
        while True:
            with connection.cursor() as cursor:
                cursor.execute("SELECT %s", [seed])
            if seed % 2:
                connection.close()
    except SoftTimeLimitExceeded:
        return "limited"


@app.task(soft_time_limit=0.1)
def slow() -> str:
    """A query still running when the soft time limit fires."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_sleep(0.3)")
    except SoftTimeLimitExceeded:
        return "limited"
    return "finished"


@app.task
def served() -> int:
    """What every later task must get: a connection, within the pool's TIMEOUT."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return int(cursor.fetchone()[0])


@app.task
def pool_stats() -> dict[str, Any]:
    """This worker process's pool, as the next task sees it (nothing borrowed yet)."""
    time.sleep(0.2)  # let a connection lost by the previous task reach the pool's thread
    return {"pid": os.getpid(), **herokupool.stats().get("default", {})}
