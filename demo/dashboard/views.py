"""The demo's views: the page, its JSON twin, /healthz, and two ways to put load on the pool.

Every number about the pool comes from ``herokupool.stats()``, which describes the pools of
the process it runs in: with ``WEB_CONCURRENCY=2`` each gunicorn worker has its own pool, and
consecutive requests may well be answered by different workers (the page says which).
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from typing import Any

import django
from django.db import DEFAULT_DB_ALIAS, DatabaseError, OperationalError, connection, connections
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST, require_safe

import herokupool
from demo.dashboard import charts
from demo.dashboard.models import Burst, Visit
from herokupool import metrics

#: Visits shown in the chart and listed (the newest few) on the page.
RECENT = 60
LISTED = 8
#: Longest /api/work?hold= accepted, in seconds.
MAX_HOLD = 1.0

#: The in-process burst: BURST_FACTOR threads per pooled connection, each running
#: BURST_ROUNDS queries that hold their connection for BURST_HOLD seconds, so the pool
#: queues for about BURST_FACTOR x BURST_ROUNDS x BURST_HOLD seconds whatever MAX_CONNS is.
BURST_FACTOR = 3
BURST_ROUNDS = 3
BURST_HOLD = 0.2
BURST_MAX_THREADS = 48
#: No round starts after this many seconds: the whole answer stays within Heroku's 30 s.
BURST_DEADLINE = 15.0
BURST_SAMPLE_EVERY = 0.02

# One burst at a time per worker: two would only make each other's chart unreadable.
_burst_lock = threading.Lock()


def _snapshot(path: str, hold: float = 0.0) -> dict[str, Any]:
    """Borrow a connection, query, record a Visit; return what this request saw.

    Raises DatabaseError (``django.db.OperationalError`` for a PoolTimeout) when the
    database cannot be reached.
    """
    started = time.perf_counter()
    connection.ensure_connection()  # the borrow: this may queue behind other threads
    acquire_ms = (time.perf_counter() - started) * 1000.0
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid(), pg_sleep(%s)", [hold])
        backend_pid = int(cursor.fetchone()[0])
    # Sampled while this request still holds its connection: in_use counts it.
    pools = herokupool.stats()
    mine = pools.get(connection.alias, {})
    visit = Visit.objects.create(
        path=path[:100],
        worker_pid=os.getpid(),
        backend_pid=backend_pid,
        acquire_ms=round(acquire_ms, 3),
        in_use=int(mine.get("in_use", 0)),
        idle=int(mine.get("idle", 0)),
        waiting=int(mine.get("waiting", 0)),
        max_conns=int(mine.get("max", 0)),
    )
    if visit.pk % Visit.PRUNE_EVERY == 0:
        Visit.objects.filter(pk__lte=visit.pk - Visit.KEEP).delete()
    return {
        **_process(),
        "backend_pid": backend_pid,
        "acquire_ms": round(acquire_ms, 3),
        "requests_recorded": visit.pk,
        "pools": pools,
    }


def _waits(current: dict[str, Any]) -> dict[str, Any]:
    """The waits card: percentiles in ms, the advice the pool would log, its l2met line."""
    if not current:
        return {"waits": None, "advice": None, "metrics_line": None, "log_metrics": None}
    return {
        "waits": {
            "window": current.get(metrics.RECENT_WINDOW, metrics.WINDOW),
            "percentiles": [
                (label, charts.ms(current.get(key, 0.0)))
                for label, key in (
                    ("p50", metrics.WAIT_P50),
                    ("p95", metrics.WAIT_P95),
                    ("p99", metrics.WAIT_P99),
                    ("max", metrics.WAIT_MAX),
                )
            ],
        },
        "advice": metrics.advice(DEFAULT_DB_ALIAS, current),
        "metrics_line": metrics.l2met_line(DEFAULT_DB_ALIAS, current),
        "log_metrics": connections[DEFAULT_DB_ALIAS].settings_dict["OPTIONS"].get("LOG_METRICS"),
    }


def _process() -> dict[str, Any]:
    return {
        "dyno": os.environ.get("DYNO", "local"),
        "worker_pid": os.getpid(),
        "master_pid": os.getppid(),
    }


def _visit_json(visit: Visit) -> dict[str, Any]:
    return {
        "id": visit.pk,
        "created": visit.created.isoformat(),
        "path": visit.path,
        "worker_pid": visit.worker_pid,
        "backend_pid": visit.backend_pid,
        "acquire_ms": visit.acquire_ms,
        "in_use": visit.in_use,
        "idle": visit.idle,
        "waiting": visit.waiting,
        "max": visit.max_conns,
    }


def _error_text(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


@never_cache
@require_safe
def index(request: HttpRequest) -> HttpResponse:
    context: dict[str, Any] = {
        "django_version": django.get_version(),
        "herokupool_version": herokupool.__version__,
        "error": None,
    }
    status = 200
    try:
        context.update(_snapshot(request.path))
        recent = list(Visit.objects.all()[:RECENT])[::-1]
    except DatabaseError as error:
        # Still a page: the stats show the failed connects and timeouts while it recovers.
        status = 503
        context.update(_process(), backend_pid=None, pools=herokupool.stats())
        context["error"] = _error_text(error)
        recent = []
    context["stat_groups"] = charts.stat_groups(context["pools"])
    context["aliases"] = sorted(context["pools"])
    context["current"] = context["pools"].get(DEFAULT_DB_ALIAS, {})
    context.update(_waits(context["current"]))
    context["chart"] = charts.recent_chart(recent)
    context["listed"] = recent[::-1][:LISTED]
    context["burst"] = {"factor": BURST_FACTOR, "rounds": BURST_ROUNDS, "hold": BURST_HOLD}
    last_burst = None
    if context["error"] is None:
        last_burst = Burst.objects.first()
    context["last_burst"] = last_burst
    context["burst_chart"] = charts.burst_chart(last_burst) if last_burst else None
    return render(request, "dashboard/index.html", context, status=status)


@never_cache
@require_GET
def stats_json(request: HttpRequest) -> JsonResponse:
    """The page's data as JSON (the same database work, the same stats)."""
    try:
        data = _snapshot(request.path)
    except DatabaseError as error:
        return JsonResponse(
            {**_process(), "error": _error_text(error), "pools": herokupool.stats()}, status=503
        )
    data["recent"] = [_visit_json(visit) for visit in Visit.objects.all()[:RECENT]]
    return JsonResponse(data)


@never_cache
@require_GET
def work(request: HttpRequest) -> JsonResponse:
    """A request that holds its connection for ``?hold=`` seconds: the load command's target."""
    try:
        hold = min(max(float(request.GET.get("hold", "0.05")), 0.0), MAX_HOLD)
    except ValueError:
        error = f"hold must be a number of seconds, at most {MAX_HOLD}"
        return JsonResponse({"error": error}, status=400)
    try:
        data = _snapshot(request.path, hold=hold)
    except DatabaseError as error:
        return JsonResponse(
            {**_process(), "error": _error_text(error), "pools": herokupool.stats()}, status=503
        )
    return JsonResponse({**data, "hold": hold})


@never_cache
@require_safe
def healthz(request: HttpRequest) -> JsonResponse:
    """200 when this worker can borrow a connection and run a query, else 503."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            backend_pid = int(cursor.fetchone()[0])
    except DatabaseError as error:
        return JsonResponse(
            {
                "status": "error",
                **_process(),
                "error": _error_text(error),
                "pools": herokupool.stats(),
            },
            status=503,
        )
    return JsonResponse(
        {"status": "ok", **_process(), "backend_pid": backend_pid, "pools": herokupool.stats()}
    )


@never_cache
@require_POST
def burst(request: HttpRequest) -> HttpResponse:
    """Queue the pool on purpose: BURST_FACTOR x MAX_CONNS threads in this worker.

    Samples the pool's in_use / idle / waiting every 20 ms while the threads run and saves
    the result as a Burst, which the page draws. Answers JSON to clients that accept it,
    and sends browsers (the page's plain form) back to the page.
    """
    if not _burst_lock.acquire(blocking=False):
        return JsonResponse(
            {**_process(), "error": "a burst is already running on this worker"}, status=409
        )
    try:
        result = _run_burst()
        saved = Burst.objects.create(
            worker_pid=result["worker_pid"],
            threads=result["threads"],
            rounds=result["rounds"],
            hold=result["hold"],
            max_conns=result["max"],
            elapsed=result["elapsed"],
            ok=result["outcome"]["ok"],
            timeouts=result["outcome"]["timeout"],
            errors=result["outcome"]["error"] + result["outcome"]["skipped"],
            peak_waiting=result["peak_waiting"],
            timeline=result["timeline"],
        )
        Burst.objects.filter(pk__lte=saved.pk - Burst.KEEP).delete()
    except DatabaseError as error:
        return JsonResponse(
            {**_process(), "error": _error_text(error), "pools": herokupool.stats()}, status=503
        )
    finally:
        _burst_lock.release()
    if "application/json" in request.headers.get("Accept", ""):
        return JsonResponse(result)
    response = redirect("/#burst")
    response.status_code = 303  # See Other: the browser GETs the page, which draws the burst
    return response


def _run_burst() -> dict[str, Any]:
    alias = DEFAULT_DB_ALIAS
    connection.ensure_connection()  # creates this worker's pool if it is the first request
    max_conns = int(herokupool.stats()[alias]["max"])
    # Give this request's connection back: the burst's threads compete for the whole pool.
    connection.close()
    count = min(BURST_FACTOR * max_conns, BURST_MAX_THREADS)
    outcome: Counter[str] = Counter()
    lock = threading.Lock()
    started = time.monotonic()

    def run() -> None:
        db = connections[alias]  # this thread's own wrapper, as in any Django thread
        try:
            for _ in range(BURST_ROUNDS):
                if time.monotonic() - started > BURST_DEADLINE:
                    result = "skipped"
                else:
                    try:
                        with db.cursor() as cursor:
                            cursor.execute("SELECT pg_sleep(%s)", [BURST_HOLD])
                        result = "ok"
                    except OperationalError as error:
                        timed_out = isinstance(error.__cause__, herokupool.PoolTimeout)
                        result = "timeout" if timed_out else "error"
                    finally:
                        db.close()  # back to the pool, to the thread that waited longest
                with lock:
                    outcome[result] += 1
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, name=f"burst-{n}", daemon=True) for n in range(count)]
    for thread in threads:
        thread.start()
    timeline = []
    while True:
        alive = any(thread.is_alive() for thread in threads)
        stats = herokupool.stats().get(alias, {})
        timeline.append(
            {
                "t": round(time.monotonic() - started, 3),
                **{key: stats.get(key, 0) for key in ("in_use", "idle", "waiting", "connecting")},
            }
        )
        if not alive:
            break
        time.sleep(BURST_SAMPLE_EVERY)
    for thread in threads:
        thread.join()
    return {
        **_process(),
        "threads": count,
        "rounds": BURST_ROUNDS,
        "hold": BURST_HOLD,
        "max": max_conns,
        "elapsed": round(time.monotonic() - started, 3),
        "outcome": {key: outcome.get(key, 0) for key in ("ok", "timeout", "error", "skipped")},
        "peak_waiting": max(point["waiting"] for point in timeline),
        "timeline": timeline,
        "pools": herokupool.stats(),
    }
