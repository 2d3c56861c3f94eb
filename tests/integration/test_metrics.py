"""Metrics and load shedding against a real PostgreSQL, through Django's backend: the
Prometheus collector scraped at /metrics with Django's test client, MAX_WAITING under a thread
storm, and no password in any metric, log line or error.

/metrics is served two ways: by prometheus_client's own Django view (this module is that
URLconf), on every Django version, and by django-prometheus' view (tests marked
``django_prometheus``; deselected on Django 6.1 and newer when it is not installed, as
django-prometheus 2.5.0 does not support them: see tests/conftest.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import pytest
from django.db import OperationalError
from django.test import Client
from django.urls import path
from prometheus_client.django import PrometheusDjangoView
from prometheus_client.parser import text_string_to_metric_families

import herokupool
import herokupool.prometheus
from herokupool.errors import PoolOverloaded, PoolTimeout
from tests.drivers import INSTALLED
from tests.integration.conftest import MakeWrapper

pytestmark = pytest.mark.integration

# This module is the URLconf of the tests marked urls(__name__) and of the exporter fixture's
# "prometheus_client" case: prometheus_client's view, which needs nothing else.
urlpatterns = [path("metrics", PrometheusDjangoView.as_view())]

SECRET = "Pw-d0-n0t-leak-7c1e9b"


@pytest.fixture(
    params=[
        pytest.param(__name__, id="prometheus_client"),
        pytest.param(
            "tests.integration.django_prometheus_urls",
            id="django_prometheus",
            marks=pytest.mark.django_prometheus,
        ),
    ]
)
def exporter(request: pytest.FixtureRequest, settings: Any) -> str:
    """The URLconf serving /metrics: prometheus_client's view, then django-prometheus'."""
    settings.ROOT_URLCONF = request.param  # Django clears its URL caches on the change
    return str(request.param)


@pytest.fixture
def collector() -> Iterator[herokupool.prometheus.PoolCollector]:
    registered = herokupool.prometheus.register()
    yield registered
    herokupool.prometheus.unregister()


def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = Client().get("/metrics")
    assert response.status_code == 200
    text = response.content.decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_the_collector_is_scraped_at_metrics(
    exporter: str,
    make_wrapper: MakeWrapper,
    alias: str,
    collector: object,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DYNO", "web.3")
    wrapper = make_wrapper(MAX_CONNS=3, MAX_WAITING=5)
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT 1")
        held = scrape()  # while the wrapper holds its connection
    wrapper.close()
    after = scrape()
    labels = (("alias", alias), ("dyno", "web.3"), ("pid", str(os.getpid())))
    assert held[("herokupool_connections_in_use", labels)] == 1
    assert after[("herokupool_connections_in_use", labels)] == 0
    assert after[("herokupool_connections_idle", labels)] == 1
    assert after[("herokupool_connections_max", labels)] == 3
    assert after[("herokupool_borrows_total", labels)] == 1
    assert after[("herokupool_releases_total", labels)] == 1
    assert after[("herokupool_shed_total", labels)] == 0
    assert after[("herokupool_recent_peak_in_use", labels)] == 1
    assert after[("herokupool_recent_borrows", labels)] == 1
    for quantile in ("0.5", "0.95", "0.99", "1"):
        key = ("herokupool_recent_wait_seconds", (*labels[:2], labels[2], ("quantile", quantile)))
        assert after[key] == 0.0, "nobody waited"
    # Registering twice is harmless: one collector, no duplicate series.
    assert herokupool.prometheus.register() is collector


def test_max_waiting_sheds_a_thread_storm(
    make_wrapper: MakeWrapper, alias: str, sessions: Any
) -> None:
    """48 threads x 4 requests against MAX_CONNS=2, MAX_WAITING=3, TIMEOUT=30: the queue never
    holds more than 3, every refused request fails at once, and the counters add up."""
    threads, rounds, max_waiting, timeout = 48, 4, 3, 30.0
    outcomes: list[tuple[str, float]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(threads)
    done = threading.Event()
    waiting_seen: list[int] = []
    sessions_seen: list[int] = []

    def request() -> None:
        wrapper = make_wrapper(MAX_CONNS=2, MAX_WAITING=max_waiting, TIMEOUT=timeout)
        barrier.wait()
        for _ in range(rounds):
            started = time.monotonic()
            try:
                with wrapper.cursor() as cursor:
                    cursor.execute("SELECT pg_sleep(0.02)")
                outcome = "ok"
            except OperationalError as error:
                cause = error.__cause__
                outcome = (
                    "shed"
                    if isinstance(cause, PoolOverloaded)
                    else "timeout"
                    if isinstance(cause, PoolTimeout)
                    else f"error: {error}"
                )
            finally:
                wrapper.close()
            with lock:
                outcomes.append((outcome, time.monotonic() - started))

    def sample() -> None:
        while not done.is_set():
            stats = herokupool.stats().get(alias)
            if stats:
                waiting_seen.append(int(stats["waiting"]))
            sessions_seen.append(sessions())
            time.sleep(0.002)

    workers = [threading.Thread(target=request) for _ in range(threads)]
    sampler = threading.Thread(target=sample)
    sampler.start()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    done.set()
    sampler.join()

    kinds = [kind for kind, _ in outcomes]
    ok, shed = kinds.count("ok"), kinds.count("shed")
    assert ok + shed == threads * rounds, sorted(set(kinds))
    assert shed > 0, "48 threads on 2 connections with room for 3 waiters must shed"
    assert ok > 0
    stats = herokupool.stats()[alias]
    assert stats["shed"] == shed
    assert stats["borrows"] == stats["releases"] == ok
    assert stats["timeouts"] == 0
    assert stats["in_use"] == stats["waiting"] == 0
    assert stats["waits"] <= ok, "only served borrows queued; a shed one never did"
    assert stats["peak_waiting"] <= max_waiting
    assert stats["recent_shed"] == shed
    assert max(waiting_seen) <= max_waiting, "no borrow queued beyond MAX_WAITING"
    assert max(sessions_seen) <= 2
    slowest_shed = max(elapsed for kind, elapsed in outcomes if kind == "shed")
    assert slowest_shed < timeout / 6, "a shed request fails at once, not after TIMEOUT"


def _with_password(url: str) -> tuple[str, str]:
    """``url`` with a password (its own, or SECRET: the test servers trust loopback)."""
    parts = urlsplit(url)
    if parts.password:
        return url, parts.password
    netloc = f"{quote(parts.username or 'postgres')}:{quote(SECRET)}@{parts.hostname}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc)), SECRET


@pytest.mark.urls(__name__)
def test_no_password_in_any_metric_log_line_or_error(
    make_wrapper: MakeWrapper,
    dsn: str,
    alias: str,
    collector: object,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, password = _with_password(dsn)
    texts: list[str] = []
    with caplog.at_level(logging.DEBUG, logger="herokupool"):
        holder = make_wrapper(url=url, MAX_CONNS=1, MAX_WAITING=0, LOG_METRICS=0.05)
        other = make_wrapper(url=url, MAX_CONNS=1, MAX_WAITING=0, LOG_METRICS=0.05)
        with holder.cursor() as cursor:
            cursor.execute("SELECT 1")
            with pytest.raises(OperationalError) as shed:
                other.ensure_connection()
            pool = holder._herokupool_pool  # type: ignore[attr-defined]
            texts += [repr(pool), str(shed.value), repr(shed.value), str(shed.value.__cause__)]
            # The maintenance thread logs the metrics line and the advice (a borrow was shed).
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                levels = {r.levelno for r in caplog.records if r.name == "herokupool.metrics"}
                if {logging.INFO, logging.WARNING} <= levels:
                    break
                time.sleep(0.02)
        holder.close()
    assert isinstance(shed.value.__cause__, PoolOverloaded)
    lines = [record.getMessage() for record in caplog.records]
    assert any("sample#herokupool." in line for line in lines), lines
    assert any("were shed" in line and "MAX_CONNS" in line for line in lines), lines
    texts += lines
    texts.append(repr(herokupool.stats()))
    texts.append(Client().get("/metrics").content.decode())
    assert password in url
    for text in texts:
        assert password not in text
        assert quote(password) not in text


MULTIPROCESS_WORKER = """
import os, sys
import herokupool.prometheus
from herokupool.pool import ConnectionPool
from tests.drivers import connector

herokupool.prometheus.register()

connect = connector(sys.argv[3], sys.argv[1])


pool = ConnectionPool(connect, name="mp", max_conns=4, background=False)
held = [pool.borrow() for _ in range(int(sys.argv[2]))]
pool.run_maintenance()  # what the maintenance thread does: publish to the multiprocess files
for conn in held:
    pool.release(conn)
print(os.getpid())
"""


@pytest.mark.parametrize("driver_name", INSTALLED)
def test_multiprocess_mode_reports_every_worker(
    exporter: str, driver_name: str, dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes in prometheus_client's multiprocess mode (as gunicorn workers are); one
    scrape of /metrics sees both: gauges per pid, counters summed."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "DYNO": "web.1"}
    pids = {}
    for borrowed in (1, 3):
        worker = subprocess.run(
            [sys.executable, "-c", MULTIPROCESS_WORKER, dsn, str(borrowed), driver_name],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert worker.returncode == 0, worker.stderr
        pids[borrowed] = worker.stdout.strip()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    # prometheus_client's view reads the variable once, when it is imported (a server sets it
    # before it starts); django-prometheus' reads it at every request.
    monkeypatch.setattr(PrometheusDjangoView, "multiprocess_mode", True)
    samples = scrape()
    for borrowed, pid in pids.items():
        labels = (("alias", "mp"), ("dyno", "web.1"), ("pid", pid))
        assert samples[("herokupool_connections_in_use", labels)] == borrowed
        assert samples[("herokupool_connections_max", labels)] == 4
    assert samples[("herokupool_borrows_total", (("alias", "mp"), ("dyno", "web.1")))] == 4
