"""A private PgBouncer in front of a PostgreSQL server, for the tests, benchmarks and fault suite.

A :class:`PgBouncer` writes its own ``pgbouncer.ini`` into a fresh temporary directory, starts the
``pgbouncer`` binary (Debian's package, 1.18 here) in the foreground as a child process it owns, on
a free loopback port, and waits until the admin console answers::

    with PgBouncer("127.0.0.1", 5432, pool_mode="transaction", default_pool_size=3) as bouncer:
        conn = psycopg2.connect(bouncer.dsn("app"))
        pools = bouncer.show("POOLS")

Every database name is forwarded to the server's database of the same name (``* = host=...``).
The users listed in its auth file (``postgres`` by default) are also the console's admins.
With ``password`` (the server's password for them, e.g. ``PostgresCluster.password`` of
:mod:`devtools.pgcluster`) clients must authenticate with it (scram-sha-256), PgBouncer logs
into the server with it, and ``dsn()`` carries it; without, authentication is ``trust`` and
the server must trust them too.
A PgBouncer is no more open than the server behind it.

Startup parameters: libpq as psycopg2 and Django use it sends ``user``, ``database``,
``client_encoding`` (Django always sets UTF8) and ``application_name`` when configured; PgBouncer
1.18 tracks all of those itself. It refuses any other parameter unless it is listed in
``ignore_startup_parameters``; the default lists ``extra_float_digits`` (sent by JDBC and some
tools) only. ``options`` is not ignored by default: ignoring it would silently drop ``-c
setting=value`` instead of refusing it.

PgBouncer refuses to run as root. As root the binary runs as the ``postgres`` system user, and the
temporary directory is handed to that user; its parent (by default the system's temp directory)
must be reachable by it.

This module imports nothing from Django.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import psycopg2

from devtools.pgcluster import free_port

__all__ = ["PgBouncer", "PgBouncerError", "find_pgbouncer"]

#: Where Debian's package installs the binary; PATH is searched first.
DEBIAN_BINARY = "/usr/sbin/pgbouncer"
#: The unprivileged user the binary runs as when this process is root.
RUN_AS = "postgres"
POOL_MODES = ("session", "transaction", "statement")
INI_FILE = "pgbouncer.ini"
AUTH_FILE = "userlist.txt"
LOG_FILE = "pgbouncer.log"
PID_FILE = "pgbouncer.pid"
#: pgbouncer's own stderr (it writes there too when not daemonized; config errors only there).
STDERR_FILE = "stderr.log"

_PORT_IN_USE = ("Address already in use", "bind(")
_POLL_INTERVAL = 0.05


class PgBouncerError(RuntimeError):
    """PgBouncer could not be found, configured, started or queried."""


def find_pgbouncer() -> str | None:
    """The path of the ``pgbouncer`` binary (PATH, then Debian's /usr/sbin), or None."""
    found = shutil.which("pgbouncer")
    if found is not None:
        return found
    if os.access(DEBIAN_BINARY, os.X_OK):
        return DEBIAN_BINARY
    return None


def _run_as() -> pwd.struct_passwd | None:
    """The user to run pgbouncer as: None when not root, else the ``postgres`` user."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(RUN_AS)
    except KeyError:
        raise PgBouncerError(
            f"pgbouncer refuses to run as root and there is no {RUN_AS!r} system user to run it "
            "as; install the postgresql package or create that user."
        ) from None


def _ini_value(value: object) -> str:
    text = str(value)
    if "\n" in text or "\r" in text:
        raise ValueError(f"A pgbouncer.ini value cannot contain a line break: {text!r}.")
    return text


class PgBouncer:
    """One private PgBouncer forwarding every database to ``server_host:server_port``.

    ``pool_mode`` is "session", "transaction" or "statement"; ``default_pool_size`` is the most
    server connections per (database, user) pair; ``max_client_conn`` the most client
    connections. ``settings`` are written into ``[pgbouncer]`` after these and win (for example
    ``{"server_login_retry": "1"}``). ``port=None`` picks a free loopback port at the first
    ``start()`` and keeps it for later starts, so that ``dsn()`` stays valid across ``restart()``.

    Use as a context manager (start, then stop), or call ``start()``/``stop()``. Failures raise
    :class:`PgBouncerError` with the end of pgbouncer's log.
    """

    def __init__(
        self,
        server_host: str,
        server_port: int,
        *,
        pool_mode: str = "transaction",
        default_pool_size: int = 20,
        max_client_conn: int = 100,
        users: Iterable[str] = ("postgres",),
        password: str | None = None,
        ignore_startup_parameters: Iterable[str] = ("extra_float_digits",),
        settings: Mapping[str, object] | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        binary: str | None = None,
        parent_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if pool_mode not in POOL_MODES:
            raise ValueError(
                f"pool_mode must be one of {', '.join(POOL_MODES)}, not {pool_mode!r}."
            )
        if default_pool_size < 1:
            raise ValueError(f"default_pool_size ({default_pool_size}) must be at least 1.")
        if max_client_conn < 1:
            raise ValueError(f"max_client_conn ({max_client_conn}) must be at least 1.")
        self.server_host = server_host
        self.server_port = server_port
        self.pool_mode = pool_mode
        self.default_pool_size = default_pool_size
        self.max_client_conn = max_client_conn
        self.users = tuple(users)
        if not self.users:
            raise ValueError("users must name at least one user.")
        if password is not None and ('"' in password or "\n" in password):
            raise ValueError("password cannot contain a double quote or a line break.")
        self.password = password
        self.ignore_startup_parameters = tuple(ignore_startup_parameters)
        self.settings = {name: _ini_value(value) for name, value in (settings or {}).items()}
        self.host = host
        self._requested_port = port
        self._port = port
        self.binary = binary or find_pgbouncer()
        self.parent_dir = parent_dir
        self.directory: Path | None = None
        """The temporary directory holding the ini, auth file, log and pid file (while started)."""
        self._process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        port = self._port if self._port is not None else "auto"
        state = "running" if self.is_running() else "stopped"
        return (
            f"PgBouncer({self.host}:{port} -> {self.server_host}:{self.server_port}, "
            f"{self.pool_mode}, pool size {self.default_pool_size}, {state})"
        )

    @property
    def port(self) -> int:
        """The port pgbouncer listens on; chosen by ``start()`` when none was given."""
        if self._port is None:
            raise PgBouncerError("the port is picked by start(); call start() first.")
        return self._port

    @property
    def pid(self) -> int | None:
        """The pgbouncer process's id while it runs."""
        return self._process.pid if self.is_running() and self._process is not None else None

    @property
    def logfile(self) -> Path:
        if self.directory is None:
            raise PgBouncerError("pgbouncer has no log before start().")
        return self.directory / LOG_FILE

    def dsn(self, dbname: str = "postgres", user: str | None = None) -> str:
        """A libpq URL for ``dbname`` through this PgBouncer (the server database of that name)."""
        user = self.users[0] if user is None else user
        host = f"[{self.host}]" if ":" in self.host else self.host
        userinfo = quote(user, safe="")
        if self.password is not None and user in self.users:
            userinfo += ":" + quote(self.password, safe="")
        return f"postgresql://{userinfo}@{host}:{self.port}/{quote(dbname, safe='')}"

    # ------------------------------------------------------------------ lifecycle

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start pgbouncer and wait until its console answers; no-op when already running.

        Raises :class:`PgBouncerError` when the binary is missing, exits, or does not answer
        within ``timeout`` seconds.
        """
        if self.is_running():
            return
        if self.binary is None:
            raise PgBouncerError(
                "the pgbouncer binary was not found on PATH or at /usr/sbin/pgbouncer; "
                "install it (apt-get install pgbouncer)."
            )
        user = _run_as()
        # A port picked here is retried once taken by someone else; a requested one is not.
        attempts = 1 if self._requested_port is not None else 3
        for attempt in range(1, attempts + 1):
            if self._port is None or attempt > 1:
                self._port = free_port(self.host)
            directory = self._prepare_directory(user)
            error = self._start_once(self.binary, directory, user, timeout)
            if error is None:
                return
            retry = attempt < attempts and any(text in error for text in _PORT_IN_USE)
            self._remove_directory()
            if not retry:
                raise PgBouncerError(error)

    def stop(self, timeout: float = 10.0) -> None:
        """Shut pgbouncer down (SIGTERM: immediate shutdown, clients disconnected), wait for it,
        and remove its directory. Kills it after ``timeout`` seconds. Idempotent."""
        process, self._process = self._process, None
        if process is not None:
            _terminate(process, timeout)
        self._remove_directory()

    def restart(self, timeout: float = 10.0) -> None:
        """Stop (clients are disconnected) and start again on the same port."""
        self.stop(timeout)
        self.start(timeout)

    def __enter__(self) -> PgBouncer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ console

    def show(self, what: str) -> list[dict[str, Any]]:
        """Run ``SHOW <what>`` (POOLS, SERVERS, CLIENTS, STATS, ...) on the admin console;
        return one dict per row, keyed by column name."""
        if not what.replace("_", "").isalpha():
            raise ValueError(f"not a SHOW subject: {what!r}")
        conn = psycopg2.connect(self.dsn("pgbouncer"), connect_timeout=5)
        try:
            conn.autocommit = True  # the console knows no BEGIN
            with conn.cursor() as cursor:
                cursor.execute(f"SHOW {what}")
                columns = [column.name for column in cursor.description or ()]
                return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
        finally:
            conn.close()

    def server_connections(self, dbname: str) -> int:
        """How many server connections pgbouncer holds for ``dbname`` (all users, all states)."""
        return sum(
            int(row["sv_active"]) + int(row["sv_idle"]) + int(row["sv_used"])
            + int(row["sv_tested"]) + int(row["sv_login"])
            for row in self.show("POOLS")
            if row["database"] == dbname
        )  # fmt: skip

    # ------------------------------------------------------------------ internals

    def ini(self, directory: Path) -> str:
        """The text of the pgbouncer.ini written into ``directory``."""
        settings: dict[str, str] = {
            "listen_addr": self.host,
            "listen_port": str(self._port if self._port is not None else 0),
            # No unix socket: nothing to clean up, no clash with the system's /tmp/.s.PGSQL.6432.
            "unix_socket_dir": "",
            "auth_type": "trust" if self.password is None else "scram-sha-256",
            "auth_file": str(directory / AUTH_FILE),
            "admin_users": ",".join(self.users),
            "pool_mode": self.pool_mode,
            "default_pool_size": str(self.default_pool_size),
            "max_client_conn": str(self.max_client_conn),
            "ignore_startup_parameters": ",".join(self.ignore_startup_parameters),
            "logfile": str(directory / LOG_FILE),
            "pidfile": str(directory / PID_FILE),
            "syslog": "0",
            **self.settings,
        }
        lines = [
            "; Written by devtools.pgbouncer: a private PgBouncer for tests.",
            "[databases]",
            f"* = host={self.server_host} port={self.server_port}",
            "",
            "[pgbouncer]",
            *(f"{name} = {value}" for name, value in settings.items()),
        ]
        return "\n".join(lines) + "\n"

    def _prepare_directory(self, user: pwd.struct_passwd | None) -> Path:
        directory = Path(tempfile.mkdtemp(prefix="hp-pgbouncer-", dir=self.parent_dir))
        self.directory = directory
        (directory / INI_FILE).write_text(self.ini(directory), encoding="utf-8")
        # Each user must be listed, even for trust. The password (plain text: PgBouncer needs it
        # to log into the server) is for this user only: the directory is 0700 (mkdtemp).
        password = self.password or ""
        auth_file = directory / AUTH_FILE
        auth_file.write_text(
            "".join(f'"{name}" "{password}"\n' for name in self.users), encoding="utf-8"
        )
        auth_file.chmod(0o600)
        if user is not None:
            # pgbouncer (as the unprivileged user) reads the ini and writes its log and pid file.
            for path in (directory, directory / INI_FILE, directory / AUTH_FILE):
                os.chown(path, user.pw_uid, user.pw_gid)
        return directory

    def _start_once(
        self, binary: str, directory: Path, user: pwd.struct_passwd | None, timeout: float
    ) -> str | None:
        """Run pgbouncer once: None when it answers, else why it did not."""
        with (directory / STDERR_FILE).open("wb") as stderr:
            process = subprocess.Popen(
                [binary, str(directory / INI_FILE)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=subprocess.STDOUT,
                cwd=directory,
                env={key: value for key, value in os.environ.items() if not key.startswith("PG")},
                user=None if user is None else user.pw_uid,
                group=None if user is None else user.pw_gid,
                extra_groups=None if user is None else [],
                # Its own session: a Ctrl-C meant for the test run is not delivered to it too.
                start_new_session=True,
            )
        self._process = process
        deadline = time.monotonic() + timeout
        last_error = "no answer yet"
        while True:
            if process.poll() is not None:
                self._process = None
                return f"pgbouncer exited with status {process.returncode}:{self._log_tail()}"
            try:
                self.show("VERSION")
            except psycopg2.Error as error:
                last_error = str(error).strip()
            else:
                return None
            if time.monotonic() >= deadline:
                self._process = None
                _terminate(process, 5.0)
                return (
                    f"pgbouncer on {self.host}:{self._port} did not answer within {timeout:g} s "
                    f"({last_error}):{self._log_tail()}"
                )
            time.sleep(_POLL_INTERVAL)

    def _remove_directory(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def _log_tail(self, lines: int = 20) -> str:
        if self.directory is None:
            return ""
        text = ""
        for name in (STDERR_FILE, LOG_FILE):
            with contextlib.suppress(OSError):
                text = (self.directory / name).read_text(encoding="utf-8", errors="replace")
                if text.strip():
                    break
        tail = text.strip().splitlines()[-lines:]
        return "\n" + "\n".join(tail) if tail else " (no output)"


def _terminate(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM (pgbouncer's immediate shutdown) our own child, then SIGKILL it if it lingers."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
