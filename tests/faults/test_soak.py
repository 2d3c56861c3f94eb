"""A bounded soak (issue 6, "Soak"): mixed reads, writes, transactions, errors inside atomic()
and slow requests against the app under gunicorn, then the leak, memory and counter checks.

75 s by default (CI); set HEROKUPOOL_SOAK_SECONDS for a longer run locally.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest

from tests.faults.conftest import Figures, MakeCluster, StartApp
from tests.faults.harness import (
    APP_DB,
    HOST,
    MAX_CONNS,
    WORKERS,
    app_backends,
    check_rows,
    describe,
    rss_kb,
)
from tests.faults.loadgen import DATABASE_OPS, Load, latency_summary

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SECONDS = float(os.environ.get("HEROKUPOOL_SOAK_SECONDS", "75"))
MIX = {"read": 45, "write": 20, "txn": 12, "error": 10, "sleep": 8, "healthz": 5}
CLIENTS = 8
MIN_CONNS = 1
MAX_IDLE = 2.0
#: The pools' maintenance runs every MAX_IDLE / 4; this much more for a loaded machine.
SETTLE_SLACK = 2.0
#: Growth of a worker's resident memory from the first quarter of the soak to the last.
RSS_BOUND_MB = 20.0
SAMPLE_EVERY = 1.0


def test_soak(make_cluster: MakeCluster, start_app: StartApp, figures: Figures) -> None:
    cluster = make_cluster()
    app = start_app(
        cluster.dsn(APP_DB),
        POOL_MIN_CONNS=str(MIN_CONNS),
        POOL_MAX_IDLE=str(MAX_IDLE),
        POOL_TIMEOUT="5",
    )
    workers = app.worker_pids()
    samples: list[tuple[float, dict[int, int]]] = []
    peak_backends = 0
    load = Load(HOST, app.port, mix=MIX, clients=CLIENTS, max_seconds=SECONDS, think=0.002)
    with load:
        while time.monotonic() < load.started_at + SECONDS:
            rss = {pid: rss_kb(pid) or 0 for pid in workers}
            samples.append((time.monotonic() - load.started_at, rss))
            peak_backends = max(peak_backends, len(app_backends(cluster)))
            time.sleep(SAMPLE_EVERY)
    stopped = time.monotonic()
    results = load.results
    elapsed = load.stopped_at - load.started_at

    failures = [r for r in results if not r.ok]
    assert failures == [], f"{len(failures)} requests failed:\n" + describe(failures)
    assert app.worker_pids() == workers, "a gunicorn worker was restarted"
    assert peak_backends <= WORKERS * MAX_CONNS

    # No leaked connection: back to MIN_CONNS per process once idle for MAX_IDLE.
    deadline = stopped + MAX_IDLE + SETTLE_SLACK
    while (remaining := len(app_backends(cluster))) > WORKERS * MIN_CONNS:
        assert time.monotonic() < deadline, (
            f"{remaining} connections still open {MAX_IDLE + SETTLE_SLACK:g} s after the soak"
        )
        time.sleep(0.05)
    settled = time.monotonic() - stopped

    # Counters: every database request borrowed exactly once and gave the connection back.
    stats = {pid: body["stats"]["default"] for pid, body in app.stats().items()}
    for pid, s in stats.items():
        assert s["in_use"] == 0, (pid, s)
        assert s["waiting"] == 0, (pid, s)
        assert s["connecting"] == 0, (pid, s)
        assert s["borrows"] == s["releases"] + s["in_use"], (pid, s)
        assert s["connections_created"] == (
            s["connections_closed"]
            + s["connections_discarded"]
            + s["connections_lost"]
            + s["idle"]
            + s["in_use"]
        ), (pid, s)
        assert s["timeouts"] == 0, (pid, s)
        assert s["connections_failed"] == 0, (pid, s)
        assert s["connections_lost"] == 0, (pid, s)
        assert s["idle"] <= MIN_CONNS, (pid, s)
    database_requests = sum(1 for r in results if r.op in DATABASE_OPS)
    borrows = sum(s["borrows"] for s in stats.values())
    assert borrows == database_requests, (borrows, database_requests)

    # Memory: each worker's RSS, first quarter of the soak against the last.
    growth_mb: dict[int, float] = {}
    rss_mb: dict[int, tuple[float, float]] = {}
    quarter = elapsed / 4
    for pid in workers:
        first = [rss[pid] for t, rss in samples if t <= quarter]
        last = [rss[pid] for t, rss in samples if t >= elapsed - quarter]
        assert first, samples
        assert last, samples
        start_mb, end_mb = statistics.median(first) / 1024, statistics.median(last) / 1024
        rss_mb[pid] = (round(start_mb, 1), round(end_mb, 1))
        growth_mb[pid] = round(end_mb - start_mb, 1)
        assert end_mb - start_mb < RSS_BOUND_MB, (
            f"worker {pid}: RSS {start_mb:.1f} -> {end_mb:.1f} MB"
        )

    rows = check_rows(cluster, results)
    by_op = {op: sum(1 for r in results if r.op == op) for op in MIX}
    created = sum(s["connections_created"] for s in stats.values())
    figures(
        requests=len(results),
        failed=len(failures),
        seconds=round(elapsed, 1),
        requests_per_s=round(len(results) / elapsed),
        by_op=by_op,
        latency=latency_summary(r for r in results if r.op == "read"),
        borrows=borrows,
        connections_created=created,
        waits=sum(s["waits"] for s in stats.values()),
        peak_backends=peak_backends,
        settled_s=round(settled, 2),
        rss_mb=rss_mb,
        rss_growth_mb=growth_mb,
        rows_checked=rows["rows"],
        notes=(
            f"{elapsed:.0f} s, {len(results)} requests ({len(results) / elapsed:.0f}/s), "
            f"{by_op['error']} errors in atomic() and {by_op['sleep']} slow requests, 0 failed; "
            f"{borrows} borrows on {created} connections, peak {peak_backends} backends; back to "
            f"{WORKERS * MIN_CONNS} connections {settled:.1f} s after the load; worker RSS growth "
            f"{', '.join(f'{g:+.1f}' for g in growth_mb.values())} MB (bound {RSS_BOUND_MB:g})"
        ),
    )
