"""End to end, under load: what an app on herokupool sees when its database restarts, loses its
backends, goes away, fills up or changes its password (issue 6, "Fault tests").

Each test runs its own PostgreSQL (a copy of the session's migrated template) and its own
gunicorn (--preload, gthread, 2 workers x 4 threads, POOL_MAX_CONNS=2, POOL_TIMEOUT=2) and drives
it with loadgen.Load from 6 client threads. What is asserted is what a user of the app sees:
HTTP statuses and latencies, the worker and backend pid behind every response, the rows in the
table, and each worker's pool stats; the figures are printed at the end of the run.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterable
from typing import Any

import psycopg2
import pytest

from tests.faults.conftest import Figures, MakeCluster, StartApp
from tests.faults.harness import (
    APP_DB,
    HOST,
    MAX_CONNS,
    RECOVERY_BOUND,
    SLACK,
    THREADS,
    TIMEOUT,
    WORKERS,
    AppServer,
    Window,
    app_backends,
    check_rows,
    connect,
    describe,
    describe_backends,
    first_success_after,
    leaks_password,
    query,
    ready_at,
    terminate_backends,
    unexplained_failures,
)
from tests.faults.loadgen import DATABASE_OPS, Load, Result
from tests.helpers import assert_counted_once

pytestmark = [pytest.mark.slow, pytest.mark.integration]

CLIENTS = 6
MIX = {"read": 5, "write": 3, "txn": 2, "sleep": 1, "healthz": 1}
#: How long the load runs before a fault (warm pools) and after it (recovery, then steady).
WARM_UP = 1.0
AFTER = 2.5

# What the app's 503 says when the server is restarting, gone or has killed the backend.
UNAVAILABLE = re.compile(
    r"connection refused|could not connect|server closed the connection|terminating connection"
    r"|shutting down|starting up|not yet accepting|connection already closed|timeout expired"
    r"|no connection to the server|timed out after|connection reset by peer",
    re.I,
)


def new_load(app: AppServer, **overrides: Any) -> Load:
    settings: dict[str, Any] = {"mix": MIX, "clients": CLIENTS, "max_seconds": 60}
    settings.update(overrides)
    return Load(HOST, app.port, **settings)


def db_successes(results: Iterable[Result], since: float) -> list[Result]:
    return [r for r in results if r.ok and r.op in DATABASE_OPS and r.start >= since]


def check_after(
    app: AppServer, cluster: Any, results: list[Result], workers: set[int], since: float
) -> dict[str, int]:
    """What must hold once a fault is over: the same workers (none restarted), every worker
    serving again, no request failing, the pools consistent and within MAX_CONNS."""
    assert app.worker_pids() == workers, "a gunicorn worker was restarted"
    served_by = {r.worker for r in results if r.worker is not None}
    assert served_by <= workers, f"responses from unknown workers {served_by - workers}"
    recovered = {r.worker for r in db_successes(results, since)}
    assert recovered == workers, f"only workers {recovered} of {workers} served after the fault"
    failed_after = [r for r in results if r.start >= since and not r.ok]
    assert failed_after == [], "requests failed after recovery:\n" + describe(failed_after)
    assert len(app_backends(cluster)) <= WORKERS * MAX_CONNS
    totals: dict[str, int] = {}
    for pid, body in app.stats().items():
        stats = body["stats"]["default"]
        assert stats["in_use"] == 0, (pid, stats)
        assert stats["borrows"] == stats["releases"] + stats["in_use"], (pid, stats)
        assert_counted_once(stats, pid)
        for key in ("connections_lost", "connections_discarded", "connections_failed"):
            totals[key] = totals.get(key, 0) + stats[key]
    return totals


def check_failures_are_clear(failures: Iterable[Result]) -> float:
    """Every failure is the app's 503 naming the database problem, and came fast. Returns the
    slowest failure's latency."""
    slowest = 0.0
    for r in failures:
        assert r.status == 503, f"{r.op} got {r.status} (not the app's 503): {r.message}"
        assert UNAVAILABLE.search(r.message), r.message
        # A request in flight may have spent its own pg_sleep first.
        assert r.latency < TIMEOUT + SLACK + 0.3, describe([r])
        slowest = max(slowest, r.latency)
    return slowest


# --------------------------------------------------------------------------- 1. restart


def test_restart_during_load(
    make_cluster: MakeCluster, start_app: StartApp, figures: Figures
) -> None:
    """pg_ctl restart -m fast under load: only requests in flight at the stop, or sent while the
    server was down, fail; the first request after it is back is served within a second, by a
    new backend, in the same worker.

    Then a quiet restart: the load pauses (nothing in flight, nothing sent while the server is
    down) so that every pooled connection outlives its server idle; after it not one request
    may fail. Under continuous load the requests sent during the downtime drain the dead
    connections; only the quiet restart shows that the pool never hands one out.
    """
    cluster = make_cluster()
    app = start_app(cluster.dsn(APP_DB))
    workers = app.worker_pids()
    with new_load(app) as load:
        load.wait_for(50)
        time.sleep(WARM_UP)
        old = app_backends(cluster)
        begin = time.monotonic()
        cluster.stop("fast")
        down = time.monotonic()
        cluster.start()
        started = time.monotonic()
        accepting = ready_at(cluster, started)
        time.sleep(AFTER)

        load.pause()
        pooled = app_backends(cluster)  # idle in the pools now
        quiet_begin = time.monotonic()
        cluster.restart("fast")
        quiet_back = time.monotonic()
        load.resume()
        time.sleep(AFTER / 2)
    results = load.results
    old |= {r.backend for r in results if r.end <= begin and r.backend}
    assert pooled, "no pooled connection was idle at the quiet restart"
    quiet = [r for r in results if r.start >= quiet_begin]
    quiet_failures = [r for r in quiet if not r.ok]
    assert quiet_failures == [], "failures after a quiet restart:\n" + describe(quiet_failures)
    assert not {r.backend for r in quiet} & pooled, "a connection from before it was handed out"
    quiet_first = first_success_after(quiet, quiet_back)
    assert quiet_first is not None
    quiet_recovery = quiet_first.end - quiet_back

    window = Window(begin, started)
    unexplained = unexplained_failures(results, [window])
    assert unexplained == [], "failures outside the restart:\n" + describe(unexplained)
    failures = [r for r in results if not r.ok]
    in_flight = [r for r in results if r.in_flight(begin) and r.op in DATABASE_OPS]
    failed_in_flight = [r for r in failures if r.start < begin]
    failed_down = [r for r in failures if r.start >= begin]
    assert len(failed_in_flight) <= len(in_flight) <= WORKERS * THREADS
    slowest = check_failures_are_clear(failures)

    first = first_success_after(results, down)
    assert first is not None
    recovery = first.end - accepting
    assert recovery < RECOVERY_BOUND, f"first success {recovery:.3f} s after the server was back"
    stale = [r for r in db_successes(results, started) if r.backend in old]
    assert stale == [], "a connection from before the restart was handed out"
    totals = check_after(app, cluster, results, workers, started)
    rows = check_rows(cluster, results)
    figures(
        requests=len(results),
        failed=len(failures),
        in_flight=len(in_flight),
        failed_in_flight=len(failed_in_flight),
        failed_down=len(failed_down),
        down_ms=round((accepting - begin) * 1000),
        slowest_failure_ms=round(slowest * 1000),
        recovery_ms=round(recovery * 1000, 1),
        rows_checked=rows["rows"],
        extra_rows=rows["extra"],
        pool=totals,
        quiet_restart_requests=len(quiet),
        quiet_restart_stale_pooled=len(pooled),
        quiet_restart_first_ms=round(quiet_recovery * 1000, 1),
        notes=(
            f"server down {(accepting - begin) * 1000:.0f} ms; {len(failed_in_flight)} of "
            f"{len(in_flight)} in-flight requests failed, {len(failed_down)} refused while down; "
            f"first success {recovery * 1000:.0f} ms after accepting. Quiet restart with "
            f"{len(pooled)} idle pooled connections: {len(quiet)} requests after it, 0 failed, "
            f"first served {quiet_recovery * 1000:.0f} ms after. Pools: {totals}"
        ),
    )


# ------------------------------------------------------------- 2. pg_terminate_backend


KILLS = 5
KILL_INTERVAL = 0.3


def test_terminate_every_pooled_backend_repeatedly(
    make_cluster: MakeCluster, start_app: StartApp, figures: Figures
) -> None:
    """pg_terminate_backend on every backend of the app, 5 times 0.3 s apart: only requests in
    flight at a kill fail; after each kill no killed backend serves again."""
    cluster = make_cluster()
    app = start_app(cluster.dsn(APP_DB))
    workers = app.worker_pids()
    kills: list[tuple[Window, set[int]]] = []
    observer = connect(cluster)
    try:
        with new_load(app) as load:
            load.wait_for(50)
            time.sleep(WARM_UP)
            for _ in range(KILLS):
                kills.append(
                    terminate_backends(
                        observer, "datname = %s AND backend_type = 'client backend'", [APP_DB]
                    )
                )
                time.sleep(KILL_INTERVAL)
            time.sleep(AFTER)
    finally:
        observer.close()
    results = load.results
    windows = [window for window, _ in kills]

    unexplained = unexplained_failures(results, windows)
    assert unexplained == [], "failures outside the kills:\n" + describe(unexplained)
    failures = [r for r in results if not r.ok]
    in_flight = sum(
        1 for w in windows for r in results if r.op in DATABASE_OPS and r.overlaps(w.begin, w.end)
    )
    assert len(failures) <= in_flight
    slowest = check_failures_are_clear(failures)
    assert all(pids for _, pids in kills), "a kill found no pooled backend to kill"

    recoveries = []
    for window, killed in kills:
        first = first_success_after(results, window.end)
        assert first is not None
        recoveries.append(first.end - window.end)
        stale = [r for r in db_successes(results, window.end) if r.backend in killed]
        assert stale == [], f"a killed backend served again: {describe(stale)}"
    assert max(recoveries) < RECOVERY_BOUND
    totals = check_after(app, cluster, results, workers, windows[-1].end)
    rows = check_rows(cluster, results)
    killed_total = sum(len(pids) for _, pids in kills)
    longest_kill = max(w.end - w.begin for w in windows)
    figures(
        requests=len(results),
        failed=len(failures),
        in_flight=in_flight,
        slowest_failure_ms=round(slowest * 1000),
        recovery_ms=round(max(recoveries) * 1000, 1),
        recovery_mean_ms=round(sum(recoveries) / len(recoveries) * 1000, 1),
        backends_killed=killed_total,
        longest_kill_ms=round(longest_kill * 1000),
        rows_checked=rows["rows"],
        extra_rows=rows["extra"],
        pool=totals,
        notes=(
            f"{KILLS} kills of {killed_total} backends in all (each kill took up to "
            f"{longest_kill * 1000:.0f} ms); {len(failures)} failed of the {in_flight} requests "
            f"in flight during a kill; first success after a kill within "
            f"{max(recoveries) * 1000:.0f} ms (mean {sum(recoveries) / len(recoveries) * 1000:.0f})"
        ),
    )


# --------------------------------------------------------------------------- 3. outage


OUTAGE = 3.0
# A new connection's refusal. While it starts, PostgreSQL (15 and 18 alike) also closes some new
# connections without a word: the driver then says "connection to server at ... failed: server
# closed the connection unexpectedly", which is a refusal too. The same words after a pooled
# connection's query ("consuming input failed: ...") would be a dead connection lent in the
# outage, and do not match.
REFUSED = re.compile(
    r"connection refused|could not connect|shutting down|starting up"
    r'|connection to server at "[^"]*", port \d+ failed: server closed the connection unexpectedly',
    re.I,
)


def test_outage_fails_fast_and_recovers(
    make_cluster: MakeCluster, start_app: StartApp, figures: Figures
) -> None:
    """The server is stopped for 3 s under load: every database request in the outage gets the
    app's 503 within TIMEOUT + 2 s (no hung worker: /healthz keeps answering at once), and
    service comes back by itself."""
    cluster = make_cluster()
    app = start_app(cluster.dsn(APP_DB))
    workers = app.worker_pids()
    with new_load(app) as load:
        load.wait_for(50)
        time.sleep(WARM_UP)
        begin = time.monotonic()
        cluster.stop("fast")
        down = time.monotonic()
        time.sleep(OUTAGE)
        cluster.start()
        started = time.monotonic()
        accepting = ready_at(cluster, started)
        time.sleep(AFTER)
    results = load.results

    unexplained = unexplained_failures(results, [Window(begin, started)])
    assert unexplained == [], "failures outside the outage:\n" + describe(unexplained)
    failures = [r for r in results if not r.ok]
    slowest = check_failures_are_clear(failures)
    during = [r for r in results if down <= r.start and r.end <= accepting]
    during_db = [r for r in during if r.op in DATABASE_OPS]
    assert during_db, "no database request was made during the outage"
    assert all(not r.ok for r in during_db), "a request succeeded while the server was down"
    for r in during_db:
        assert REFUSED.search(r.message), r.message
    health = [r for r in during if r.op == "healthz"]
    assert health, "no /healthz during the outage"
    assert all(r.ok for r in health), describe([r for r in health if not r.ok])
    slowest_health = max(r.latency for r in health)
    assert slowest_health < 1.0, "a worker stopped answering during the outage"

    first = first_success_after(results, down)
    assert first is not None
    recovery = first.end - accepting
    assert recovery < RECOVERY_BOUND
    totals = check_after(app, cluster, results, workers, started)
    rows = check_rows(cluster, results)
    pool_timeouts = sum("timed out after" in r.message for r in failures)
    figures(
        requests=len(results),
        failed=len(failures),
        failed_down=len(during_db),
        slowest_failure_ms=round(slowest * 1000),
        healthz_during_outage=len(health),
        slowest_healthz_ms=round(slowest_health * 1000, 1),
        pool_timeouts=pool_timeouts,
        recovery_ms=round(recovery * 1000, 1),
        rows_checked=rows["rows"],
        extra_rows=rows["extra"],
        pool=totals,
        notes=(
            f"{OUTAGE:g} s outage: {len(during_db)} database requests got 503 (slowest "
            f"{slowest * 1000:.0f} ms, {pool_timeouts} of them pool timeouts), {len(health)} "
            f"/healthz answered (slowest {slowest_health * 1000:.0f} ms); first success "
            f"{recovery * 1000:.0f} ms after accepting"
        ),
    )


# --------------------------------------------------------------------------- 4. full server


MAX_CONNECTIONS = 10


def test_full_server_refuses_clearly_and_recovers(
    make_cluster: MakeCluster, start_app: StartApp, figures: Figures
) -> None:
    """Another client holds every connection slot: each database request gets the app's 503
    saying "too many clients" within TIMEOUT + 2 s; once the slots are freed the pools open
    their connections and every request is served."""
    cluster = make_cluster(max_connections=str(MAX_CONNECTIONS), superuser_reserved_connections="0")
    app = start_app(cluster.dsn(APP_DB))
    workers = app.worker_pids()
    fillers: list[Any] = []
    try:
        while len(fillers) < MAX_CONNECTIONS:  # take every slot, as another client would
            fillers.append(connect(cluster))
        with pytest.raises(psycopg2.OperationalError, match="too many clients"):
            fillers.append(connect(cluster))
        with new_load(app) as load:
            time.sleep(2.0)
            full_until = time.monotonic()  # from here on slots start to free up
            observer = fillers.pop(0)  # kept: it watches the others' backends exit
            for conn in fillers:
                conn.close()
            fillers = [observer]
            with observer.cursor() as cursor:
                deadline = time.monotonic() + 5
                while True:  # a slot is free once its backend has exited
                    cursor.execute(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE backend_type = 'client backend'"
                    )
                    if cursor.fetchone()[0] < MAX_CONNECTIONS - WORKERS * MAX_CONNS:
                        break
                    assert time.monotonic() < deadline
                    time.sleep(0.005)
            freed = time.monotonic()
            time.sleep(AFTER)
    finally:
        for conn in fillers:
            conn.close()
    results = load.results
    refused = [r for r in results if r.end <= full_until and r.op in DATABASE_OPS]
    assert refused, "no database request was made while the server was full"
    assert all(not r.ok for r in refused), "a request was served while the server was full"
    slowest = 0.0
    for r in refused:
        assert r.status == 503, describe([r])
        assert "too many clients" in r.message, r.message
        assert r.latency < TIMEOUT + SLACK, describe([r])
        slowest = max(slowest, r.latency)
    health = [r for r in results if r.end <= full_until and r.op == "healthz"]
    assert health
    assert all(r.ok for r in health)

    first = first_success_after(results, full_until)
    assert first is not None
    recovery = first.end - full_until
    assert recovery < RECOVERY_BOUND
    totals = check_after(app, cluster, results, workers, freed)
    rows = check_rows(cluster, results)
    figures(
        requests=len(results),
        failed=sum(not r.ok for r in results),
        failed_down=len(refused),
        slowest_failure_ms=round(slowest * 1000),
        recovery_ms=round(recovery * 1000, 1),
        rows_checked=rows["rows"],
        extra_rows=rows["extra"],
        pool=totals,
        notes=(
            f"server full for 2 s: {len(refused)} database requests got 503 'too many clients' "
            f"(slowest {slowest * 1000:.0f} ms); first success {recovery * 1000:.0f} ms after "
            f"the other client began to close its connections"
        ),
    )


# ------------------------------------------------------------------ 5. credential rotation


APP_USER = "app"
# pgcluster's pg_hba.conf asks every user for a scram-sha-256 password: the superuser (the
# test's observer) gives the cluster's, the app its own.
AUTH_FAILED = re.compile(r'password authentication failed for user "app"')


def test_credential_rotation(
    make_cluster: MakeCluster, start_app: StartApp, figures: Figures
) -> None:
    """ALTER ROLE ... PASSWORD under load, then what Heroku does: DATABASE_URL changes and the
    dyno restarts.

    Until then the app keeps serving on the connections it holds (a password is checked only
    when a connection is opened); once they are recycled (here: killed) every new connection
    fails with an authentication error that names the user, never the password; the app
    restarted with the new URL serves again.
    """
    cluster = make_cluster()
    old_password = "old-" + secrets.token_hex(12)
    new_password = "new-" + secrets.token_hex(12)
    query(
        cluster,
        f"CREATE ROLE {APP_USER} LOGIN PASSWORD '{old_password}';"
        f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {APP_USER};"
        f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {APP_USER};",
    )
    url = f"postgresql://{APP_USER}:{{}}@{HOST}:{cluster.port}/{APP_DB}"
    # MIN_CONNS = MAX_CONNS: each worker holds its connections before the password changes.
    pool = {"POOL_MIN_CONNS": str(MAX_CONNS)}
    app = start_app(url.format(old_password), **pool)
    workers = app.worker_pids()
    results: list[Result] = []

    with new_load(app, prefix="A") as load:
        load.wait_for(50)
        deadline = time.monotonic() + 10
        while len(app_backends(cluster, APP_USER)) < WORKERS * MAX_CONNS:
            assert time.monotonic() < deadline, "the pools did not fill to MIN_CONNS"
            time.sleep(0.05)
        held = app_backends(cluster, APP_USER)
        query(cluster, f"ALTER ROLE {APP_USER} PASSWORD '{new_password}'")
        rotated = time.monotonic()
        time.sleep(1.5)
        # Connections recycled (lifetime, idle expiry, a restart or a kill all look the same to
        # the pool): here every backend of the app is terminated.
        observer = connect(cluster)
        try:
            kill, killed_pids = terminate_backends(observer, "usename = %s", [APP_USER])
        finally:
            observer.close()
        kill_began, killed = kill.begin, kill.end
        time.sleep(1.5)
    results += load.results

    kept = [r for r in load.results if rotated <= r.start and r.end <= kill_began]
    assert kept
    assert all(r.ok for r in kept if r.op in DATABASE_OPS), describe([r for r in kept if not r.ok])
    assert {r.backend for r in kept if r.backend} <= held, "a connection was opened after rotation"
    after_kill = [r for r in load.results if r.start >= killed and r.op in DATABASE_OPS]
    assert after_kill
    assert not any(r.ok for r in after_kill), "a new connection authenticated"
    auth_failures = 0
    slowest = 0.0
    for r in after_kill:
        assert r.status == 503, describe([r])
        assert AUTH_FAILED.search(r.message), r.message
        assert not leaks_password(r.message, old_password, new_password), r.message
        assert r.latency < TIMEOUT + SLACK
        auth_failures += 1
        slowest = max(slowest, r.latency)
    # Before the kill nothing failed; the requests in flight at it may have.
    unexplained = unexplained_failures(load.results, [Window(kill_began, load.stopped_at)])
    assert unexplained == [], describe(unexplained)
    assert app.worker_pids() == workers
    log = app.output()
    assert not leaks_password(log, old_password, new_password), "the app's log shows a password"
    assert AUTH_FAILED.search(log), "the app's log does not say why connections fail"

    # Heroku: the config var DATABASE_URL changes, the dyno restarts with it.
    app.stop()
    restart_began = time.monotonic()
    app = start_app(url.format(new_password), **pool)
    with new_load(app, prefix="B") as load:
        load.wait_for(1)
        first_served = min(r.end for r in load.results if r.ok and r.op in DATABASE_OPS)
        time.sleep(2.0)
    results += load.results
    failures_b = [r for r in load.results if not r.ok]
    assert failures_b == [], describe(failures_b)
    assert len(app_backends(cluster, APP_USER)) <= WORKERS * MAX_CONNS, (
        f"worker pids {sorted(app.worker_pids())}, master {app.pid}:\n"
        + describe_backends(cluster, APP_USER)
    )
    rows = check_rows(cluster, results)
    figures(
        requests=len(results),
        failed=sum(not r.ok for r in results),
        failed_down=auth_failures,
        slowest_failure_ms=round(slowest * 1000),
        recovery_ms=round((first_served - restart_began) * 1000),
        rows_checked=rows["rows"],
        extra_rows=rows["extra"],
        served_after_rotation=len(kept),
        backends_killed=len(killed_pids),
        notes=(
            f"{len(kept)} requests served on the {len(held)} connections held after ALTER ROLE; "
            f"after they were recycled {auth_failures} got 503 'password authentication failed' "
            f"(no password in any response or log line); the app restarted with the new URL "
            f"served {(first_served - restart_began) * 1000:.0f} ms after the restart began"
        ),
    )
