"""A Prometheus collector for this process's pools (``pip install herokupool[prometheus]``).

Register it once, for example at the end of ``settings.py``::

    import herokupool.prometheus

    herokupool.prometheus.register()

Every scrape of the registry (prometheus_client's ``PrometheusDjangoView``, django-prometheus'
``/metrics`` view, or ``prometheus_client.start_http_server``) then reads
``herokupool.stats()``: nothing is recorded on the borrow path.  Each series carries the labels
``alias``, ``dyno`` (``DYNO`` on Heroku, else empty) and ``pid``: a gunicorn worker reports only
its own pools, so the series of two workers never merge into one.  To see every worker, scrape
each one (django-prometheus' ``PROMETHEUS_METRICS_EXPORT_PORT_RANGE`` gives each worker its own
port) and sum by ``alias`` in PromQL.

In prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set in every process,
as django-prometheus documents for gunicorn), a scrape reads only the files every process
writes, never a collector.  There ``register()`` also adds a :class:`MultiprocessPublisher`:
each pool's maintenance thread writes its figures into those files about every 10 s, gauges
per process (``multiprocess_mode="liveall"``: the scrape adds the ``pid`` label; call
``prometheus_client.multiprocess.mark_process_dead(worker.pid)`` in gunicorn's
``child_exit`` hook so a dead worker's gauges go) and counters summed over the processes.

No value or label holds a connection parameter: the alias is the only text.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from herokupool import metrics
from herokupool import registry as pools

__all__ = ["MultiprocessPublisher", "PoolCollector", "register", "unregister"]

LABELS: Final = ("alias", "dyno", "pid")

#: (stats key, metric name, help) of the measures, exported as gauges.
GAUGES: Final = (
    ("in_use", "herokupool_connections_in_use", "Connections lent out now."),
    ("idle", "herokupool_connections_idle", "Open connections waiting in the pool now."),
    ("connecting", "herokupool_connections_connecting", "Connections being opened now."),
    ("waiting", "herokupool_borrowers_waiting", "Borrowers queued for a connection now."),
    ("max", "herokupool_connections_max", "MAX_CONNS: most connections this process opens."),
    ("min", "herokupool_connections_min", "MIN_CONNS: connections kept open while idle."),
    (
        metrics.PEAK_IN_USE,
        "herokupool_recent_peak_in_use",
        "Most connections lent at once in the recent window.",
    ),
    (
        metrics.PEAK_WAITING,
        "herokupool_recent_peak_waiting",
        "Most borrowers queued at once in the recent window.",
    ),
    (metrics.RECENT_BORROWS, "herokupool_recent_borrows", "Borrows in the recent window."),
    (metrics.RECENT_WAITS, "herokupool_recent_waits", "Borrows that queued in the recent window."),
    (
        metrics.RECENT_SLOW_WAITS,
        "herokupool_recent_slow_waits",
        f"Borrows that queued {metrics.SLOW_WAIT:g} s or longer in the recent window.",
    ),
    (
        metrics.RECENT_TIMEOUTS,
        "herokupool_recent_timeouts",
        "Borrows that timed out in the recent window.",
    ),
    (
        metrics.RECENT_SHED,
        "herokupool_recent_shed",
        "Borrows refused by MAX_WAITING in the recent window.",
    ),
)

#: (stats key, metric name without _total, help) of the counters.
COUNTERS: Final = (
    ("borrows", "herokupool_borrows", "Connections lent out."),
    ("releases", "herokupool_releases", "Connections given back."),
    ("waits", "herokupool_waits", "Borrows that had to queue."),
    ("wait_time", "herokupool_wait_seconds", "Seconds borrowers spent queueing."),
    ("timeouts", "herokupool_timeouts", "Borrows that ended in PoolTimeout."),
    ("shed", "herokupool_shed", "Borrows refused at once by MAX_WAITING (PoolOverloaded)."),
    ("connections_created", "herokupool_connections_created", "Connections opened."),
    ("connections_failed", "herokupool_connections_failed", "Failed attempts to connect."),
    ("connections_closed", "herokupool_connections_closed", "Connections closed by the pool."),
    ("connections_discarded", "herokupool_connections_discarded", "Connections discarded."),
    ("connections_lost", "herokupool_connections_lost", "Connections found dead."),
    ("validations", "herokupool_validations", "Validation queries run."),
    ("leaks", "herokupool_leaks", "Borrows reported by LEAK_THRESHOLD."),
)

#: The wait percentiles of the recent window, as the quantile label of one gauge.
QUANTILES: Final = (
    ("0.5", metrics.WAIT_P50),
    ("0.95", metrics.WAIT_P95),
    ("0.99", metrics.WAIT_P99),
    ("1", metrics.WAIT_MAX),
)
WAIT_QUANTILES: Final = "herokupool_recent_wait_seconds"


class PoolCollector(Collector):
    """Reads ``stats`` (by default ``herokupool.stats()``) at every scrape."""

    def __init__(
        self, stats: Callable[[], Mapping[str, Mapping[str, int | float]]] = pools.stats
    ) -> None:
        self._stats = stats

    def describe(self) -> list[Metric]:
        """The families without samples: registering reads no pool."""
        return list(self._families({}))

    def collect(self) -> Iterator[Metric]:
        return self._families(self._stats())

    def _families(self, all_stats: Mapping[str, Mapping[str, int | float]]) -> Iterator[Metric]:
        dyno = os.environ.get("DYNO", "")
        pid = str(os.getpid())
        # Gauges and counters have the same shape: one family per stats key, one sample per
        # alias.
        kinds: tuple[tuple[Any, tuple[tuple[str, str, str], ...]], ...] = (
            (GaugeMetricFamily, GAUGES),
            (CounterMetricFamily, COUNTERS),
        )
        for kind, specs in kinds:
            for key, name, documentation in specs:
                family = kind(name, documentation, labels=LABELS)
                for alias, stats in all_stats.items():
                    if key in stats:
                        family.add_metric([alias, dyno, pid], stats[key])
                yield family
        waits = GaugeMetricFamily(
            WAIT_QUANTILES,
            f"Borrow wait percentiles over the last {metrics.WINDOW:g} s (1 = the longest).",
            labels=(*LABELS, "quantile"),
        )
        for alias, stats in all_stats.items():
            for quantile, key in QUANTILES:
                if key in stats:
                    waits.add_metric([alias, dyno, pid, quantile], stats[key])
        yield waits


class MultiprocessPublisher:
    """Writes each pool's figures into prometheus_client's multiprocess files.

    Called by every pool's maintenance thread (see :func:`herokupool.metrics.add_publisher`):
    gauges are set, counters increased by what the pool counted since the last call (a new
    pool, after ``close_pool()`` or in a forked child, starts its counters again at zero).
    """

    LABELS: Final = ("alias", "dyno")

    def __init__(self) -> None:
        # registry=None: the files are what a multiprocess scrape reads.
        self._gauges = [
            (key, Gauge(name, doc, self.LABELS, registry=None, multiprocess_mode="liveall"))
            for key, name, doc in GAUGES
        ]
        self._waits = Gauge(
            WAIT_QUANTILES,
            f"Borrow wait percentiles over the last {metrics.WINDOW:g} s (1 = the longest).",
            (*self.LABELS, "quantile"),
            registry=None,
            multiprocess_mode="liveall",
        )
        self._counters = [
            (key, Counter(name, doc, self.LABELS, registry=None)) for key, name, doc in COUNTERS
        ]
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._last: dict[tuple[str, str], float] = {}

    def __call__(self, alias: str, stats: Mapping[str, int | float]) -> None:
        dyno = os.environ.get("DYNO", "")
        with self._lock:  # two pools' maintenance threads may publish at once
            if os.getpid() != self._pid:  # a forked child: its pools count from zero
                self._pid, self._last = os.getpid(), {}
            for key, gauge in self._gauges:
                if key in stats:
                    gauge.labels(alias, dyno).set(stats[key])
            for quantile, key in QUANTILES:
                if key in stats:
                    self._waits.labels(alias, dyno, quantile).set(stats[key])
            for key, counter in self._counters:
                if key not in stats:
                    continue
                value = float(stats[key])
                last = self._last.get((alias, key), 0.0)
                increase = value - last if value >= last else value  # less: a new pool
                if increase > 0:
                    counter.labels(alias, dyno).inc(increase)
                self._last[(alias, key)] = value


def multiprocess_mode() -> bool:
    """Whether prometheus_client runs in multiprocess mode in this process."""
    return "PROMETHEUS_MULTIPROC_DIR" in os.environ or "prometheus_multiproc_dir" in os.environ


_lock = threading.Lock()
_registered: dict[int, PoolCollector] = {}
_publisher: MultiprocessPublisher | None = None


def register(registry: CollectorRegistry = REGISTRY) -> PoolCollector:
    """Register a :class:`PoolCollector` with ``registry`` (prometheus_client's default one,
    which django-prometheus' ``/metrics`` serves) once; later calls return the same one.

    In multiprocess mode also start publishing to the multiprocess files (once per process).
    """
    global _publisher
    with _lock:
        collector = _registered.get(id(registry))
        if collector is None:
            collector = _registered[id(registry)] = PoolCollector()
            registry.register(collector)
        if multiprocess_mode() and _publisher is None:
            _publisher = MultiprocessPublisher()
            metrics.add_publisher(_publisher)
        return collector


def unregister(registry: CollectorRegistry = REGISTRY) -> None:
    """Undo :func:`register` (for tests, or an app that re-configures its registry)."""
    global _publisher
    with _lock:
        collector = _registered.pop(id(registry), None)
        if _publisher is not None and not _registered:
            metrics.remove_publisher(_publisher)
            _publisher = None
    if collector is not None:
        registry.unregister(collector)
