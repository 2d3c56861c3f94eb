"""herokupool.metrics on scripted waits and an injected clock, and the pool's use of it:
percentiles, the window's expiry, the l2met line parsed back, the advice warning, load
shedding (MAX_WAITING) and the two settings."""

from __future__ import annotations

import logging
import math
import random
import re
import sys
import threading
import time
from collections.abc import Mapping

import pytest
from django.core.exceptions import ImproperlyConfigured

import herokupool
from herokupool import metrics
from herokupool.errors import PoolOverloaded, PoolTimeout
from herokupool.metrics import (
    ADVICE_MIN_BORROWS,
    PUBLISH_INTERVAL,
    SLOW_WAIT,
    WINDOW,
    MetricsReporter,
    WaitWindow,
    _percentiles,
    add_publisher,
    advice,
    l2met_line,
    remove_publisher,
)
from herokupool.options import parse_options
from tests.helpers import wait_until
from tests.unit.fakes import FakeClock
from tests.unit.test_pool import make_pool

T0 = 1200.0  # a multiple of the slot width: slots start at T0


# ------------------------------------------------------------------ the window


def scripted(window: WaitWindow, now: float) -> None:
    """200 borrows at ``now``: 100 got a connection at once, 100 waited 1, 2, ... 100 ms."""
    for in_use in range(100):
        window.note_in_use(1 + in_use % 4, now)
    for ms in range(1, 101):
        window.record_wait(ms / 1000.0, now)
        window.note_in_use(4, now)


def test_percentiles_of_a_scripted_sequence_count_every_borrow() -> None:
    window = WaitWindow()
    scripted(window, T0 + 1.0)
    snap = window.snapshot(T0 + 2.0)
    # Nearest rank over 200 borrows, 100 of them at 0 s: p50 is the 100th (0 s), p95 the
    # 190th (the 90th wait), p99 the 198th (the 98th wait).
    assert snap["wait_p50"] == 0.0
    assert snap["wait_p95"] == pytest.approx(0.090)
    assert snap["wait_p99"] == pytest.approx(0.098)
    assert snap["wait_max"] == pytest.approx(0.100)
    assert snap["recent_borrows"] == 200
    assert snap["recent_waits"] == 100
    assert snap["recent_slow_waits"] == 1  # only the 100 ms wait reached SLOW_WAIT
    assert SLOW_WAIT == 0.1
    assert snap["peak_in_use"] == 4
    assert (snap["recent_timeouts"], snap["recent_shed"]) == (0, 0)
    assert snap["recent_window"] == WINDOW


def test_timeouts_count_in_the_percentiles() -> None:
    window = WaitWindow()
    scripted(window, T0)
    for _ in range(4):
        window.record_timeout(5.0, T0 + 1.0)
    window.record_shed(T0 + 1.0)
    snap = window.snapshot(T0 + 1.0)
    # 204 attempts: ranks 194 (p95) and 202 (p99) of 100 zeros, 100 waits, 4 timeouts.
    assert snap["wait_p95"] == pytest.approx(0.094)
    assert snap["wait_p99"] == 5.0
    assert snap["wait_max"] == 5.0
    assert (snap["recent_timeouts"], snap["recent_waits"], snap["recent_shed"]) == (4, 104, 1)
    assert snap["recent_borrows"] == 200, "a timed-out or shed borrow is no borrow"


def test_old_waits_leave_the_window() -> None:
    window = WaitWindow()  # 60 s in 12 slots of 5 s
    window.record_wait(2.0, T0)
    window.note_in_use(3, T0)
    window.note_waiting(7, T0)
    for second in range(30):
        window.note_in_use(1, T0 + 30 + second)
        window.record_wait(0.010, T0 + 30 + second)
    snap = window.snapshot(T0 + 59.0)
    assert (snap["wait_max"], snap["peak_in_use"], snap["peak_waiting"]) == (2.0, 3, 7)
    assert snap["recent_borrows"] == 31
    # The slot [T0, T0+5) has left once its end is more than 60 s old.
    snap = window.snapshot(T0 + 65.0)
    assert snap["wait_max"] == 0.010
    assert (snap["peak_in_use"], snap["peak_waiting"]) == (1, 0)
    assert snap["recent_borrows"] == 30
    assert snap["wait_p50"] == 0.010
    snap = window.snapshot(T0 + 200.0)
    assert snap["recent_borrows"] == snap["recent_waits"] == 0
    assert snap["wait_p99"] == snap["wait_max"] == 0.0


def test_a_borrow_noted_while_another_thread_starts_a_slot_is_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another thread may run at any call the thread starting a slot makes (here: making the
    new slot): a borrow it notes then, without the lock, is counted in the slot ending or in
    the next, never lost with the fields the slot change resets."""
    window = WaitWindow()
    window.note_in_use(1, T0)

    class Interleaved(metrics._Slot):
        def __init__(self, start: float) -> None:
            window.note_in_use(2, T0 + 1.0)  # a thread still in the slot [T0, T0 + 5)
            super().__init__(start)

    monkeypatch.setattr(metrics, "_Slot", Interleaved)
    window.note_in_use(3, T0 + 5.0)  # starts the slot [T0 + 5, T0 + 10)
    snap = window.snapshot(T0 + 6.0)
    assert (snap["recent_borrows"], snap["peak_in_use"]) == (3, 3)


def test_a_slot_width_that_floats_cannot_hold_exactly_starts_each_slot_once() -> None:
    """With slots of 0.1 s, ``floor(1216.8 / 0.1) * 0.1`` is 1216.7: a slot that ended before
    the time it was made for, so every record at that time started it again, pushing the
    window's real slots out."""
    window = WaitWindow(slots=600)  # 60 s in 600 slots of 0.1 s
    window.record_wait(0.01, 1216.0)
    for _ in range(700):
        window.record_wait(0.01, 1216.8)
    assert window.snapshot(1216.8)["recent_waits"] == 701


def test_waits_and_borrows_recorded_by_many_threads_at_once_are_all_counted() -> None:
    """``record_wait`` and ``note_in_use`` take the window's lock only when a slot ends: eight
    threads recording at once, across slot changes and with the interpreter switching threads
    as often as it can, lose no wait, no borrow and no maximum."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    window = WaitWindow(samples=16)  # 60 s in 12 slots of 5 s
    per_thread = 3_000
    start = threading.Barrier(8)

    def record(index: int) -> None:
        start.wait()
        for i in range(per_thread):
            now = T0 + i * (50.0 / per_thread)  # through 10 slots, all in the window
            window.record_wait(0.001 * index + (0.5 if i == index else 0.0), now)
            window.note_in_use(1 + index, now)

    threads = [threading.Thread(target=record, args=(index,)) for index in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    snap = window.snapshot(T0 + 55.0)
    assert (snap["recent_waits"], snap["recent_borrows"]) == (8 * per_thread, 8 * per_thread)
    assert snap["recent_slow_waits"] == 8
    assert (snap["wait_max"], snap["peak_in_use"]) == (0.507, 8)


def test_a_slot_keeps_a_bounded_sample_but_exact_counts_and_maximum() -> None:
    window = WaitWindow(samples=16)
    for ms in range(1, 1001):
        window.record_wait(ms / 1000.0, T0)
        window.note_in_use(1, T0)
    snap = window.snapshot(T0)
    assert (snap["recent_waits"], snap["recent_borrows"]) == (1000, 1000)
    assert snap["recent_slow_waits"] == 901
    assert snap["wait_max"] == 1.0
    assert 0.0 < snap["wait_p50"] <= 1.0
    assert len(window._current.samples) == 16


@pytest.mark.parametrize("seed", range(20))
def test_percentiles_are_the_nearest_rank_of_the_whole_population(seed: int) -> None:
    # Whole weights, so the population can be written out: each value ``weight`` times,
    # after ``zeros`` zeros; the nearest-rank percentile is then one index into it.
    rng = random.Random(seed)
    count = rng.randint(1, 300)
    values = [rng.choice([rng.random(), rng.randint(0, 5) / 10]) for _ in range(count)]  # ties
    weights = [float(rng.randint(1, 4)) for _ in range(count)]
    zeros = rng.choice([0, rng.randint(0, 3 * count)])
    written = [v for v, w in zip(values, weights, strict=True) for _ in range(int(w))]
    population = sorted([0.0] * zeros + written)
    wanted = [50.0, 90.0, 95.0, 99.0, 99.9, 100.0]
    expected = [population[max(math.ceil(p / 100 * len(population)), 1) - 1] for p in wanted]
    assert _percentiles(values, weights, zeros, wanted) == expected


# ------------------------------------------------------------------ the pool


def test_the_pool_reports_a_wait_and_the_peaks() -> None:
    pool = make_pool(max_conns=1)
    held = pool.borrow()
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(pool.borrow()))
    waiter.start()
    assert wait_until(lambda: pool.stats()["waiting"] == 1)
    time.sleep(0.02)
    pool.release(held)
    waiter.join()
    stats = pool.stats()
    assert stats["recent_borrows"] == 2
    assert stats["recent_waits"] == 1
    assert stats["wait_max"] > 0.0
    assert stats["wait_max"] == stats["wait_p99"], "1 of 2 borrows waited: p99 is that wait"
    assert stats["wait_p50"] == 0.0
    assert (stats["peak_in_use"], stats["peak_waiting"]) == (1, 1)
    pool.release(got[0])


def test_a_timeout_is_in_the_window() -> None:
    pool = make_pool(max_conns=1, timeout=0.02)
    pool.borrow()
    with pytest.raises(PoolTimeout):
        pool.borrow()
    stats = pool.stats()
    assert (stats["recent_timeouts"], stats["timeouts"], stats["recent_waits"]) == (1, 1, 1)
    assert stats["wait_max"] >= 0.0


# ------------------------------------------------------------------ load shedding


def test_max_waiting_refuses_at_once_when_that_many_wait() -> None:
    pool = make_pool(max_conns=1, max_waiting=1, timeout=30.0, name="web")
    held = pool.borrow()
    served: list[object] = []
    waiter = threading.Thread(target=lambda: served.append(pool.borrow()))
    waiter.start()
    assert wait_until(lambda: pool.stats()["waiting"] == 1)
    started = time.monotonic()
    with pytest.raises(PoolOverloaded) as refused:
        pool.borrow()
    assert time.monotonic() - started < 5.0, "refused without waiting for the 30 s timeout"
    assert isinstance(refused.value, PoolTimeout)
    assert str(refused.value) == (
        "pool 'web': 1 borrowers already waiting (max_waiting 1), so this one was refused at "
        "once (1 in use, 0 idle, max 1)"
    )
    stats = pool.stats()
    assert (stats["shed"], stats["recent_shed"], stats["waits"], stats["timeouts"]) == (1, 1, 1, 0)
    pool.release(held)
    waiter.join()
    pool.release(served[0])
    stats = pool.stats()
    assert stats["borrows"] == stats["releases"] == 2
    assert stats["in_use"] == stats["waiting"] == 0


def test_max_waiting_zero_never_queues_and_none_always_does() -> None:
    pool = make_pool(max_conns=1, max_waiting=0)
    conn = pool.borrow()
    with pytest.raises(PoolOverloaded, match="0 borrowers already waiting"):
        pool.borrow()
    pool.release(conn)
    assert pool.borrow() is conn, "with a free connection nothing is shed"
    unbounded = make_pool(max_conns=1, timeout=0.01)
    unbounded.borrow()
    with pytest.raises(PoolTimeout) as info:
        unbounded.borrow()
    assert not isinstance(info.value, PoolOverloaded)


def test_a_negative_max_waiting_is_refused() -> None:
    with pytest.raises(ValueError, match=r"max_waiting \(-1\) must be at least 0"):
        make_pool(max_waiting=-1)


# ------------------------------------------------------------------ the l2met line

L2MET = re.compile(
    r"(?P<kind>sample|count|measure)#(?P<name>[\w.\-]+)=(?P<value>[\d.]+)(?P<unit>ms)?"
)


def parse_l2met(line: str) -> tuple[dict[str, str], dict[tuple[str, str], float]]:
    """(plain key=value pairs, {(kind, metric): value}) of one l2met line."""
    plain: dict[str, str] = {}
    metrics: dict[tuple[str, str], float] = {}
    for token in line.split():
        match = L2MET.fullmatch(token)
        if match:
            metrics[(match["kind"], match["name"])] = float(match["value"])
        else:
            key, _, value = token.partition("=")
            plain[key] = value
    return plain, metrics


def metric_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "herokupool.metrics"]


def test_the_l2met_line_parses_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("DYNO", "web.2")
    clock = FakeClock(T0)
    pool = make_pool(max_conns=3, clock=clock, log_metrics=60.0, name="default")
    conns = [pool.borrow() for _ in range(3)]
    pool.release(conns.pop())
    with caplog.at_level(logging.INFO, logger="herokupool.metrics"):
        clock.advance(59.0)
        pool.run_maintenance()
        assert metric_lines(caplog) == [], "not before the interval"
        clock.advance(1.0)
        pool.run_maintenance()
        pool.run_maintenance()
        assert len(metric_lines(caplog)) == 1, "one line per interval"
        pool.release(conns.pop())
        pool.borrow()
        pool.borrow()
        clock.advance(60.0)
        pool.run_maintenance()
    first, second = metric_lines(caplog)
    plain, metrics = parse_l2met(first)
    assert plain == {"source": "web.2", "pid": str(__import__("os").getpid()), "pool": "default"}
    prefix = "herokupool.default"
    assert metrics[("sample", f"{prefix}.in_use")] == 2
    assert metrics[("sample", f"{prefix}.idle")] == 1
    assert metrics[("sample", f"{prefix}.max")] == 3
    assert metrics[("sample", f"{prefix}.peak_in_use")] == 3
    assert metrics[("count", f"{prefix}.borrows")] == 3
    assert metrics[("count", f"{prefix}.timeouts")] == 0
    assert metrics[("count", f"{prefix}.shed")] == 0
    assert metrics[("measure", f"{prefix}.wait_p99")] == 0.0
    assert " measure#herokupool.default.wait_max=0.000ms" in first
    every = {name.rsplit(".", 1)[1] for _, name in metrics}
    assert every >= {"in_use", "idle", "waiting", "connecting", "borrows", "waits", "wait_p50",
                     "wait_p95", "wait_p99", "wait_max", "connections_created"}  # fmt: skip
    _, later = parse_l2met(second)
    assert later[("count", f"{prefix}.borrows")] == 2, "counts are the increase since last line"
    assert later[("sample", f"{prefix}.in_use")] == 3


def test_the_line_without_a_dyno_names_the_host_and_is_one_token_per_field() -> None:
    line = l2met_line(
        "my alias=x#", {"in_use": 1, "borrows": 5, "wait_p95": 0.25}, {"borrows": 2},
        source="host-1", pid=42,
    )  # fmt: skip
    assert line == (
        "source=host-1 pid=42 pool=my_alias_x_ sample#herokupool.my_alias_x_.in_use=1 "
        "count#herokupool.my_alias_x_.borrows=3 measure#herokupool.my_alias_x_.wait_p95=250.000ms"
    )


def test_no_line_without_log_metrics(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock(T0)
    pool = make_pool(clock=clock)
    pool.release(pool.borrow())
    with caplog.at_level(logging.INFO, logger="herokupool.metrics"):
        for _ in range(5):
            clock.advance(3600.0)
            pool.run_maintenance()
    assert metric_lines(caplog) == []


@pytest.mark.parametrize(("value", "expected"), [("60", 60.0), ("0.5", 0.5), ("", None)])
def test_log_metrics_setting(value: str, expected: float | None) -> None:
    assert parse_options({"LOG_METRICS": value})["log_metrics"] == expected


@pytest.mark.parametrize(("value", "expected"), [("8", 8), (0, 0), ("none", None), (None, None)])
def test_max_waiting_setting(value: object, expected: int | None) -> None:
    assert parse_options({"MAX_WAITING": value})["max_waiting"] == expected


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgres://app:s3cret@db.example.com:5432/app")
    monkeypatch.setenv("POOL_MAX_WAITING", "16")
    monkeypatch.setenv("POOL_LOG_METRICS", "60")
    options = herokupool.config()["default"]["OPTIONS"]
    assert (options["MAX_WAITING"], options["LOG_METRICS"]) == (16, 60.0)
    monkeypatch.setenv("POOL_MAX_WAITING", "-3")
    with pytest.raises(ImproperlyConfigured, match="POOL_MAX_WAITING") as bad:
        herokupool.config()
    assert "s3cret" not in str(bad.value)
    monkeypatch.setenv("POOL_MAX_WAITING", "")
    monkeypatch.setenv("POOL_LOG_METRICS", "0")
    with pytest.raises(ImproperlyConfigured, match="POOL_LOG_METRICS"):
        herokupool.config()


# ------------------------------------------------------------------ advice


def busy(slow: int, borrows: int = 100, **extra: float) -> dict[str, int | float]:
    return {
        "max": 4, "peak_in_use": 4, "peak_waiting": 6, "recent_window": 60.0,
        "recent_borrows": borrows, "recent_slow_waits": slow, "recent_timeouts": 0,
        "recent_shed": 0, "wait_p50": 0.0, "wait_p95": 0.35, "wait_p99": 0.8, "wait_max": 1.2,
        **extra,
    }  # fmt: skip


def test_advice_names_the_figures_and_the_knob() -> None:
    text = advice("default", busy(slow=12))
    assert text == (
        "pool 'default': in the last 60 s 12 of 100 borrows (12%) waited 100 ms or longer for a "
        "connection, 0 timed out and 0 were shed (wait p50 0 ms, p95 350 ms, p99 800 ms, max "
        "1200 ms; peak 4 of 4 in use, 6 waiting). Every connection was busy: raise MAX_CONNS "
        "(POOL_MAX_CONNS, now 4) as long as web dynos x WEB_CONCURRENCY x POOL_MAX_CONNS stays "
        "within the database plan's connection limit, or run fewer threads per process "
        "(GUNICORN_THREADS); when the plan's limit is what stops you, put PgBouncer "
        "(transaction mode) between the app and the database and size POOL_MAX_CONNS to the "
        "threads."
    )


def test_no_advice_when_few_borrows_waited_or_there_were_few_borrows() -> None:
    assert advice("default", busy(slow=9)) is None
    assert advice("default", busy(slow=5, borrows=ADVICE_MIN_BORROWS - 1)) is None
    assert advice("default", busy(slow=0, borrows=0)) is None


def test_a_single_timeout_is_worth_advice_with_the_fail_fast_setting() -> None:
    text = advice("default", busy(slow=1, borrows=3, recent_timeouts=1))
    assert text is not None
    assert "1 timed out" in text
    assert text.endswith("set MAX_WAITING (POOL_MAX_WAITING).")


def test_waits_below_the_maximum_point_at_connecting_not_at_the_size() -> None:
    text = advice("default", busy(slow=50, peak_in_use=2))
    assert text is not None
    assert "Fewer than 4 connections were in use" in text
    assert "raise MAX_CONNS" not in text


def test_one_advice_warning_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    window = WaitWindow()
    reporter = MetricsReporter("default", log_interval=None, started=T0)

    def stats() -> dict[str, int | float]:
        return {"max": 2, **window.snapshot(now)}

    now = T0
    warned_at = []
    with caplog.at_level(logging.WARNING, logger="herokupool.metrics"):
        for second in range(200):
            now = T0 + second
            window.note_in_use(2, now)
            if second < 100:  # for 100 s every borrow waits 0.5 s, then none
                window.record_wait(0.5, now)
            before = len(caplog.records)
            reporter.tick(stats, now)
            if len(caplog.records) > before:
                warned_at.append(second)
    # A warning once 20 borrows are in the window, then at most one a minute while the
    # window holds slow waits: at t=139 it still holds t=80..99 (20 of 60), at t=199 none.
    assert warned_at == [19, 79, 139]
    assert all("POOL_MAX_CONNS" in r.getMessage() for r in caplog.records)


def test_publishers_get_the_stats_from_the_maintenance_tick(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock(T0)
    pool = make_pool(clock=clock, name="pub")
    seen: list[tuple[str, int]] = []

    def publish(name: str, stats: Mapping[str, int | float]) -> None:
        seen.append((name, int(stats["borrows"])))

    def broken(name: str, stats: Mapping[str, int | float]) -> None:
        raise RuntimeError("exporter down")

    add_publisher(publish)
    add_publisher(publish)  # once is enough
    add_publisher(broken)
    try:
        pool.release(pool.borrow())
        with caplog.at_level(logging.ERROR, logger="herokupool.metrics"):
            pool.run_maintenance()
            clock.advance(PUBLISH_INTERVAL / 2)
            pool.run_maintenance()
            pool.release(pool.borrow())
            clock.advance(PUBLISH_INTERVAL / 2)
            pool.run_maintenance()
    finally:
        remove_publisher(publish)
        remove_publisher(broken)
    assert seen == [("pub", 1), ("pub", 2)]
    assert [r.getMessage() for r in caplog.records] == [
        "pool 'pub': a metrics publisher failed"
    ] * 2
    clock.advance(PUBLISH_INTERVAL)
    pool.run_maintenance()
    assert len(seen) == 2, "removed"
