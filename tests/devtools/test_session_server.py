"""tests/conftest.py's choice of server, and what a session leaves behind on it (issue 10,
item 9): a pytest session of its own runs a small test against a private cluster."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.pgcluster import PostgresCluster

REPO = Path(__file__).resolve().parents[2]
UNREACHABLE = "postgresql://postgres@127.0.0.1:1/postgres"

# Keeps a connection to the database open, as a pool would at the end of a session.
INNER_TEST = """
import os

import psycopg2

held = []


def test_on_the_chosen_server(dsn):
    conn = psycopg2.connect(dsn)
    held.append(conn)
    with conn.cursor() as cursor:
        cursor.execute("SELECT current_database(), current_setting('port')")
        database, port = cursor.fetchone()
    with open(os.environ["INNER_REPORT"], "w") as report:
        report.write(f"{database} {port}")
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresCluster]:
    cluster = PostgresCluster(tmp_path_factory.mktemp("session") / "data")
    cluster.init()
    cluster.start()
    cluster.create_database("made_before")
    yield cluster
    cluster.destroy()


def run_session(tmp_path: Path, **env: str) -> str:
    """Run INNER_TEST in a session of its own with tests/conftest.py's fixtures; return what
    it reported ("database port").

    A basetemp of its own: a session using /tmp/pytest-of-<user> resets it to 0700, which would
    lock the server user (as root) out of this session's data directories below it.
    """
    (tmp_path / "test_inner.py").write_text(INNER_TEST, encoding="utf-8")
    (tmp_path / "pytest.ini").write_text("[pytest]\nfilterwarnings = error\n", encoding="utf-8")
    report = tmp_path / "report"
    base = {
        key: value
        for key, value in os.environ.items()
        if key not in ("HEROKUPOOL_TEST_DSN", "DATABASE_URL", "PYTEST_ADDOPTS")
    }
    result = subprocess.run(
        [sys.executable, "-X", "dev", "-m", "pytest", "-p", "tests.conftest", "-p", "no:django",
         "-p", "no:cacheprovider", "-c", str(tmp_path / "pytest.ini"), "--rootdir",
         str(tmp_path), "--basetemp", str(tmp_path / "basetemp"), "-q",
         str(tmp_path / "test_inner.py")],
        cwd=REPO, env={**base, "PYTHONPATH": str(REPO), "INNER_REPORT": str(report), **env},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return report.read_text(encoding="utf-8")


def databases(cluster: PostgresCluster) -> set[str]:
    return set(cluster.psql("SELECT datname FROM pg_database").splitlines())


def test_database_url_is_used_and_what_the_session_created_is_dropped(
    server: PostgresCluster, tmp_path: Path
) -> None:
    """As on Heroku CI, which sets only DATABASE_URL."""
    reported = run_session(tmp_path, DATABASE_URL=server.dsn())
    assert reported == f"herokupool_test {server.port}"
    assert "herokupool_test" not in databases(server)
    assert "made_before" in databases(server)


def test_herokupool_test_dsn_comes_before_database_url(
    server: PostgresCluster, tmp_path: Path
) -> None:
    reported = run_session(tmp_path, HEROKUPOOL_TEST_DSN=server.dsn(), DATABASE_URL=UNREACHABLE)
    assert reported == f"herokupool_test {server.port}"
    assert "herokupool_test" not in databases(server)


def test_a_database_that_existed_before_the_session_is_kept(
    server: PostgresCluster, tmp_path: Path
) -> None:
    server.create_database("herokupool_test")
    try:
        run_session(tmp_path, DATABASE_URL=server.dsn())
        assert "herokupool_test" in databases(server)
    finally:
        server.psql('DROP DATABASE "herokupool_test"')
