"""What the page draws, computed in Python so the template stays plain (no JavaScript needed).

``stat_groups`` orders and labels ``herokupool.stats()``; ``recent_chart`` turns recent
visits into the rectangles of an inline SVG bar chart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: (key, label, meaning) in display order; keys herokupool adds later follow, unlabelled.
MEASURES = (
    ("in_use", "in use", "lent to a request right now"),
    ("idle", "idle", "open and ready in the pool"),
    ("waiting", "waiting", "requests queued for a connection"),
    ("connecting", "connecting", "being opened right now"),
    ("max", "max", "most this worker opens (POOL_MAX_CONNS)"),
    ("min", "min", "kept open when idle (POOL_MIN_CONNS)"),
)
COUNTERS = (
    ("borrows", "borrows", "connections lent out"),
    ("releases", "releases", "connections given back"),
    ("waits", "waits", "borrows that had to queue"),
    ("wait_time", "wait time", "seconds spent queueing, in total"),
    ("timeouts", "timeouts", "gave up waiting (PoolTimeout)"),
    ("shed", "shed", "refused at once: POOL_MAX_WAITING were waiting"),
    ("connections_created", "created", "connections opened"),
    ("connections_failed", "failed", "connection attempts that failed"),
    ("connections_closed", "closed", "retired for age or idleness"),
    ("connections_discarded", "discarded", "given back broken, so dropped"),
    ("connections_lost", "lost", "found dead: restart, killed backend"),
    ("validations", "validations", "health checks run on borrow"),
    ("leaks", "leaks", "held past POOL_LEAK_THRESHOLD"),
)

#: The recent window's figures (herokupool.metrics): percentiles count every borrow, 0 for
#: one that got a connection at once.
WINDOW_ROWS = (
    ("wait_p50", "wait p50", "half of the borrows waited at most this long"),
    ("wait_p95", "wait p95", "95% of the borrows waited at most this long"),
    ("wait_p99", "wait p99", "99% of the borrows waited at most this long"),
    ("wait_max", "wait max", "the longest wait"),
    ("recent_borrows", "borrows", "connections lent out"),
    ("recent_waits", "waits", "borrows that had to queue"),
    ("recent_slow_waits", "slow waits", "queued 100 ms or longer"),
    ("recent_timeouts", "timeouts", "gave up waiting"),
    ("recent_shed", "shed", "refused by POOL_MAX_WAITING"),
    ("peak_in_use", "peak in use", "most connections lent at once"),
    ("peak_waiting", "peak waiting", "longest queue"),
)
#: Shown elsewhere (the card's title), not as a row.
HIDDEN = frozenset({"recent_window"})

#: Colours of the workers' bars, by order of first appearance in the chart.
WORKER_COLOURS = ("#4f46e5", "#0891b2", "#7c3aed", "#0d9488", "#2563eb", "#9333ea")
WAITING_COLOUR = "#f97316"


@dataclass(frozen=True)
class StatRow:
    key: str
    label: str
    meaning: str
    values: list[str]


@dataclass(frozen=True)
class StatGroup:
    title: str
    rows: list[StatRow]


def _format(value: Any, key: str = "") -> str:
    if key.startswith("wait_p") or key == "wait_max":
        return ms(value)
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def ms(seconds: Any) -> str:
    """Seconds as milliseconds for people: "0 ms", "4.2 ms", "350 ms", "1,200 ms"."""
    if seconds in ("", None):
        return ""
    value = float(seconds) * 1000.0
    if value == 0:
        return "0 ms"
    return f"{value:.1f} ms" if value < 10 else f"{value:,.0f} ms"


def stat_groups(pools: Mapping[str, Mapping[str, Any]]) -> list[StatGroup]:
    """The stats table's sections: measures ("right now"), the recent window, counters."""
    aliases = sorted(pools)
    known = {key for key, _, _ in MEASURES + WINDOW_ROWS + COUNTERS} | HIDDEN
    extra = sorted({key for stats in pools.values() for key in stats} - known)
    window = max((float(stats.get("recent_window", 60)) for stats in pools.values()), default=60)

    def rows(spec: Iterable[tuple[str, str, str]]) -> list[StatRow]:
        return [
            StatRow(
                key, label, meaning, [_format(pools[alias].get(key, ""), key) for alias in aliases]
            )
            for key, label, meaning in spec
        ]

    groups = [
        StatGroup("Right now", rows(MEASURES)),
        StatGroup(f"Last {window:g} s", rows(WINDOW_ROWS)),
        StatGroup("Since this worker started", rows(COUNTERS)),
    ]
    if extra:
        groups.append(StatGroup("Other", rows((key, key, "") for key in extra)))
    return groups


@dataclass(frozen=True)
class Bar:
    x: float
    width: float
    in_use_y: float
    in_use_height: float
    waiting_y: float
    waiting_height: float
    colour: str
    title: str


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    bars: list[Bar]
    #: y of the dashed line at the pool's maximum, and its value.
    max_y: float
    max_value: int
    top_value: int
    #: (pid, colour) for the legend.
    workers: list[tuple[int, str]]


def recent_chart(
    visits: Sequence[Any], *, width: int = 640, height: int = 170, slots: int = 60
) -> Chart:
    """Bars for ``visits`` (oldest first): connections in use when each request had borrowed
    one (coloured by worker), with the requests then waiting stacked on top."""
    top = max([1, *(v.in_use + v.waiting for v in visits), *(v.max_conns for v in visits)])
    scale = (height - 4) / top
    slot = width / slots
    colours: dict[int, str] = {}
    bars = []
    for index, visit in enumerate(visits[-slots:]):
        colour = colours.setdefault(
            visit.worker_pid, WORKER_COLOURS[len(colours) % len(WORKER_COLOURS)]
        )
        in_use_height = visit.in_use * scale
        waiting_height = visit.waiting * scale
        bars.append(
            Bar(
                x=round(index * slot + 1, 2),
                width=round(slot - 2, 2),
                in_use_y=round(height - in_use_height, 2),
                in_use_height=round(in_use_height, 2),
                waiting_y=round(height - in_use_height - waiting_height, 2),
                waiting_height=round(waiting_height, 2),
                colour=colour,
                title=(
                    f"{visit.path} on worker {visit.worker_pid}: {visit.in_use} of "
                    f"{visit.max_conns} in use, {visit.waiting} waiting, connection in "
                    f"{visit.acquire_ms:.1f} ms"
                ),
            )
        )
    max_value = max((v.max_conns for v in visits), default=0)
    return Chart(
        width=width,
        height=height,
        bars=bars,
        max_y=round(height - max_value * scale, 2),
        max_value=max_value,
        top_value=top,
        workers=list(colours.items()),
    )


@dataclass(frozen=True)
class Timeline:
    width: int
    height: int
    in_use_path: str
    waiting_path: str
    max_y: float
    max_value: int
    top_value: int
    seconds: float


def burst_chart(burst: Any, *, width: int = 640, height: int = 120) -> Timeline:
    """Step areas for a Burst's timeline: connections in use, with the waiters stacked on top."""
    points = list(burst.timeline) or [{"t": 0.0, "in_use": 0, "waiting": 0}]
    top = max([1, burst.max_conns, *(p.get("in_use", 0) + p.get("waiting", 0) for p in points)])
    end = max(float(points[-1]["t"]), 0.001)

    def x(t: float) -> str:
        return f"{t / end * width:.1f}"

    def y(value: float) -> str:
        return f"{height - 1 - value / top * (height - 6):.1f}"

    def area(low: Any, high: Any) -> str:
        # Along the top edge left to right (each sample holds until the next), then back
        # along the bottom edge right to left.
        upper, lower = [], []
        for i, point in enumerate(points):
            until = points[i + 1]["t"] if i + 1 < len(points) else point["t"]
            upper += [f"{x(point['t'])},{y(high(point))}", f"{x(until)},{y(high(point))}"]
            lower += [f"{x(point['t'])},{y(low(point))}", f"{x(until)},{y(low(point))}"]
        return "M" + " L".join(upper + lower[::-1]) + " Z"

    def in_use(point: Any) -> int:
        return int(point.get("in_use", 0))

    def stacked(point: Any) -> int:
        return in_use(point) + int(point.get("waiting", 0))

    return Timeline(
        width=width,
        height=height,
        in_use_path=area(lambda point: 0, in_use),
        waiting_path=area(in_use, stacked),
        max_y=float(y(burst.max_conns)),
        max_value=burst.max_conns,
        top_value=top,
        seconds=round(end, 2),
    )
