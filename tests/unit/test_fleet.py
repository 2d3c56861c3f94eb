"""bench/fleet.py's bookkeeping (the run itself is `make fleet`, kept out of the suite)."""

from __future__ import annotations

import psycopg2
import pytest

from bench import fleet
from herokupool.errors import PoolOverloaded, PoolTimeout


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (psycopg2.OperationalError("FATAL:  sorry, too many clients already"), "too many clients"),
        (
            psycopg2.OperationalError(
                "FATAL:  remaining connection slots are reserved for non-replication superuser "
                "connections"
            ),
            "too many clients",
        ),
        (PoolTimeout("pool 'fleet': timed out after 5.0 s"), "pool timeout"),
        (PoolOverloaded("pool 'fleet': 3 borrowers already waiting"), "pool timeout"),
        (RuntimeError("boom\nmore"), "RuntimeError: boom"),
    ],
)
def test_errors_are_classified(error: BaseException, kind: str) -> None:
    assert fleet.classify(error) == kind


def run(
    mode: str, n: int, rps: float, p99: float, errors: dict[str, int], peak: int
) -> dict[str, object]:
    return {
        "mode": mode, "processes": n, "rps": rps, "p50_ms": 2.0, "p99_ms": p99,
        "errors": errors, "error_share": 0.0 if not errors else 0.3,
        "peak_server_connections": peak, "pool_max_total": 2 * n, "pool_wait_p99_ms_worst": 1.0,
    }  # fmt: skip


def test_summary_takes_the_median_of_each_figure_and_the_highest_peak() -> None:
    runs = [
        run("direct", 32, 500.0, 40.0, {"too many clients": 1000}, 16),
        run("direct", 32, 100.0, 600.0, {"too many clients": 90}, 15),
        run("direct", 32, 600.0, 500.0, {"too many clients": 2000}, 16),
        run("pgbouncer", 32, 2200.0, 30.0, {}, 15),
    ]
    direct, bouncer = fleet.summarize(runs)
    assert (direct["rps"], direct["p99_ms"], direct["rounds"]) == (500.0, 500.0, 3)
    assert direct["errors"] == {"too many clients": 1000}
    assert direct["rps_range"] == [100.0, 600.0]
    assert direct["p99_ms_range"] == [40.0, 600.0]
    assert direct["peak_server_connections"] == 16
    assert (bouncer["mode"], bouncer["errors"], bouncer["rounds"]) == ("pgbouncer", {}, 1)
    text = fleet.table({"summary": [direct, bouncer]})
    assert "| PostgreSQL directly | 32 | 64 | 500 (100-600) | 2.0 | 500.0 (40.0-600.0) |" in text
    assert "1,000 too many clients" in text
    assert "| PgBouncer (transaction) | 32 | 64 | 2,200 (2,200-2,200) |" in text
