"""Django-level connect+close counted in CPU instructions, not timed.

``python -m bench.instructions`` (``make bench-instructions``; needs valgrind) runs
``ensure_connection()`` + ``close_if_unusable_or_obsolete()`` under callgrind, twice per
configuration (``--iterations`` and twice as many, after the same warm-up), and reports the
difference per iteration: the instructions one request's connection handling executes, the
same on a busy machine as on a quiet one. The timed figure is in ``make bench`` (its
``connect+close us`` column); this one does not move with the host.

Configurations, all on psycopg 3: Django's native pool, herokupool, and the *floor*
(``bench.floor``: Django's own backend handing back one connection kept aside, nothing
closed): what Django's ``connect()`` and ``close()`` cost when getting a connection costs
nothing. A pool's own cost is its figure minus the floor's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.configs import CONFIGS, Target

ROOT = Path(__file__).resolve().parent.parent
FLOOR = "floor"
DEFAULT_CONFIGS = ("django-pool", "herokupool-pg3", FLOOR)
WARM_UP = 300
_COLLECTED = re.compile(r"Collected : (\d+)")


def spec(name: str, target: Target) -> dict[str, Any]:
    """The BENCH_CONFIG of ``name``; the floor is Django's own backend on psycopg 3."""
    if name == FLOOR:
        config = next(c for c in CONFIGS if c.name == "django-pool")
        described = config.spec(target, size=4, timeout=10.0)
        database = described["database"]
        database["ENGINE"] = "bench.floor"
        database["OPTIONS"] = {"application_name": "bench-floor"}
        return {**described, "name": FLOOR}
    config = next(c for c in CONFIGS if c.name == name)
    return config.spec(target, size=4, timeout=10.0)


def child(iterations: int) -> None:
    """Run in the measured process: the warm-up, then ``iterations``."""
    from bench import bootstrap

    bootstrap.prepare()
    import django

    django.setup()
    from django.db import connection

    end_request = connection.close_if_unusable_or_obsolete
    # The warm-up is counted too, in both runs alike: the difference leaves it out.
    for _ in range(WARM_UP + iterations):
        connection.ensure_connection()
        end_request()


def count(name: str, target: Target, iterations: int, valgrind: str) -> int:
    """Instructions of a whole process doing ``iterations`` (callgrind's total)."""
    env = {**os.environ, "BENCH_CONFIG": json.dumps(spec(name, target)), "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as scratch:
        done = subprocess.run(
            [valgrind, "--tool=callgrind", f"--callgrind-out-file={scratch}/out",
             sys.executable, "-m", "bench.instructions", "--child", str(iterations)],
            cwd=ROOT, env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"{name}: callgrind failed (exit {done.returncode}):\n{done.stderr}")
    return int(found.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL"),
        help="the benchmark database (created if missing); default: make bench's",
    )
    args = parser.parse_args(argv)
    if args.child is not None:
        child(args.child)
        return 0
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        print("bench.instructions needs valgrind (apt install valgrind)", file=sys.stderr)
        return 2
    # Imported here, not in the measured child: they load the drivers.
    from bench.database import prepare_database
    from bench.run import DEFAULT_URL, target_from_url

    target = target_from_url(args.database_url or DEFAULT_URL)
    prepare_database(target)
    per_op: dict[str, float] = {}
    for name in args.configs:
        small = count(name, target, args.iterations, valgrind)
        large = count(name, target, 2 * args.iterations, valgrind)
        per_op[name] = (large - small) / args.iterations
        print(f"[instructions] {name}: {per_op[name] / 1000:.1f} k", file=sys.stderr, flush=True)
    base = per_op.get("django-pool")
    print("| configuration | k instructions per connect+close | x native pool |")
    print("|---|---|---|")
    for name, value in per_op.items():
        ratio = f"{value / base:.2f}x" if base else "-"
        print(f"| {name} | {value / 1000:.1f} | {ratio} |")
    if base and FLOOR in per_op:
        room = 0.8 * base - per_op[FLOOR]
        print(
            f"\nThe floor is {per_op[FLOOR] / base:.2f}x the native pool: a pool at 0.8x has "
            f"{room / 1000:.1f} k instructions for everything beyond Django's own connect+close."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
