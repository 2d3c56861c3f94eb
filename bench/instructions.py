"""Django-level connection handling and whole requests, counted in CPU instructions.

``python -m bench.instructions`` (``make bench-instructions``; needs valgrind) runs each
workload under callgrind, twice per configuration (``--iterations`` connect+close, or
``--requests`` requests, and twice as many, after the same warm-up), and reports the
difference per iteration: the instructions one iteration executes, the same on a busy
machine as on a quiet one. The workloads:

- ``connect``: ``ensure_connection()`` + ``close_if_unusable_or_obsolete()``, one request's
  connection handling (the timed figure is ``make bench``'s ``connect+close us`` column);
- ``item`` and ``prepared``: one request through Django's WSGI handler, as the benchmark's
  worker sends them (``bench/app/views.py``: one ORM lookup; three ORM queries), request
  end included (``request_finished``: ``close_old_connections()``);
- ``handover``: the waited borrow alone, without the noise of threads racing. A pool of one
  connection and two threads that take turns: each ``ensure_connection()`` queues behind the
  other thread's connection and is served by its ``close()``. One iteration is one waited
  connect plus the close that hands the connection on (the pools' waiting lines, their
  hand-over and wake-up, Django's connect+close). Not for the floor, which has no pool to wait
  on.

With ``--threads N`` (N > 1) the request workloads run from N threads sharing the requests,
each with its own Django connection, as the benchmark's worker runs its T=8 and T=32 rounds:
with more threads than the pool's 4 connections most borrows wait, the path one thread never
takes. Callgrind runs one thread at a time and switches when one blocks (on the pool, on the
server's answer), so borrows queue as they do on a busy machine; where the switches fall
depends on timing, so such a count moves more between runs than a one-thread count does.

With ``--bytecodes`` (Python 3.12+, no valgrind) the same workloads are counted in Python
bytecodes (``sys.monitoring``'s INSTRUCTION events, every thread, the measured iterations
only), with herokupool's own per function. Time follows bytecodes more closely than
instructions: herokupool's work is Python, the native pool's extra work is largely C
(docs/benchmarks.md).

The cyclic garbage collector is off while counting (after a collection ending the warm-up):
where a collection falls is not the code's cost, and it would move the difference by more
than the code changes being measured. ``PYTHONHASHSEED`` is fixed for the same reason.

Configurations, all on psycopg 3: Django's native pool, herokupool, and the *floor*
(``bench.floor``: Django's own backend handing back one connection kept aside, nothing
closed): what Django costs when getting a connection costs nothing. A pool's own cost is its
figure minus the floor's.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.configs import CONFIGS, Target

ROOT = Path(__file__).resolve().parent.parent
FLOOR = "floor"
DEFAULT_CONFIGS = ("django-pool", "herokupool-pg3", FLOOR)
WARM_UP = 300
_COLLECTED = re.compile(r"Collected : (\d+)")


def spec(name: str, target: Target, size: int = 4) -> dict[str, Any]:
    """The BENCH_CONFIG of ``name`` with ``size`` pooled connections; the floor is Django's
    own backend on psycopg 3."""
    if name == FLOOR:
        config = next(c for c in CONFIGS if c.name == "django-pool")
        described = config.spec(target, size=size, timeout=10.0)
        database = described["database"]
        database["ENGINE"] = "bench.floor"
        database["OPTIONS"] = {"application_name": "bench-floor"}
        return {**described, "name": FLOOR}
    config = next(c for c in CONFIGS if c.name == name)
    return config.spec(target, size=size, timeout=10.0)


HANDOVER = "handover"
#: workload -> the path prefix of its request (None: connection handling alone)
WORKLOADS: dict[str, str | None] = {
    "connect": None,
    "item": "/item/",
    "prepared": "/prepared/",
    HANDOVER: None,
}


def child(workload: str, iterations: int, threads: int = 1, bytecodes: bool = False) -> None:
    """Run in the measured process: the warm-up, then ``iterations``, from ``threads``.
    With ``bytecodes``, print the bytecodes the iterations ran (see :func:`bytecodes_of`)."""
    from bench import bootstrap

    bootstrap.prepare()
    import django

    django.setup()
    from django.db import connection

    if workload == HANDOVER:
        _child_handover(iterations, bytecodes)
        return
    prefix = WORKLOADS[workload]
    if prefix is None:
        end_request = connection.close_if_unusable_or_obsolete

        def once(_: int) -> None:
            connection.ensure_connection()
            end_request()

    else:
        from bench.worker import ROWS, Driver

        request = Driver().request

        def once(index: int) -> None:
            error = request(f"{prefix}{index % ROWS + 1}/")
            if error is not None:
                raise RuntimeError(error)

    # The warm-up is counted too, in both runs alike: the difference leaves it out.
    run(once, 0, WARM_UP, threads)
    gc.collect()
    gc.disable()
    if not bytecodes:
        run(once, WARM_UP, iterations, threads)
        return
    _print_bytecodes(bytecodes_of(lambda: run(once, WARM_UP, iterations, threads)))


def _print_bytecodes(per_code: dict[Any, int]) -> None:
    """The child's answer: every bytecode counted, and herokupool's own per function."""
    ours = str(ROOT / "herokupool")
    total = sum(per_code.values())
    own = {
        f"{code.co_filename[len(str(ROOT)) + 1 :]}:{code.co_qualname}": n
        for code, n in per_code.items()
        if code.co_filename.startswith(ours)
    }
    print(json.dumps({"total": total, "herokupool": own}))


def _child_handover(iterations: int, bytecodes: bool) -> None:
    """The ``handover`` workload in the measured process: the warm-up's turns, then
    ``iterations`` waited connects (see the module's docstring)."""
    from django.db import connection

    # The pool's waiting line, read with len() alone (a deque in both pools: no Python code
    # of theirs runs for it); found while this thread holds the connection.
    connection.ensure_connection()
    pool = getattr(connection, "_herokupool_pool", None) or connection.pool
    waiting = pool._waiting.__len__
    connection.close()
    take_turns(waiting, WARM_UP)
    gc.collect()
    gc.disable()
    if not bytecodes:
        take_turns(waiting, iterations)
        return
    per_code = bytecodes_of(lambda: take_turns(waiting, iterations))
    # The turn-taking's own waiting (a loop until the other thread queues) depends on how
    # the threads are scheduled, not on the pool: not counted.
    per_code.pop(_until_queued.__code__, None)
    _print_bytecodes(per_code)


def take_turns(waiting: Callable[[], int], count: int) -> None:
    """``count`` waited connects (rounded up to even) from two threads sharing a pool of one
    connection: each connects while the other holds the connection, and closes once the
    other is queued, handing it over."""
    from django.db import connection

    turns = (count + 1) // 2
    failed: list[BaseException] = []

    def play(first: bool) -> None:
        try:
            for turn in range(turns):
                connection.ensure_connection()  # queued until the other thread's close()
                if not first and turn == turns - 1:
                    break  # the last turn: nobody left to hand over to
                _until_queued(waiting)
                connection.close()  # served: the queued thread has it
        except BaseException as error:  # reported by the main thread
            failed.append(error)
        finally:
            connection.close()

    connection.ensure_connection()  # held while the other thread queues for it
    other = threading.Thread(target=play, args=(True,))
    other.start()
    _until_queued(waiting)
    connection.close()
    play(False)
    other.join()
    if failed:
        raise failed[0]


def _until_queued(waiting: Callable[[], int]) -> None:
    while not waiting():
        time.sleep(0)  # lets the other thread run


def bytecodes_of(work: Callable[[], None]) -> dict[Any, int]:
    """How many bytecodes ``work()`` ran, per code object, in every thread
    (``sys.monitoring``'s INSTRUCTION events; Python 3.12+)."""
    monitoring = sys.monitoring  # type: ignore[attr-defined,unused-ignore]
    counts: dict[Any, int] = {}

    def seen(code: Any, offset: int) -> None:
        counts[code] = counts.get(code, 0) + 1

    tool = monitoring.PROFILER_ID
    monitoring.use_tool_id(tool, "bench.instructions")
    try:
        monitoring.register_callback(tool, monitoring.events.INSTRUCTION, seen)
        monitoring.set_events(tool, monitoring.events.INSTRUCTION)
        try:
            work()
        finally:
            monitoring.set_events(tool, 0)
    finally:
        monitoring.free_tool_id(tool)
    return counts


def run(once: Callable[[int], None], start: int, count: int, threads: int) -> None:
    """``once(start)`` .. ``once(start + count - 1)``, shared out over ``threads``."""
    if threads == 1:
        for index in range(start, start + count):
            once(index)
        return
    from django.db import connections

    failed: list[BaseException] = []

    def share(offset: int) -> None:
        try:
            for index in range(start + offset, start + count, threads):
                once(index)
        except BaseException as error:  # reported by the main thread
            failed.append(error)
        finally:
            connections.close_all()

    workers = [threading.Thread(target=share, args=(offset,)) for offset in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if failed:
        raise failed[0]


def _child_env(name: str, target: Target, workload: str) -> dict[str, str]:
    """The measured child's environment: configuration ``name`` (one pooled connection for
    ``handover``, else four), the hash seed fixed."""
    size = 1 if workload == HANDOVER else 4
    return {
        **os.environ,
        "BENCH_CONFIG": json.dumps(spec(name, target, size)),
        "PYTHONPATH": str(ROOT),
        "PYTHONHASHSEED": "0",
    }


def count(
    name: str, target: Target, workload: str, iterations: int, valgrind: str, threads: int = 1
) -> int:
    """Instructions of a whole process doing ``iterations`` (callgrind's total)."""
    env = _child_env(name, target, workload)
    with tempfile.TemporaryDirectory() as scratch:
        done = subprocess.run(
            [valgrind, "--tool=callgrind", f"--callgrind-out-file={scratch}/out",
             sys.executable, "-m", "bench.instructions",
             "--child", workload, str(iterations), str(threads)],
            cwd=ROOT, env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"{name}: callgrind failed (exit {done.returncode}):\n{done.stderr}")
    return int(found.group(1))


def bytecodes_per_iteration(
    name: str, target: Target, workload: str, iterations: int, threads: int = 1
) -> tuple[float, dict[str, float]]:
    """Bytecodes per iteration of ``workload``, and herokupool's own per function."""
    env = _child_env(name, target, workload)
    done = subprocess.run(
        [sys.executable, "-m", "bench.instructions",
         "--child", workload, str(iterations), str(threads), "bytecodes"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{name}: counting failed (exit {done.returncode}):\n{done.stderr}")
    counted = json.loads(done.stdout.strip().splitlines()[-1])
    own = {where: n / iterations for where, n in counted["herokupool"].items()}
    return counted["total"] / iterations, own


def per_iteration(
    name: str, target: Target, workload: str, iterations: int, valgrind: str, threads: int = 1
) -> float:
    """Instructions per iteration of ``workload``: the two runs side by side."""
    with ThreadPoolExecutor(2) as runs:
        small, large = runs.map(
            lambda n: count(name, target, workload, n, valgrind, threads),
            (iterations, 2 * iterations),
        )
    return (large - small) / iterations


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument(
        "--bytecodes",
        action="store_true",
        help="count Python bytecodes (sys.monitoring, Python 3.12+; no valgrind) instead of "
        "CPU instructions, and list herokupool's own per function",
    )
    parser.add_argument(
        "--iterations", type=int, default=1000, help="connect+close iterations (default 1000)"
    )
    parser.add_argument(
        "--requests", type=int, default=300, help="requests per request workload (default 300)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads sharing a request workload's requests (default 1; 8 and 32 as in "
        "make bench's rounds, on the pool's 4 connections)",
    )
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL"),
        help="the benchmark database (created if missing); default: make bench's",
    )
    args = parser.parse_args(argv)
    if args.child is not None:
        workload, iterations, threads, *mode = args.child
        child(workload, int(iterations), int(threads), bytecodes=mode == ["bytecodes"])
        return 0
    if args.bytecodes and sys.version_info < (3, 12):
        print("bench.instructions --bytecodes needs Python 3.12+", file=sys.stderr)
        return 2
    valgrind = shutil.which("valgrind")
    if valgrind is None and not args.bytecodes:
        print("bench.instructions needs valgrind (apt install valgrind)", file=sys.stderr)
        return 2
    # Imported here, not in the measured child: they load the drivers.
    from bench.database import prepare_database
    from bench.run import DEFAULT_URL, target_from_url

    target = target_from_url(args.database_url or DEFAULT_URL)
    prepare_database(target)
    unit, scale = ("bytecodes", 1) if args.bytecodes else ("k instr.", 1000)
    counted: dict[str, dict[str, float]] = {}
    owns: dict[str, dict[str, dict[str, float]]] = {}
    for workload in args.workloads:
        connect_only = WORKLOADS[workload] is None
        iterations = args.iterations if connect_only else args.requests
        threads = 1 if connect_only else args.threads
        for name in args.configs:
            if workload == HANDOVER and name == FLOOR:
                continue  # no pool, nothing to wait for
            if args.bytecodes:
                value, own = bytecodes_per_iteration(name, target, workload, iterations, threads)
                if own:
                    owns.setdefault(workload, {})[name] = own
            else:
                assert valgrind is not None
                value = per_iteration(name, target, workload, iterations, valgrind, threads)
            counted.setdefault(name, {})[workload] = value
            print(f"[instructions] {workload} {name}: {value / scale:.1f} {unit}", file=sys.stderr)
    print(report(counted, args.workloads, unit, scale))
    for workload, by_config in owns.items():
        for name, own in by_config.items():
            print(
                f"\nherokupool's own bytecodes per {workload} iteration, {name}: "
                f"{sum(own.values()):.1f}"
            )
            for where, n in sorted(own.items(), key=lambda item: -item[1]):
                if n >= 1:
                    print(f"  {n:7.1f}  {where}")
    return 0


def report(
    counted: dict[str, dict[str, float]],
    workloads: list[str],
    unit: str = "k instr.",
    scale: int = 1000,
) -> str:
    """The markdown table: per iteration, the count divided by ``scale`` in ``unit`` (k
    instructions, or bytecodes), and the ratio to the native pool."""
    base = counted.get("django-pool", {})
    header = " | ".join(f"{w} {unit} | {w} x native" for w in workloads)
    lines = [f"| configuration | {header} |", "|---" * (1 + 2 * len(workloads)) + "|"]
    for name, values in counted.items():
        cells = []
        for workload in workloads:
            value = values.get(workload)
            if value is None:  # not measured for this configuration
                cells.append("- | -")
                continue
            ratio = f"{value / base[workload]:.3f}x" if base.get(workload) else "-"
            cells.append(f"{value / scale:.1f} | {ratio}")
        lines.append(f"| {name} | {' | '.join(cells)} |")
    floor, native = counted.get(FLOOR, {}).get("connect"), base.get("connect")
    if floor and native:
        lines.append(
            f"\nThe floor's connect+close is {floor / native:.2f}x the native pool's: a pool at "
            f"0.8x has {(0.8 * native - floor) / scale:.1f} {unit} for everything beyond "
            "Django's own connect+close."
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
