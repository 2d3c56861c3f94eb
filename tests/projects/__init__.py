"""Run the small Django projects in this folder through Django's own test runner.

``running(server, url, "shop")`` gives a :class:`Project` with a unique test database
name and ``application_name`` for one test, and drops whatever test database it left
behind (a failed or ``--keepdb`` run).  See README.md for the projects.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import Server
from tests.helpers import wait_until

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RUN_TIMEOUT = 60


def query(server: Server, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    """Run one statement on the server's "postgres" database, in its own session."""
    conn = server.connect()
    try:
        with conn.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall() if cursor.description else []
    finally:
        conn.close()


@dataclass
class Project:
    """One project, set up for one run: its folder, databases and application_name."""

    server: Server
    folder: Path
    database_url: str
    test_db: str
    app_name: str

    def run(self, *args: str, settings: str, warnings: tuple[str, ...] = ()) -> str:
        """``python -m django test`` in the project; return its output (the report).

        It runs under ``-X dev -W error``, as the suite does: a warning the project does
        not expect (``warnings`` are extra ``-W`` filters) fails the run, and so does
        any exit status but 0.
        """
        env = {
            **os.environ,
            "PROJECT_DATABASE_URL": self.database_url,
            "PROJECT_TEST_DB": self.test_db,
            "PROJECT_APP_NAME": self.app_name,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        env.pop("DJANGO_SETTINGS_MODULE", None)  # pytest-django's; --settings decides
        command = [sys.executable, "-X", "dev", "-W", "error"]
        for warning in warnings:
            command += ["-W", warning]
        command += ["-m", "django", "test", f"--settings={settings}", "--noinput", *args]
        done = subprocess.run(
            command,
            cwd=self.folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            check=False,
        )
        report = done.stdout + done.stderr
        assert done.returncode == 0, report
        assert "Traceback" not in report, report
        assert "Exception ignored" not in report, report
        return report

    def databases(self) -> list[str]:
        """This run's test databases still on the server (the test database, clones)."""
        rows = query(
            self.server,
            "SELECT datname FROM pg_database WHERE datname LIKE %s ORDER BY datname",
            [self.test_db + "%"],
        )
        return [row[0] for row in rows]

    def sessions(self) -> list[tuple[Any, ...]]:
        """Sessions on this run's test databases, or opened by this run's processes."""
        return query(
            self.server,
            "SELECT pid, datname, application_name, state FROM pg_stat_activity "
            "WHERE datname LIKE %s OR application_name = %s",
            [self.test_db + "%", self.app_name],
        )

    def oid(self) -> int:
        rows = query(self.server, "SELECT oid FROM pg_database WHERE datname = %s", [self.test_db])
        return int(rows[0][0])

    def assert_clean(self) -> None:
        """No test database of this run remains, and no session lingers on one."""
        assert self.databases() == []
        assert wait_until(lambda: self.sessions() == []), self.sessions()


def assert_passed(report: str, tests: int = 4) -> None:
    """Django's runner ran ``tests`` tests, and all of them passed."""
    assert f"Ran {tests} tests" in report, report
    assert "\nOK" in report, report


@contextmanager
def running(server: Server, database_url: str, name: str) -> Iterator[Project]:
    tag = uuid.uuid4().hex[:12]
    project = Project(
        server=server,
        folder=HERE / name,
        database_url=database_url,
        test_db=f"test_hp_{name}_{tag}",
        app_name=f"hp-{name}-{tag}",
    )
    try:
        yield project
    finally:
        for leftover in project.databases():
            query(server, f'DROP DATABASE IF EXISTS "{leftover}" WITH (FORCE)')
