"""The fault suite's moving parts: the app under gunicorn, the database checks and the analysis
of a load run around a fault.

Every process here is started by the test and stopped by it, by pid: the gunicorn master (in a
session of its own, so its workers can be found and, as a last resort, killed with it) and, via
devtools.pgcluster, a private PostgreSQL in the test's tmp_path.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2

from tests.faults.loadgen import DATABASE_OPS, Result

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = "tests.faults.app.settings"
GUNICORN_CONF = Path(__file__).resolve().parent / "app" / "gunicorn_conf.py"
APP_DB = "app"
HOST = "127.0.0.1"

WORKERS = 2
THREADS = 4
MAX_CONNS = 2  # < THREADS: requests queue in each worker's pool
TIMEOUT = 2.0  # POOL_TIMEOUT; the backend derives connect_timeout = 2 s from it
#: A failure must come within the pool's TIMEOUT / libpq's connect_timeout plus this much.
SLACK = 2.0
#: From the server accepting connections again to the first request served: the target is
#: under a second; the assertion is generous, for a loaded 2-core machine.
RECOVERY_TARGET = 1.0
RECOVERY_BOUND = 3.0

# Variables of the developer's shell or CI that would change what the app does.
_SCRUBBED_PREFIXES = ("POOL_", "GUNICORN_", "PYTHON", "HEROKUPOOL_", "DJANGO_")
_SCRUBBED = frozenset({"DATABASE_URL", "DYNO", "PORT", "WEB_CONCURRENCY"})


# --------------------------------------------------------------------------- the database


def connect(cluster: Any, dbname: str = APP_DB) -> Any:
    """An autocommit superuser connection to ``cluster`` (its dsn() carries the password)."""
    conn = psycopg2.connect(cluster.dsn(dbname), connect_timeout=5)
    conn.autocommit = True
    return conn


def query(cluster: Any, sql: str, params: Iterable[Any] = (), dbname: str = APP_DB) -> list[Any]:
    """Run one statement on a fresh observer connection (the server may have restarted since
    the last look) and return its rows."""
    conn = connect(cluster, dbname)
    try:
        with conn.cursor() as cursor:
            cursor.execute(sql, list(params))
            return cursor.fetchall() if cursor.description else []
    finally:
        conn.close()


def app_backends(cluster: Any, user: str | None = None) -> set[int]:
    """Pids of the client backends on the app's database, the observer's own excluded."""
    sql = (
        "SELECT pid FROM pg_stat_activity WHERE datname = %s "
        "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
    )
    params: list[Any] = [APP_DB]
    if user is not None:
        sql += " AND usename = %s"
        params.append(user)
    return {row[0] for row in query(cluster, sql, params)}


def describe_backends(cluster: Any, user: str) -> str:
    """The app's backends, one line each, with the local process that holds the client end of
    each one's socket: what an assertion on their number shows when it fails."""
    rows = query(
        cluster,
        "SELECT pid, backend_start, state, client_port, left(query, 60) FROM pg_stat_activity "
        "WHERE datname = %s AND usename = %s ORDER BY backend_start",
        [APP_DB, user],
    )
    owners = _socket_owners()
    return "\n".join(
        f"backend {pid} since {start:%H:%M:%S.%f} {state} port {port} "
        f"held by {owners.get(port, '?')}: {sql!r}"
        for pid, start, state, port, sql in rows
    )


def _socket_owners() -> dict[int, str]:
    """Local TCP port -> "pid (command line)" of the process holding that socket (Linux)."""
    inodes: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text(encoding="ascii").splitlines()[1:]:
                fields = line.split()
                inodes[fields[9]] = int(fields[1].rsplit(":", 1)[1], 16)
    owners: dict[int, str] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    argv = (proc / "cmdline").read_bytes().replace(b"\0", b" ")[:80]
                    owners[inodes[target[8:-1]]] = f"{proc.name} ({argv.decode(errors='replace')})"
    return owners


_READY = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) UTC .*ready to accept connections", re.M
)


def ready_at(cluster: Any, fallback: float) -> float:
    """When the server last became ready to accept connections, on this process's monotonic
    clock: the timestamp (ms) of PostgreSQL's own log line, converted. ``fallback`` (say, when
    ``pg_ctl start -w`` returned: it checks only every 100 ms) if the line is not found.
    """
    text = cluster.logfile.read_text(encoding="utf-8", errors="replace")
    found = _READY.findall(text)
    if not found:
        return fallback
    wall = datetime.strptime(found[-1], "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC).timestamp()
    ready = wall - (time.time() - time.monotonic())
    # The log's clock and ours agree to well under a millisecond; never later than pg_ctl.
    return min(ready, fallback)


def terminate_backends(
    conn: Any, condition: str, params: Iterable[Any] = ()
) -> tuple[Window, set[int]]:
    """pg_terminate_backend every backend matching ``condition`` (all signalled by one statement
    on ``conn``), then wait until each has exited, so its socket is closed.

    Returns the kill's :class:`Window` (from the statement to the last exit) and the pids.
    pg_terminate_backend's own wait would poll each backend in turn, every 100 ms: a window
    ten times longer, and a weaker claim about the requests in flight during it.
    """
    with conn.cursor() as cursor:
        begin = time.monotonic()
        cursor.execute(
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE pid <> pg_backend_pid() AND ({condition})",
            list(params),
        )
        pids = {pid for pid, _ in cursor.fetchall()}  # false: it had exited since the scan
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            raise TimeoutError(f"backends {sorted(pids)} did not exit within 10 s")
        time.sleep(0.001)
    return Window(begin, time.monotonic()), pids


# --------------------------------------------------------------------------- the app


@dataclass
class AppServer:
    """The fault app under gunicorn: ``--preload``, gthread, WORKERS x THREADS, on a free
    loopback port, with DATABASE_URL and POOL_* as given."""

    database_url: str
    log: Path
    pool: Mapping[str, str] = field(default_factory=dict)
    workers: int = WORKERS
    threads: int = THREADS
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in _SCRUBBED and not key.startswith(_SCRUBBED_PREFIXES)
        }
        env.update(
            DJANGO_SETTINGS_MODULE=SETTINGS,
            DATABASE_URL=self.database_url,
            PYTHONUNBUFFERED="1",
            POOL_MAX_CONNS=str(MAX_CONNS),
            POOL_TIMEOUT=str(TIMEOUT),
        )
        env.update(self.pool)
        return env

    def start(self, limit: float = 30.0) -> None:
        from devtools.pgcluster import free_port

        self.port = free_port(HOST)
        command = [
            sys.executable, "-W", "error", "-m", "gunicorn",
            "--config", str(GUNICORN_CONF), "--preload", "--worker-class", "gthread",
            "--workers", str(self.workers), "--threads", str(self.threads),
            "--bind", f"{HOST}:{self.port}", "tests.faults.app.wsgi",
        ]  # fmt: skip
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=self.env(), stdin=subprocess.DEVNULL, stdout=sink,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited ({self.process.returncode}):\n{self.output()}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                if self.get("/healthz", timeout=2)[0] == 200 and len(self.worker_pids()) == (
                    self.workers
                ):
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"gunicorn did not answer /healthz within {limit:g} s:\n{self.output()}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def worker_pids(self) -> set[int]:
        """The master's children right now (Linux: /proc/<pid>/task/<pid>/children)."""
        try:
            text = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text(encoding="ascii")
        except OSError:
            return set()
        return {int(pid) for pid in text.split()}

    def request(
        self, method: str, path: str, timeout: float = 10.0
    ) -> tuple[int, dict[str, Any] | None]:
        connection = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            connection.request(method, path, headers={"Connection": "close"})
            response = connection.getresponse()
            raw = response.read()
            if response.getheader("Content-Type", "").startswith("application/json"):
                return response.status, json.loads(raw)
            return response.status, None
        finally:
            connection.close()

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, dict[str, Any] | None]:
        return self.request("GET", path, timeout)

    def stats(self, limit: float = 10.0) -> dict[int, dict[str, Any]]:
        """``/stats`` of every worker: asked until each worker has answered once (the kernel
        picks which worker accepts each connection)."""
        wanted = self.worker_pids()
        found: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + limit
        while set(found) != wanted:
            if time.monotonic() > deadline:
                raise TimeoutError(f"/stats answered by {sorted(found)}, not {sorted(wanted)}")
            status, body = self.get("/stats")
            assert status == 200, (status, body)
            assert body is not None
            found.setdefault(body["pid"], body)
        return found

    def stop(self, limit: float = 20.0) -> None:
        """SIGTERM to the master (it stops its workers gracefully), then SIGKILL to the session
        it leads if it has not exited in time; the workers this server had must all be gone."""
        if self.process is None:
            return
        workers = self.worker_pids()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        try:
            self.process.wait(limit)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)  # the session this master leads
            self.process.wait()
        for pid in workers:  # exited with the master, or killed with its session above
            deadline = time.monotonic() + 5
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
        self.process = None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def rss_kb(pid: int) -> int | None:
    """VmRSS of ``pid`` in kB (/proc/<pid>/status)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


# --------------------------------------------------------------------------- analysis


@dataclass
class Window:
    """A fault, on the test's monotonic clock: from ``begin`` (the fault is applied) to ``end``
    (the server accepts again, or the kill has completed)."""

    begin: float
    end: float


def unexplained_failures(results: Iterable[Result], windows: Iterable[Window]) -> list[Result]:
    """Failed requests that neither were in flight at a fault nor started during one: the
    failures the pool promises not to cause."""
    windows = list(windows)
    return [r for r in results if not r.ok and not any(r.overlaps(w.begin, w.end) for w in windows)]


def first_success_after(results: Iterable[Result], moment: float) -> Result | None:
    """The first database request to succeed after ``moment`` (by when it finished)."""
    served = [r for r in results if r.ok and r.op in DATABASE_OPS and r.end > moment]
    return min(served, key=lambda r: r.end, default=None)


def describe(results: Iterable[Result], limit: int = 8) -> str:
    """A few failures, for assertion messages."""
    lines = [
        f"  {r.op} start={r.start:.3f} latency={r.latency * 1000:.0f}ms status={r.status}: "
        f"{r.message.splitlines()[0] if r.message else ''}"
        for r in list(results)[:limit]
    ]
    return "\n".join(lines)


_PASSWORD_LIKE = re.compile(r"password=\S+|://[^:/@\s]+:[^@\s]+@", re.I)


def leaks_password(text: str, *passwords: str) -> bool:
    return any(p and p in text for p in passwords) or bool(_PASSWORD_LIKE.search(text))


def check_rows(cluster: Any, results: Iterable[Result]) -> dict[str, int]:
    """Nothing committed is lost, nothing rolled back is kept.

    - every write/txn the app answered 200 for is in the table, under the ids it returned;
    - a row whose request failed may exist only if that request failed after its commit
      (a write request that got no 200), never for the error view;
    - a transaction's two rows and its counter increment are all there or all absent.
    Returns the figures: rows in the table, committed writes acknowledged, extra rows.
    """
    results = list(results)
    rows = query(cluster, "SELECT id, token, kind FROM faults_item")
    counter = query(cluster, "SELECT value FROM faults_counter WHERE name = 'txn'")[0][0]
    by_token: dict[str, list[tuple[int, str]]] = {}
    for row_id, token, kind in rows:
        by_token.setdefault(token, []).append((row_id, kind))
    acknowledged = [r for r in results if r.ok and r.op in ("write", "txn")]
    unacknowledged = {r.token for r in results if not r.ok and r.op in ("write", "txn")}

    for r in acknowledged:
        assert r.token in by_token, f"{r.op} {r.token} was acknowledged but its row is missing"
        stored = sorted(row_id for row_id, _ in by_token[r.token])
        assert stored == sorted(r.body["ids"]), (r.token, stored, r.body)  # type: ignore[index]
    acknowledged_tokens = {r.token for r in acknowledged}
    extra = set(by_token) - acknowledged_tokens
    assert extra <= unacknowledged, f"rows no request wrote or committed: {sorted(extra)[:10]}"
    kinds = {kind for entries in by_token.values() for _, kind in entries}
    assert "error" not in kinds, "a row of the error view survived its rollback"
    txn_tokens = {token for token, entries in by_token.items() if entries[0][1] == "txn"}
    for token in txn_tokens:
        assert len(by_token[token]) == 2, f"transaction {token} is half there: {by_token[token]}"
    assert counter == len(txn_tokens), (counter, len(txn_tokens))
    return {
        "rows": len(rows),
        "acknowledged": sum(len(r.body["ids"]) for r in acknowledged),  # type: ignore[index]
        "extra": sum(len(by_token[token]) for token in extra),
    }
