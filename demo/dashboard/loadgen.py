"""An HTTP load generator for the demo (standard library only; imports nothing from Django).

``burst(url, requests=200, concurrency=16)`` sends ``requests`` GETs from ``concurrency``
client threads and returns a :class:`Report`: status codes, latencies and, from the JSON the
demo's ``/api/work`` answers, which workers served them and how long the pools made them
wait. Used by ``manage.py load`` and by the demo's tests.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

#: Longest wait for one answer, in seconds: Heroku's router gives up at 30.
REQUEST_TIMEOUT = 30.0


@dataclass
class Report:
    statuses: Counter[int | str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    workers: Counter[int] = field(default_factory=Counter)
    backends: set[int] = field(default_factory=set)
    peak_in_use: int = 0
    peak_waiting: int = 0
    acquire_ms: list[float] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    def percentile(self, values: list[float], fraction: float) -> float:
        if not values:
            return 0.0
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    def lines(self) -> list[str]:
        """A human summary, one fact a line."""
        ms = [latency * 1000 for latency in self.latencies]
        codes = ", ".join(f"{code}: {n}" for code, n in sorted(self.statuses.items(), key=str))
        rate = self.total / self.elapsed if self.elapsed else 0.0
        return [
            f"{self.total} requests in {self.elapsed:.2f} s ({rate:.0f}/s); status {codes}",
            f"latency p50 {self.percentile(ms, 0.5):.0f} ms, "
            f"p95 {self.percentile(ms, 0.95):.0f} ms, max {max(ms, default=0):.0f} ms",
            f"got a connection in p50 {self.percentile(self.acquire_ms, 0.5):.1f} ms, "
            f"p95 {self.percentile(self.acquire_ms, 0.95):.1f} ms",
            f"served by {len(self.workers)} worker(s) "
            f"({', '.join(f'{pid}: {n}' for pid, n in sorted(self.workers.items()))}) "
            f"over {len(self.backends)} PostgreSQL backend(s)",
            f"busiest pool seen: {self.peak_in_use} in use, {self.peak_waiting} waiting",
        ]


def fetch(url: str, timeout: float = REQUEST_TIMEOUT) -> tuple[int | str, dict[str, Any] | None]:
    """GET ``url``: (status code or error name, the JSON body if there was one)."""
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as error:
        with error:
            status, body = error.code, error.read()
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        return type(reason).__name__, None
    try:
        data = json.loads(body)
    except ValueError:
        return status, None
    return status, data if isinstance(data, dict) else None


def burst(
    url: str,
    requests: int = 200,
    concurrency: int = 16,
    *,
    on_answer: Callable[[int | str, dict[str, Any] | None], None] | None = None,
) -> Report:
    """Send ``requests`` GETs to ``url`` from ``concurrency`` threads; wait for every answer."""
    if requests < 1 or concurrency < 1:
        raise ValueError("requests and concurrency must be at least 1")
    report = Report()
    lock = threading.Lock()

    def one(_: int) -> None:
        started = time.perf_counter()
        status, data = fetch(url)
        latency = time.perf_counter() - started
        with lock:
            report.statuses[status] += 1
            report.latencies.append(latency)
            if data is not None:
                _record(report, data)
        if on_answer is not None:
            on_answer(status, data)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="load") as executor:
        # list(): re-raise any exception a thread hit (there should be none: fetch catches).
        list(executor.map(one, range(requests)))
    report.elapsed = time.perf_counter() - started
    return report


def _record(report: Report, data: dict[str, Any]) -> None:
    if isinstance(data.get("worker_pid"), int):
        report.workers[data["worker_pid"]] += 1
    if isinstance(data.get("backend_pid"), int):
        report.backends.add(data["backend_pid"])
    if isinstance(data.get("acquire_ms"), int | float):
        report.acquire_ms.append(float(data["acquire_ms"]))
    for stats in (data.get("pools") or {}).values():
        report.peak_in_use = max(report.peak_in_use, int(stats.get("in_use", 0)))
        report.peak_waiting = max(report.peak_waiting, int(stats.get("waiting", 0)))
