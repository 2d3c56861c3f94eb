"""The demo served by the Procfile's web command: pages, JSON, the connection cap, the browser."""

from __future__ import annotations

import http.cookiejar
import json
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from demo.dashboard.loadgen import burst
from tests.conftest import require
from tests.demo.conftest import (
    MAX_CONNS,
    ROOT,
    THREADS,
    WORKERS,
    DemoDatabase,
    WebProcess,
    get,
    get_json,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("demo_extra")]


def test_root_does_database_work_and_shows_the_pool(web: WebProcess) -> None:
    status, html = get(web.url)
    assert status == 200, html
    assert 'id="pool-stats"' in html
    for label in ("in use", "idle", "waiting", "borrows", "waits", "timeouts", "lost"):
        assert f'<th scope="row">{label}</th>' in html, label
    assert re.search(r'id="worker-pid">\d+<', html)
    assert re.search(r'id="backend-pid">\d+<', html), "the page names the backend that served it"
    assert "<svg" in html
    assert 'id="recent-chart"' in html


def test_the_page_shows_wait_percentiles_and_the_metrics_line(web: WebProcess) -> None:
    burst(web.url + "api/work?hold=0.05", requests=48, concurrency=12)
    status, html = get(web.url)
    assert status == 200, html
    assert 'id="waits"' in html
    for label in ("p50", "p95", "p99", "max"):
        assert f'<span class="label">{label}</span>' in html
    for label in ("wait p99", "peak waiting", "shed"):
        assert f'<th scope="row">{label}</th>' in html, label
    # The stats table's column is the alias as written, not an upper-cased label.
    assert '<th scope="col" class="num">alias <code class="alias">default</code></th>' in html
    worker = re.search(r'id="worker-pid">(\d+)<', html)
    line = re.search(r'<pre class="metrics-line" id="metrics-line">([^<]+)</pre>', html)
    assert worker
    assert line
    fields = dict(token.split("=", 1) for token in line.group(1).split())
    assert fields["pid"] == worker.group(1)
    assert fields["pool"] == "default"
    assert fields["sample#herokupool.default.max"] == str(MAX_CONNS)
    assert fields["measure#herokupool.default.wait_p99"].endswith("ms")
    status, data = get_json(web.url + "api/stats")
    assert {"wait_p50", "wait_p95", "wait_p99", "wait_max", "peak_in_use", "shed"} <= set(
        data["pools"]["default"]
    )


def test_healthz_checks_the_database_and_reports_the_pool(web: WebProcess) -> None:
    status, data = get_json(web.url + "healthz")
    assert status == 200
    assert data["status"] == "ok"
    assert isinstance(data["backend_pid"], int)
    pool = data["pools"]["default"]
    assert pool["max"] == MAX_CONNS
    assert pool["in_use"] >= 1, "sampled while the health check held its connection"


def test_stats_json_has_the_pages_data(web: WebProcess) -> None:
    status, data = get_json(web.url + "api/stats")
    assert status == 200
    assert {"worker_pid", "master_pid", "backend_pid", "pools", "recent", "acquire_ms"} <= set(data)
    assert data["worker_pid"] != data["master_pid"], "served by a forked gunicorn worker"
    assert set(data["pools"]["default"]) >= {
        "max", "min", "in_use", "idle", "waiting", "connecting", "borrows", "releases", "waits",
        "wait_time", "timeouts", "connections_created", "connections_lost",
    }  # fmt: skip
    assert data["recent"][0]["path"] == "/api/stats", "the request recorded itself first"


def test_static_files_are_served_by_whitenoise_with_hashed_names(web: WebProcess) -> None:
    html = get(web.url)[1]
    match = re.search(r'href="(/static/dashboard/style\.[0-9a-f]{12}\.css)"', html)
    assert match, "the manifest storage gave the stylesheet a hashed name"
    status, css = get(web.url.rstrip("/") + match.group(1))
    assert status == 200
    assert "--brand" in css


def test_a_burst_never_opens_more_than_workers_times_max_conns(
    web: WebProcess, demo_db: DemoDatabase
) -> None:
    """200 requests from 16 client threads against 2 workers x 8 threads with MAX_CONNS=2:
    every request answers, the pools queue, and the server never sees more than 2 x 2."""
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        conn = demo_db.server.connect()
        try:
            while not done.is_set():
                samples.append(demo_db.count_sessions(conn))
                time.sleep(0.005)
        finally:
            conn.close()

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        report = burst(web.url + "api/work?hold=0.02", requests=200, concurrency=16)
    finally:
        done.set()
        sampler.join()

    assert report.statuses == {200: 200}, report.lines()
    assert len(report.workers) == WORKERS, "both gunicorn workers served requests"
    assert report.peak_waiting >= 1, "16 clients > 2 connections: requests queued in a pool"
    assert report.peak_in_use <= MAX_CONNS
    assert len(samples) > 20
    assert max(samples) <= WORKERS * MAX_CONNS, samples
    assert max(samples) >= MAX_CONNS, "the sampler saw the pools at work"
    assert THREADS > MAX_CONNS


def _session(url: str) -> tuple[urllib.request.OpenerDirector, str]:
    """A cookie-keeping client and the CSRF token of the page's burst form."""
    opener = urllib.request.build_opener(
        urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
    )
    with opener.open(url, timeout=10) as response:
        html = response.read().decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', html)
    assert token, "the burst form carries a CSRF token"
    return opener, token.group(1)


def test_the_pages_burst_button_queues_one_workers_pool(web: WebProcess) -> None:
    opener, token = _session(web.url)
    request = urllib.request.Request(
        web.url + "api/burst",
        data=f"csrfmiddlewaretoken={token}".encode(),
        headers={"Accept": "application/json", "Referer": web.url},
    )
    with opener.open(request, timeout=30) as response:
        result = json.loads(response.read())
    assert result["threads"] == 3 * MAX_CONNS
    assert result["outcome"] == {"ok": result["threads"] * result["rounds"], "timeout": 0,
                                 "error": 0, "skipped": 0}  # fmt: skip
    assert result["peak_waiting"] >= 1
    assert max(point["in_use"] for point in result["timeline"]) <= MAX_CONNS
    assert result["elapsed"] < 25, "well within Heroku's 30 s router timeout"

    # A browser's plain form post comes back to the page, which draws the saved burst.
    request = urllib.request.Request(
        web.url + "api/burst", data=f"csrfmiddlewaretoken={token}".encode(),
        headers={"Referer": web.url},
    )  # fmt: skip
    with opener.open(request, timeout=30) as response:
        html = response.read().decode()
        assert response.url.endswith("/#burst")
    assert '<svg class="chart" id="burst-chart"' in html
    assert "Last burst" in html


def test_the_burst_refuses_a_post_without_csrf_token(web: WebProcess) -> None:
    request = urllib.request.Request(web.url + "api/burst", data=b"", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    refused.value.close()
    assert refused.value.code == 403


def test_load_command_summarises_a_burst(web: WebProcess) -> None:
    result = subprocess.run(
        [sys.executable, "manage.py", "load", web.url, "--requests", "20", "--concurrency", "4"],
        cwd=ROOT, env=web.env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "20 requests in" in result.stdout
    assert "status 200: 20" in result.stdout


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "a PNG file"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--disable-dev-shm-usage", "--hide-scrollbars",
)  # fmt: skip


def test_the_page_renders_in_a_headless_browser(web: WebProcess, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    require(chromium is not None, "chromium (apt-get install chromium)")
    assert chromium is not None
    # Something to draw: a little load across both workers first.
    burst(web.url + "api/work?hold=0.02", requests=60, concurrency=12)
    base = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]

    dom = subprocess.run(
        [*base, "--dump-dom", web.url], capture_output=True, text=True, timeout=60, check=False
    )
    assert dom.returncode == 0, dom.stderr
    assert '<table id="pool-stats"' in dom.stdout
    assert re.search(r'<tr data-stat="in_use">\s*<th scope="row">in use</th>', dom.stdout)
    assert "<svg" in dom.stdout

    shot = tmp_path / "demo.png"
    result = subprocess.run(
        [*base, f"--screenshot={shot}", "--window-size=1280,900", web.url],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = shot.read_bytes()
    assert _png_size(data) == (1280, 900)
    # A blank or unstyled page compresses to a few kB; this one has colour and text.
    assert len(data) > 40_000, len(data)
    # The README's screenshot comes from `python -m demo.screenshot` (make run's configuration,
    # not this test's MAX_CONNS=2).
