"""What a pool's borrowers lived through lately, said where operators look.

This module knows nothing of Django and nothing of the pool's internals.  A
:class:`~herokupool.pool.ConnectionPool` owns one :class:`WaitWindow` and one
:class:`MetricsReporter`:

- the pool tells the window about every borrow (``note_in_use``, lock-free and O(1)), every
  borrow that had to wait (``record_wait``), every one that timed out (``record_timeout``) or
  was shed by ``max_waiting`` (``record_shed``), and the queue's length whenever a borrower
  joins it (``note_waiting``);
- ``WaitWindow.snapshot(now)`` summarises the last :data:`WINDOW` seconds: wait-time
  percentiles over every borrow (one that did not wait counts as 0 s, so p99 is the wait that
  1 % of requests exceeded), the number of borrows, waits, slow waits, timeouts and shed
  borrows, and the peak in use and peak waiting; the pool merges it into ``stats()``;
- the pool's maintenance thread calls ``MetricsReporter.tick(stats, now)``, which logs one
  line per interval in Heroku's l2met convention when ``log_metrics`` is set, and at most one
  warning per interval when borrowers keep waiting or time out, with the figures and the
  setting to change.

Every function takes the time as an argument (the pool's injected clock), so tests script
waits without sleeping.  Nothing here sees a connection or its parameters: the only text a
line carries is the pool's name (the Django alias), the dyno name and numbers.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import os
import random
import re
import socket
import threading
from collections import deque
from collections.abc import Callable, Mapping
from typing import Final

__all__ = [
    "ADVICE_INTERVAL",
    "PUBLISH_INTERVAL",
    "SLOW_WAIT",
    "WINDOW",
    "MetricsReporter",
    "WaitWindow",
    "add_publisher",
    "advice",
    "l2met_line",
    "remove_publisher",
]

logger = logging.getLogger("herokupool.metrics")

#: Seconds of history the window keeps, in :data:`SLOTS` steps.
WINDOW: Final = 60.0
SLOTS: Final = 12
#: A wait at least this long counts as slow (the advice's threshold).
SLOW_WAIT: Final = 0.1
#: Wait durations kept per slot; beyond it a uniform random sample is kept (the maximum and
#: the counts stay exact), so memory is bounded however many borrowers wait.
SAMPLES_PER_SLOT: Final = 512
#: Warn when at least this share of the window's borrows waited SLOW_WAIT or longer ...
ADVICE_SHARE: Final = 0.1
#: ... out of at least this many borrows (a handful of slow waits at start-up is no pattern).
ADVICE_MIN_BORROWS: Final = 20
#: Seconds between two advice warnings when ``log_metrics`` is not set.
ADVICE_INTERVAL: Final = 60.0
#: Seconds between two calls of the publishers (see :func:`add_publisher`).
PUBLISH_INTERVAL: Final = 10.0

# Names of the values ``WaitWindow.snapshot()`` adds to ``ConnectionPool.stats()``.
# Measures over the window (the last WINDOW seconds).
WAIT_P50: Final = "wait_p50"
WAIT_P95: Final = "wait_p95"
WAIT_P99: Final = "wait_p99"
WAIT_MAX: Final = "wait_max"
RECENT_BORROWS: Final = "recent_borrows"
RECENT_WAITS: Final = "recent_waits"
RECENT_SLOW_WAITS: Final = "recent_slow_waits"
RECENT_TIMEOUTS: Final = "recent_timeouts"
RECENT_SHED: Final = "recent_shed"
PEAK_IN_USE: Final = "peak_in_use"
PEAK_WAITING: Final = "peak_waiting"
RECENT_WINDOW: Final = "recent_window"

#: (percentile, stats key) reported by the window.
PERCENTILES: Final = ((50.0, WAIT_P50), (95.0, WAIT_P95), (99.0, WAIT_P99))


class _Slot:
    """The window's record of one WINDOW / SLOTS seconds."""

    __slots__ = (
        "borrows",
        "longest",
        "peak_in_use",
        "peak_waiting",
        "samples",
        "shed",
        "slow",
        "start",
        "timeouts",
        "waits",
    )

    def __init__(self, start: float) -> None:
        self.start = start
        self.borrows = 0
        self.peak_in_use = 0
        self.peak_waiting = 0
        self.waits = 0  # borrows that queued, served or timed out
        self.slow = 0  # of which waited SLOW_WAIT or longer
        self.timeouts = 0
        self.shed = 0
        self.longest = 0.0
        self.samples: list[float] = []


class WaitWindow:
    """Borrow waits, timeouts and peaks over the last ``window`` seconds.

    ``note_in_use`` runs on every borrow, ``note_waiting`` and ``record_wait`` on every wait,
    so they take no lock but when a slot ends; everything else (a timeout, a shed borrow,
    stats read) takes the window's own lock, never the pool's.  The window advances in
    ``window / slots`` steps: a snapshot covers the last ``window`` seconds and at most one
    step more.
    """

    def __init__(
        self,
        window: float = WINDOW,
        *,
        slots: int = SLOTS,
        slow_wait: float = SLOW_WAIT,
        samples: int = SAMPLES_PER_SLOT,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if window <= 0 or slots < 1 or samples < 1:
            raise ValueError("window must be > 0, slots and samples >= 1")
        self.window = window
        self.slow_wait = slow_wait
        self._step = window / slots
        self._samples = samples
        self._rng = rng
        self._lock = threading.Lock()
        self._done: deque[_Slot] = deque(maxlen=slots)
        self._current = _Slot(float("-inf"))
        # The current slot's end, and its three fields the lock-free paths write.
        self._until = float("-inf")
        self._borrows = 0
        self._peak_in_use = 0
        self._peak_waiting = 0

    # ----------------------------------------------------------------- recording

    def note_in_use(self, in_use: int, now: float) -> None:
        """A borrow succeeded and ``in_use`` connections are now lent.  Lock-free.

        Under CPython's GIL no other thread runs between the compare and the store of these
        plain attribute updates (they call nothing), so no increment is lost; a borrow racing
        a slot change may be counted in the neighbouring slot, which moves no figure that
        matters.
        """
        if now >= self._until:
            with self._lock:
                self._advance(now)
        self._borrows += 1
        if in_use > self._peak_in_use:
            self._peak_in_use = in_use

    def note_waiting(self, waiting: int, now: float) -> None:
        """A borrower joined the queue, which is now ``waiting`` long.  Lock-free, as
        :meth:`note_in_use` is."""
        if now >= self._until:
            with self._lock:
                self._advance(now)
        if waiting > self._peak_waiting:
            self._peak_waiting = waiting

    def record_wait(self, waited: float, now: float) -> None:
        """A borrower that queued was served after ``waited`` seconds.  Lock-free but when a
        slot ends, as :meth:`note_in_use` is: ``_add_wait`` calls nothing between reading a
        field and storing it but ``len()`` and the random number (a wait racing another may
        then overwrite its sample, or keep one sample more than the slot's share), and a wait
        racing a slot change is counted in the slot it read, which the window still holds."""
        if now >= self._until:
            with self._lock:
                self._advance(now)
        self._add_wait(self._current, waited)

    def record_timeout(self, waited: float, now: float) -> None:
        """A borrower gave up after ``waited`` seconds (a PoolTimeout).

        Its wait counts in the percentiles: leaving it out would make them look best exactly
        when borrowers fare worst.
        """
        with self._lock:
            current = self._advance(now)
            current.timeouts += 1
            self._add_wait(current, waited)

    def record_shed(self, now: float) -> None:
        """A borrow was refused at once because ``max_waiting`` borrowers already queued."""
        with self._lock:
            self._advance(now).shed += 1

    def _add_wait(self, slot: _Slot, waited: float) -> None:
        slot.waits += 1
        if waited >= self.slow_wait:
            slot.slow += 1
        if waited > slot.longest:
            slot.longest = waited
        if len(slot.samples) < self._samples:
            slot.samples.append(waited)
        else:  # reservoir sampling: every wait of the slot is kept with the same chance
            index = int(self._rng() * slot.waits)
            if index < self._samples:
                slot.samples[index] = waited

    def _advance(self, now: float) -> _Slot:
        """The slot covering ``now``, starting a new one when the current has ended.

        Must be called with the window's lock held.
        """
        if now < self._until:
            return self._current
        current = self._current
        # Read and reset the lock-free fields with no call in between: no other thread runs
        # there, so what it adds is in the slot ending or in the next, never lost.
        borrows, peak_in_use, peak_waiting = self._borrows, self._peak_in_use, self._peak_waiting
        self._borrows = self._peak_in_use = self._peak_waiting = 0
        if current.start != float("-inf"):
            current.borrows = borrows
            current.peak_in_use = peak_in_use
            current.peak_waiting = peak_waiting
            self._done.append(current)
        start = math.floor(now / self._step) * self._step
        if start + self._step <= now:  # a step that floats cannot hold exactly (0.1 s)
            start += self._step
        self._current = _Slot(start)
        self._until = start + self._step
        return self._current

    # ------------------------------------------------------------------ reading

    def snapshot(self, now: float) -> dict[str, int | float]:
        """The window's figures at ``now`` (see the module constants for the keys).

        Durations are seconds.  Percentiles are nearest-rank over every borrow attempt of the
        window (served or timed out; one that did not queue waited 0 s), weighted by slot when
        a slot kept only a sample of its waits.
        """
        with self._lock:
            current = self._advance(now)
            # The current slot's lock-free fields, which it gets only when it ends.
            borrows = self._borrows
            peak_in_use, peak_waiting = self._peak_in_use, self._peak_waiting
            oldest = now - self.window
            slots = [slot for slot in self._done if slot.start + self._step > oldest]
            slots.append(current)
            # Each kept wait stands for waits / kept of its slot's waits.
            sampled = [slot for slot in slots if slot.samples]
            waited = list(itertools.chain.from_iterable(slot.samples for slot in sampled))
            weights = list(
                itertools.chain.from_iterable(
                    [slot.waits / len(slot.samples)] * len(slot.samples) for slot in sampled
                )
            )
            borrows += sum(slot.borrows for slot in slots)
            waits = sum(slot.waits for slot in slots)
            timeouts = sum(slot.timeouts for slot in slots)
            result: dict[str, int | float] = {
                RECENT_WINDOW: self.window,
                RECENT_BORROWS: borrows,
                RECENT_WAITS: waits,
                RECENT_SLOW_WAITS: sum(slot.slow for slot in slots),
                RECENT_TIMEOUTS: timeouts,
                RECENT_SHED: sum(slot.shed for slot in slots),
                PEAK_IN_USE: max(peak_in_use, *(slot.peak_in_use for slot in slots)),
                PEAK_WAITING: max(peak_waiting, *(slot.peak_waiting for slot in slots)),
                WAIT_MAX: round(max(slot.longest for slot in slots), 6),
            }
        # Sorting happens outside the lock: the copies above are ours.
        # Borrows that never queued: served borrows minus those served after a wait.
        served_waits = waits - timeouts
        zeros = max(borrows - served_waits, 0)
        values = _percentiles(waited, weights, zeros, [p for p, _ in PERCENTILES])
        for (_, key), value in zip(PERCENTILES, values, strict=True):
            result[key] = round(value, 6)
        return result


def _percentiles(
    values: list[float], weights: list[float], zeros: int, wanted: list[float]
) -> list[float]:
    """Nearest-rank percentiles of ``zeros`` zero values plus ``values``, each counting
    as its weight.

    One sort of the values' positions, then the running total of the weights in that order
    and a binary search per percentile, all in C: a full window (some 6,000 values) is read
    with the GIL held by the pool's maintenance thread, every minute and at every scrape.
    """
    total = zeros + sum(weights)
    if total <= 0:
        return [0.0 for _ in wanted]
    order = sorted(range(len(values)), key=values.__getitem__)
    # seen[i]: how much of the population is at or below the i-th smallest value.
    seen = list(itertools.accumulate(map(weights.__getitem__, order), initial=float(zeros)))
    del seen[0]
    results = []
    for percentile in wanted:
        # The smallest value with at least percentile % of the population at or below it.
        rank = max(math.ceil(percentile / 100.0 * total - 1e-9), 1)
        if rank <= zeros:
            results.append(0.0)
            continue
        index = min(bisect.bisect_left(seen, rank - 1e-9), len(order) - 1)
        results.append(values[order[index]])
    return results


# ---------------------------------------------------------------------- reporting

#: Pool measures logged as ``sample#`` (the value now, or the window's peak).
L2MET_SAMPLES: Final = ("in_use", "idle", "waiting", "connecting", "max", PEAK_IN_USE, PEAK_WAITING)
#: Pool counters logged as ``count#``: the increase since the previous line, so a log
#: add-on's sum over processes and lines is right.
L2MET_COUNTS: Final = (
    "borrows",
    "waits",
    "timeouts",
    "shed",
    "connections_created",
    "connections_failed",
    "connections_lost",
)
#: Wait percentiles logged as ``measure#`` in milliseconds.
L2MET_MEASURES: Final = (WAIT_P50, WAIT_P95, WAIT_P99, WAIT_MAX)

_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def _token(text: str) -> str:
    """``text`` as one l2met token: no spaces, ``=`` or ``#`` (replaced by ``_``)."""
    return _UNSAFE.sub("_", text) or "_"


def source_name() -> str:
    """The l2met ``source``: the dyno's name on Heroku (``web.1``), else the host name."""
    return _token(os.environ.get("DYNO") or socket.gethostname())


def l2met_line(
    name: str,
    stats: Mapping[str, int | float],
    previous: Mapping[str, int | float] | None = None,
    *,
    source: str | None = None,
    pid: int | None = None,
) -> str:
    """One line in Heroku's l2met convention for pool ``name``.

    ``source=`` is the dyno; ``pid=`` labels the worker process, because each gunicorn
    worker has its own pool and logs its own line.  Metric names are
    ``herokupool.<name>.<stat>``.  ``count#`` values are the increase since ``previous``
    (the counters of the previous line; None: since the pool started).
    """
    prefix = f"herokupool.{_token(name)}"
    parts = [
        f"source={source if source is not None else source_name()}",
        f"pid={os.getpid() if pid is None else pid}",
        f"pool={_token(name)}",
    ]
    parts += [f"sample#{prefix}.{key}={stats[key]}" for key in L2MET_SAMPLES if key in stats]
    for key in L2MET_COUNTS:
        if key in stats:
            delta = stats[key] - (previous or {}).get(key, 0)
            parts.append(f"count#{prefix}.{key}={max(delta, 0)}")
    parts += [
        f"measure#{prefix}.{key}={stats[key] * 1000.0:.3f}ms"
        for key in L2MET_MEASURES
        if key in stats
    ]
    return " ".join(parts)


def advice(name: str, stats: Mapping[str, int | float]) -> str | None:
    """A warning for pool ``name`` when its window shows borrowers waiting too long or
    giving up, naming the figures and the setting to change; None when all is well."""
    borrows = int(stats.get(RECENT_BORROWS, 0))
    slow = int(stats.get(RECENT_SLOW_WAITS, 0))
    timeouts = int(stats.get(RECENT_TIMEOUTS, 0))
    shed = int(stats.get(RECENT_SHED, 0))
    attempts = borrows + timeouts + shed
    waiting_too_long = attempts >= ADVICE_MIN_BORROWS and slow >= ADVICE_SHARE * attempts
    if not (waiting_too_long or timeouts or shed):
        return None
    window = float(stats.get(RECENT_WINDOW, WINDOW))
    max_conns = int(stats.get("max", 0))
    peak = int(stats.get(PEAK_IN_USE, 0))
    share = 100.0 * slow / attempts if attempts else 0.0
    text = (
        f"pool {name!r}: in the last {window:g} s {slow} of {attempts} borrows ({share:.0f}%) "
        f"waited {SLOW_WAIT * 1000:g} ms or longer for a connection, {timeouts} timed out and "
        f"{shed} were shed (wait p50 {_ms(stats, WAIT_P50)}, p95 {_ms(stats, WAIT_P95)}, "
        f"p99 {_ms(stats, WAIT_P99)}, max {_ms(stats, WAIT_MAX)}; peak {peak} of {max_conns} "
        f"in use, {int(stats.get(PEAK_WAITING, 0))} waiting)"
    )
    if peak >= max_conns:
        text += (
            f". Every connection was busy: raise MAX_CONNS (POOL_MAX_CONNS, now {max_conns}) as "
            "long as web dynos x WEB_CONCURRENCY x POOL_MAX_CONNS stays within the database "
            "plan's connection limit, or run fewer threads per process (GUNICORN_THREADS); "
            "when the plan's limit is what stops you, put PgBouncer (transaction mode) between "
            "the app and the database and size POOL_MAX_CONNS to the threads"
        )
    else:
        text += (
            f". Fewer than {max_conns} connections were in use: borrowers waited for new "
            "connections to open, so look at the database's connect time and at "
            "connections_failed rather than at the pool's size"
        )
    if timeouts and not shed:
        text += (
            "; to fail fast instead of queueing towards the router's 30 s, set MAX_WAITING "
            "(POOL_MAX_WAITING)"
        )
    return text + "."


def _ms(stats: Mapping[str, int | float], key: str) -> str:
    return f"{float(stats.get(key, 0.0)) * 1000.0:.0f} ms"


Publisher = Callable[[str, Mapping[str, int | float]], None]
_publishers: list[Publisher] = []


def add_publisher(publish: Publisher) -> None:
    """Have every pool's maintenance thread call ``publish(pool_name, stats)`` about every
    :data:`PUBLISH_INTERVAL` seconds (within the maintenance thread's own interval, at most
    30 s), for exporters that must push figures rather than be asked for them, such as
    prometheus_client's multiprocess mode.  ``publish`` must not block; an exception it raises
    is logged.  Adding the same callable twice adds it once."""
    if publish not in _publishers:
        _publishers.append(publish)


def remove_publisher(publish: Publisher) -> None:
    """Undo :func:`add_publisher`."""
    if publish in _publishers:
        _publishers.remove(publish)


class MetricsReporter:
    """Called by the pool's maintenance thread: the l2met line every ``log_interval`` seconds
    (None: never) and at most one advice warning every ``advice_interval`` seconds (by default
    ``log_interval``, but never more often than once a :data:`WINDOW`: the advice describes a
    whole window, and a shorter interval would repeat it).

    ``started`` is when the pool was created (its clock): the first line comes one interval
    later.
    """

    def __init__(
        self,
        name: str,
        *,
        log_interval: float | None,
        started: float,
        advice_interval: float | None = None,
    ) -> None:
        self.name = name
        self.log_interval = log_interval
        self.advice_interval = advice_interval or max(log_interval or ADVICE_INTERVAL, WINDOW)
        self._next_line = started + log_interval if log_interval is not None else math.inf
        self._next_advice = started
        self._next_publish = started
        self._previous: dict[str, int | float] | None = None

    def interval(self) -> float:
        """The longest the maintenance thread may sleep between two ticks."""
        publish = PUBLISH_INTERVAL if _publishers else math.inf
        return min(self.log_interval or math.inf, self.advice_interval, publish)

    def tick(self, stats: Callable[[], Mapping[str, int | float]], now: float) -> None:
        """Log and publish what is due at ``now``; ``stats`` is called only when something is."""
        publish = bool(_publishers) and now >= self._next_publish
        if now < self._next_line and now < self._next_advice and not publish:
            return
        snapshot = stats()
        if publish:
            self._next_publish = now + PUBLISH_INTERVAL
            for publisher in list(_publishers):
                try:
                    publisher(self.name, snapshot)
                except Exception:
                    logger.exception("pool %r: a metrics publisher failed", self.name)
        if now >= self._next_line:
            logger.info("%s", l2met_line(self.name, snapshot, self._previous))
            self._previous = {key: snapshot[key] for key in L2MET_COUNTS if key in snapshot}
            assert self.log_interval is not None
            # Keep the cadence; after a stall (a suspended process) start over from now.
            self._next_line += self.log_interval
            if self._next_line <= now:
                self._next_line = now + self.log_interval
        if now >= self._next_advice:
            text = advice(self.name, snapshot)
            if text is not None:
                logger.warning("%s", text)
                self._next_advice = now + self.advice_interval
