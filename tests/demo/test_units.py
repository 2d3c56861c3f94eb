"""The demo's helpers on their own: Procfile parsing, chart geometry, the load report."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from demo.dashboard import charts
from demo.dashboard.loadgen import Report, _record
from demo.run import command_env, parse_procfile


def test_parse_procfile_reads_types_and_commands_as_heroku_does() -> None:
    text = "# comment\n\nrelease: python manage.py migrate\nweb:  gunicorn app:x --flag \n"
    assert parse_procfile(text) == {
        "release": "python manage.py migrate",
        "web": "gunicorn app:x --flag",
    }


@pytest.mark.parametrize("text", ["web gunicorn", "web: a\nweb: b", "we b: x"])
def test_parse_procfile_refuses_what_heroku_cannot_read(text: str) -> None:
    with pytest.raises(ValueError, match="Procfile line"):
        parse_procfile(text)


def test_command_env_puts_this_interpreter_first_on_path() -> None:
    import sys
    from pathlib import Path

    env = command_env({"PATH": "/usr/bin"})
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    assert env["PATH"].endswith(":/usr/bin")


@dataclass
class FakeVisit:
    worker_pid: int
    in_use: int
    waiting: int
    max_conns: int = 2
    path: str = "/"
    acquire_ms: float = 1.0


def test_recent_chart_stacks_waiting_on_in_use_and_colours_workers() -> None:
    visits = [FakeVisit(10, 1, 0), FakeVisit(11, 2, 6), FakeVisit(10, 2, 0)]
    chart = charts.recent_chart(visits, width=600, height=104, slots=60)
    assert chart.top_value == 8
    first, busy, _ = chart.bars
    assert first.in_use_height == pytest.approx(100 / 8)
    assert busy.waiting_y + busy.waiting_height == pytest.approx(busy.in_use_y)
    assert busy.waiting_height == pytest.approx(6 * 100 / 8)
    assert [pid for pid, _ in chart.workers] == [10, 11]
    assert first.colour != busy.colour
    assert chart.max_y == pytest.approx(104 - 2 * 100 / 8)


def test_recent_chart_of_nothing_is_empty() -> None:
    chart = charts.recent_chart([])
    assert chart.bars == []
    assert chart.max_value == 0


def test_burst_chart_draws_closed_step_areas() -> None:
    @dataclass
    class FakeBurst:
        max_conns: int
        timeline: list[dict[str, float]]

    timeline = [{"t": 0, "in_use": 2, "waiting": 4}, {"t": 1.5, "in_use": 0, "waiting": 0}]
    burst = FakeBurst(2, timeline)
    chart = charts.burst_chart(burst)
    assert chart.top_value == 6
    assert chart.seconds == 1.5
    assert chart.in_use_path.startswith("M")
    assert chart.in_use_path.endswith("Z")
    assert chart.waiting_path.count("L") == chart.in_use_path.count("L")


def test_stat_groups_label_known_keys_and_keep_new_ones() -> None:
    pools = {
        "default": {"in_use": 1, "wait_time": 0.5, "brand_new": 3, "wait_p99": 0.35,
                    "wait_p95": 0.0042, "wait_max": 1.25, "recent_window": 60.0, "shed": 2},
    }  # fmt: skip
    groups = charts.stat_groups(pools)
    assert [group.title for group in groups] == [
        "Right now", "Last 60 s", "Since this worker started", "Other",
    ]  # fmt: skip
    rows = {row.key: row for group in groups for row in group.rows}
    assert rows["in_use"].values == ["1"]
    assert rows["wait_time"].values == ["0.500"]
    assert rows["brand_new"].values == ["3"]
    assert rows["timeouts"].values == [""]
    assert rows["shed"].values == ["2"]
    # Wait percentiles read in milliseconds; the window's length is the group's title.
    assert rows["wait_p99"].values == ["350 ms"]
    assert rows["wait_p95"].values == ["4.2 ms"]
    assert rows["wait_max"].values == ["1,250 ms"]
    assert "recent_window" not in rows


def test_report_keeps_the_busiest_pool_and_the_workers() -> None:
    report = Report()
    for pid, in_use, waiting in ((1, 2, 5), (2, 1, 0), (1, 2, 1)):
        report.statuses[200] += 1
        report.latencies.append(0.01)
        _record(report, {"worker_pid": pid, "backend_pid": pid * 10, "acquire_ms": 2.0,
                         "pools": {"default": {"in_use": in_use, "waiting": waiting}}})  # fmt: skip
    report.elapsed = 0.5
    assert report.workers == {1: 2, 2: 1}
    assert (report.peak_in_use, report.peak_waiting) == (2, 5)
    text = "\n".join(report.lines())
    assert "3 requests in 0.50 s" in text
    assert "served by 2 worker(s)" in text
