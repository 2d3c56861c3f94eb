"""One configuration's process: Django's WSGI handler driven in-process by threads.

Started by the coordinator as ``python -m bench.worker`` with the configuration in
``BENCH_CONFIG``; it then answers one JSON command per line on stdin with one JSON
line on stdout (everything else the process prints goes to stderr):

- ``{"op": "window", "threads": T, "warmup": s, "duration": s, "statements": 1 | 5}``:
  the first T of the worker's persistent threads call the WSGI handler back to back,
  as a threaded WSGI server's threads would (``request_started`` /
  ``request_finished`` and ``close_old_connections`` run on every request), each
  request running ``statements`` primary-key lookups.  The window is the ``duration``
  seconds after ``warmup``.  A request counts when it completes inside the window; one
  still in flight when the window ends counts in the latency tail with the time it
  had waited so far, so a thread starved by its pool still shows up there.
- ``{"op": "micro", "seconds": s}``: the cost of one request's connection handling,
  ``ensure_connection()`` followed by ``close_if_unusable_or_obsolete()`` (what
  ``close_old_connections`` runs at the end of every request, whatever
  ``CONN_MAX_AGE`` is).
- ``{"op": "requests", "seconds": s}``: one thread (the one reading commands) sends
  one-statement requests through the WSGI handler back to back for ``seconds``; the
  reply gives wall-clock and thread CPU time per request.  The coordinator interleaves
  short batches of this across configurations: the per-request overhead micro.

``window`` and ``requests`` take ``"workload": "prepared"`` for the prepared-statement view
(the same three ORM queries on every request, see ``bench.app.views.prepared``) instead of
the one- or five-statement view.
- ``{"op": "quit"}``.
"""

from __future__ import annotations

# First, before anything imports Django: hide psycopg 3 from psycopg2 configurations.
import bench.bootstrap

CONFIG = bench.bootstrap.prepare()

import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import queue  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from typing import Any  # noqa: E402

import django  # noqa: E402

django.setup()

from django.core.handlers.wsgi import WSGIHandler  # noqa: E402
from django.core.signals import got_request_exception  # noqa: E402
from django.db import connection, connections  # noqa: E402

perf_counter = time.perf_counter
ROWS = int(os.environ.get("BENCH_ROWS", "1000"))

_local = threading.local()
#: The view per workload: one and five statements per request, and the same three ORM
#: queries per request (see bench.app.views).
PREFIXES = {"1": "/item/", "5": "/items/", "prepared": "/prepared/"}


def describe(error: BaseException) -> str:
    """``module.Class`` of an exception, and of its cause (what the driver raised)."""
    name = f"{type(error).__module__}.{type(error).__qualname__}"
    cause = error.__cause__
    if cause is not None:
        name += f" from {type(cause).__module__}.{type(cause).__qualname__}"
    return name


def _on_request_exception(sender: Any, request: Any = None, **kwargs: Any) -> None:
    error = sys.exception()
    _local.error = describe(error) if error is not None else "unknown"


got_request_exception.connect(_on_request_exception)


class Record:
    """What one thread did during one window."""

    __slots__ = ("censored", "errors", "latencies", "ok")

    def __init__(self) -> None:
        self.ok = 0
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.censored: float | None = None


class Window:
    def __init__(self, threads: int, start: float, end: float, workload: str = "1") -> None:
        self.start = start
        self.end = end
        self.prefix = PREFIXES[workload]
        self.usage: dict[str, float] = {}
        self.records = [Record() for _ in range(threads)]
        self.done = threading.Semaphore(0)


class Driver:
    """The worker's persistent request threads (like a gthread worker's)."""

    def __init__(self) -> None:
        self.handler = WSGIHandler()
        self.queues: list[queue.SimpleQueue[Any]] = []

    def ensure_threads(self, count: int) -> None:
        while len(self.queues) < count:
            jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
            index = len(self.queues)
            self.queues.append(jobs)
            threading.Thread(
                target=self._serve, args=(index, jobs), name=f"bench-{index}", daemon=True
            ).start()

    def _serve(self, index: int, jobs: queue.SimpleQueue[Any]) -> None:
        rng = random.Random(index)
        keys = [rng.randint(1, ROWS) for _ in range(997)]
        paths = {prefix: [f"{prefix}{key}/" for key in keys] for prefix in PREFIXES.values()}
        position = 0
        while True:
            job, done = jobs.get()
            if job is None:
                return
            try:
                if job == "close":
                    connections.close_all()
                    continue
                record = job.records[index]
                mine = paths[job.prefix]
                while True:
                    position = (position + 1) % len(mine)
                    started = perf_counter()
                    if started >= job.end:
                        break
                    error = self.request(mine[position])
                    finished = perf_counter()
                    if finished > job.end:
                        record.censored = job.end - started
                        break
                    if finished < job.start:
                        continue  # warm-up
                    record.latencies.append(finished - started)
                    if error is None:
                        record.ok += 1
                    else:
                        record.errors[error] += 1
            finally:
                done.release()

    def request(self, path: str) -> str | None:
        environ = {
            "REQUEST_METHOD": "GET",
            "PATH_INFO": path,
            "QUERY_STRING": "",
            "SCRIPT_NAME": "",
            "SERVER_NAME": "bench",
            "SERVER_PORT": "80",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "HTTP_HOST": "bench",
            "wsgi.input": io.BytesIO(b""),
            "wsgi.errors": sys.stderr,
            "wsgi.url_scheme": "http",
            "wsgi.version": (1, 0),
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        status: list[str] = []

        def start_response(value: str, headers: Any, exc_info: Any = None) -> None:
            status.append(value)

        _local.error = None
        try:
            response = self.handler(environ, start_response)
            try:
                for _ in response:
                    pass
            finally:
                response.close()  # request_finished: close_old_connections()
        except Exception as error:
            return describe(error)
        if _local.error is not None:
            return str(_local.error)
        if not status or not status[0].startswith("200"):
            return f"HTTP {status[0] if status else '?'}"
        return None

    def broadcast(self, threads: int, job: Any, wait: float, during: Window | None = None) -> bool:
        done = threading.Semaphore(0)
        for jobs in self.queues[:threads]:
            jobs.put((job, done))
        deadline = time.monotonic() + wait
        if during is not None:
            during.usage = usage_during(during.start, during.end)
        return all(
            done.acquire(timeout=max(deadline - time.monotonic(), 0.0)) for _ in range(threads)
        )

    def window(
        self,
        threads: int,
        warmup: float,
        duration: float,
        timeout: float,
        statements: int = 1,
        workload: str | None = None,
    ) -> dict[str, Any]:
        self.ensure_threads(threads)
        stats_before = pool_stats()
        begin = perf_counter() + 0.01
        job = Window(
            threads, begin + warmup, begin + warmup + duration, workload or str(statements)
        )
        # A thread can be stuck in its pool's queue up to the pool timeout past the end.
        finished = self.broadcast(threads, job, warmup + duration + timeout + 30.0, during=job)
        self.broadcast(threads, "close", 30.0)  # persistent connections: give them back
        result: dict[str, Any] = {
            "threads": threads,
            "statements": statements,
            "workload": workload or str(statements),
            "duration": duration,
            "finished": finished,
            "per_thread_ok": [r.ok for r in job.records],
            "errors": dict(sum((r.errors for r in job.records), Counter())),
            "latency": summarize(
                [lat for r in job.records for lat in r.latencies]
                + [r.censored for r in job.records if r.censored is not None]
            ),
            "in_flight": sum(r.censored is not None for r in job.records),
        }
        # The process's CPU time and context switches per request completed in the
        # window: what the configuration costs beyond the requests themselves.
        completed = sum(r.ok + sum(r.errors.values()) for r in job.records)
        if completed:
            result["per_request"] = {key: value / completed for key, value in job.usage.items()}
        # Counters over the window (warm-up and the closing of connections included).
        result["pool_stats"] = stats_delta(stats_before, pool_stats())
        return result


def _usage() -> dict[str, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "cpu_us": (ru.ru_utime + ru.ru_stime) * 1e6,
        "voluntary_switches": ru.ru_nvcsw,
        "involuntary_switches": ru.ru_nivcsw,
    }


def usage_during(start: float, end: float) -> dict[str, float]:
    """Resource usage of this process between two perf_counter() instants to come."""
    time.sleep(max(start - perf_counter(), 0.0))
    before = _usage()
    time.sleep(max(end - perf_counter(), 0.0))
    after = _usage()
    return {key: after[key] - before[key] for key in after}


def summarize(latencies: list[float]) -> dict[str, float | int]:
    """Nearest-rank percentiles, in seconds."""
    latencies.sort()
    if not latencies:
        return {"count": 0}

    def rank(fraction: float) -> float:
        return latencies[min(len(latencies) - 1, max(0, round(fraction * len(latencies)) - 1))]

    return {
        "count": len(latencies),
        "mean": sum(latencies) / len(latencies),
        "p50": rank(0.50),
        "p90": rank(0.90),
        "p99": rank(0.99),
        "p999": rank(0.999),
        "max": latencies[-1],
    }


def pool_stats() -> dict[str, Any] | None:
    if not CONFIG["name"].startswith("herokupool"):
        return None
    import herokupool

    return herokupool.stats().get("default")


def stats_delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any]:
    """The pool's counters over a window (measures as they were at its end)."""
    if after is None:
        return {}
    before = before or {}
    counters = ("borrows", "releases", "waits", "wait_time", "timeouts", "validations")
    return {
        key: (value - before.get(key, 0)) if key in counters else value
        for key, value in after.items()
    }


def micro(seconds: float) -> dict[str, Any]:
    """Seconds per ensure_connection() + close_if_unusable_or_obsolete() on this
    thread's connection: a request's connection handling, without the query."""
    end_request = connection.close_if_unusable_or_obsolete
    connection.ensure_connection()  # the pool exists and holds a connection
    end_request()
    batch = 20
    count = 0
    started = perf_counter()
    deadline = started + seconds
    while True:
        for _ in range(batch):
            connection.ensure_connection()
            end_request()
        count += batch
        if perf_counter() >= deadline:
            break
    elapsed = perf_counter() - started
    connection.close()
    return {"per_op": elapsed / count, "ops": count}


def requests(driver: Driver, seconds: float, workload: str = "1") -> dict[str, Any]:
    """Wall-clock and CPU seconds per request of ``workload`` (one statement by default), on
    this thread alone."""
    rng = random.Random(12)
    paths = [f"{PREFIXES[workload]}{rng.randint(1, ROWS)}/" for _ in range(997)]
    for path in paths[:20]:  # warm: the pool exists, the connection is open
        driver.request(path)
    count = 0
    errors = 0
    started = perf_counter()
    cpu_started = time.thread_time()
    deadline = started + seconds
    while True:
        for path in paths[count % 900 : count % 900 + 20]:
            errors += driver.request(path) is not None
        count += 20
        if perf_counter() >= deadline:
            break
    elapsed = perf_counter() - started
    cpu = time.thread_time() - cpu_started
    # What the server holds prepared for the connection this thread gets next (a pool's most
    # recently used one, which served the batch): the proof that prepare_threshold did work.
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_prepared_statements")
        (prepared,) = cursor.fetchone()
    connections.close_all()
    return {
        "per_request": elapsed / count,
        "cpu_per_request": cpu / count,
        "requests": count,
        "errors": errors,
        "server_prepared_statements": prepared,
    }


def main() -> None:
    # The protocol owns stdout; anything printed by the libraries goes to stderr.
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr
    logging.disable(logging.ERROR)
    driver = Driver()
    timeout = float(os.environ.get("BENCH_POOL_TIMEOUT", "10"))
    for line in sys.stdin:
        command = json.loads(line)
        op = command["op"]
        if op == "quit":
            break
        if op == "window":
            reply = driver.window(
                command["threads"],
                command["warmup"],
                command["duration"],
                timeout,
                command.get("statements", 1),
                command.get("workload"),
            )
        elif op == "micro":
            reply = micro(command["seconds"])
        elif op == "requests":
            reply = requests(driver, command["seconds"], command.get("workload", "1"))
        elif op == "ping":
            reply = {"pid": os.getpid(), "django": django.get_version()}
        else:
            reply = {"error": f"unknown op {op!r}"}
        out.write(json.dumps(reply) + "\n")
    out.close()


if __name__ == "__main__":
    main()
