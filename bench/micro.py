"""Micro-benchmarks of the raw pools, and the reference units.

``python -m bench.micro`` (run by the coordinator; prints one JSON object):

- reference units: one ``SELECT 1`` round trip (psycopg2, psycopg2 through herokupool's
  session-tracking cursor, and psycopg 3), the recognition of session changes in one
  ORM statement alone, and one ``psycopg2.connect()`` + ``close()``;
- one uncontended borrow + release of herokupool's ``ConnectionPool``, psycopg2's
  ``ThreadedConnectionPool``, psycopg_pool's ``ConnectionPool`` and SQLAlchemy's
  ``QueuePool`` (plain, and with ``pre_ping=True`` as django-db-connection-pool sets it);
- the same pools under contention: 8 threads doing borrow, ``SELECT 1``, release on
  4 connections, as operations per second and the least and most any thread did.

Every measurement is repeated; repeats are interleaved across the pools (A B C ...
A B C ...) and the median and best are reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import psycopg2
import psycopg2.pool
import psycopg_pool
from sqlalchemy.dialects.postgresql.psycopg2 import PGDialect_psycopg2
from sqlalchemy.pool import QueuePool

from herokupool import session, tracked
from herokupool.pool import ConnectionPool

perf_counter = time.perf_counter
SIZE = 4
CONTENDED_THREADS = 8
#: A statement as Django's ORM writes it, for the cost of recognising session changes.
ORM_STATEMENT = (
    'SELECT "app_item"."id", "app_item"."name", "app_item"."value" FROM "app_item" '
    'WHERE "app_item"."id" = %s LIMIT 21'
)


def _pg2(dsn: str) -> Any:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    return conn


class Pools:
    """Each pool as a (borrow, release) pair over a DSN, all open at once."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        hp = ConnectionPool(lambda: _pg2(dsn), name="micro", max_conns=SIZE)
        tcp = psycopg2.pool.ThreadedConnectionPool(SIZE, SIZE, dsn)
        pp = psycopg_pool.ConnectionPool(
            dsn, min_size=SIZE, max_size=SIZE, kwargs={"autocommit": True}, open=True
        )
        pp.wait()
        qp = QueuePool(
            lambda: _pg2(dsn), pool_size=SIZE, max_overflow=0, dialect=PGDialect_psycopg2()
        )
        qpp = QueuePool(
            lambda: _pg2(dsn),
            pool_size=SIZE,
            max_overflow=0,
            pre_ping=True,
            dialect=PGDialect_psycopg2(),
        )
        self._closers: list[Callable[[], None]] = [
            hp.close,
            tcp.closeall,
            pp.close,
            qp.dispose,
            qpp.dispose,
        ]
        # name -> (borrow() -> handle, release(handle), cursor-owning connection of handle)
        self.pools: dict[str, tuple[Callable[[], Any], Callable[[Any], None], Callable[[Any], Any]]]
        self.pools = {
            "herokupool": (hp.borrow, hp.release, lambda c: c),
            "psycopg2 ThreadedConnectionPool": (tcp.getconn, tcp.putconn, lambda c: c),
            "psycopg_pool ConnectionPool": (pp.getconn, pp.putconn, lambda c: c),
            "SQLAlchemy QueuePool": (qp.connect, lambda c: c.close(), lambda c: c),
            "SQLAlchemy QueuePool (pre_ping)": (qpp.connect, lambda c: c.close(), lambda c: c),
        }

    def close(self) -> None:
        for close in self._closers:
            close()


def time_per_op(op: Callable[[], None], seconds: float, batch: int = 50) -> float:
    count = 0
    started = perf_counter()
    deadline = started + seconds
    while True:
        for _ in range(batch):
            op()
        count += batch
        now = perf_counter()
        if now >= deadline:
            return (now - started) / count


def borrow_release(pool: tuple[Any, ...]) -> Callable[[], None]:
    borrow, release, _ = pool

    def op() -> None:
        release(borrow())

    return op


def contended(pool: tuple[Any, ...], seconds: float) -> dict[str, Any]:
    """CONTENDED_THREADS threads: borrow, SELECT 1, release, for ``seconds``."""
    borrow, release, _ = pool
    counts = [0] * CONTENDED_THREADS
    errors: list[str] = []
    stop = threading.Event()
    start = threading.Barrier(CONTENDED_THREADS + 1)

    def run(index: int) -> None:
        start.wait()
        while not stop.is_set():
            try:
                conn = borrow()
            except Exception as error:
                errors.append(type(error).__name__)
                continue
            try:
                cursor = conn.cursor()
                cursor.execute("SELECT 1")
                cursor.fetchone()
                cursor.close()
            finally:
                release(conn)
            counts[index] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(CONTENDED_THREADS)]
    for thread in threads:
        thread.start()
    start.wait()
    began = perf_counter()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = perf_counter() - began
    return {
        "ops_per_s": sum(counts) / elapsed,
        "min_thread": min(counts),
        "max_thread": max(counts),
        "errors": len(errors),
    }


def summarize(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "best": min(values), "worst": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.2, help="per repeat")
    parser.add_argument("--contended-seconds", type=float, default=1.0)
    args = parser.parse_args()

    pg2 = _pg2(args.dsn)
    pg3 = psycopg.connect(args.dsn, autocommit=True)
    tracked_conn = psycopg2.connect(args.dsn, connection_factory=tracked.TrackedConnection)
    tracked_conn.autocommit = True
    cur2 = pg2.cursor()
    cur3 = pg3.cursor()
    tracked_cursor = tracked_conn.cursor()

    def select_tracked() -> None:
        tracked_cursor.execute("SELECT 1")
        tracked_cursor.fetchone()

    def detect() -> None:
        session.changes(ORM_STATEMENT)

    def select2() -> None:
        cur2.execute("SELECT 1")
        cur2.fetchone()

    def select3() -> None:
        cur3.execute("SELECT 1")
        cur3.fetchone()

    def connect2() -> None:
        psycopg2.connect(args.dsn).close()

    references: dict[str, tuple[Callable[[], None], int]] = {
        "SELECT 1 round trip (psycopg2)": (select2, 50),
        "SELECT 1 round trip (psycopg2, herokupool's tracking cursor)": (select_tracked, 50),
        "SELECT 1 round trip (psycopg 3)": (select3, 50),
        "session-state detection of one ORM statement": (detect, 1000),
        "psycopg2.connect() + close()": (connect2, 5),
    }
    pools = Pools(args.dsn)
    samples: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for name, (op, batch) in references.items():
            samples.setdefault(name, []).append(time_per_op(op, args.seconds, batch))
        for name, pool in pools.pools.items():
            samples.setdefault(name, []).append(time_per_op(borrow_release(pool), args.seconds))
    contention: dict[str, list[dict[str, Any]]] = {}
    for _ in range(max(1, args.repeats // 2)):
        for name, pool in pools.pools.items():
            if name == "psycopg2 ThreadedConnectionPool":
                continue  # raises PoolError instead of waiting when exhausted
            contention.setdefault(name, []).append(contended(pool, args.contended_seconds))
    pools.close()
    pg2.close()
    pg3.close()
    tracked_conn.close()
    result = {
        "references": {name: summarize(samples[name]) for name in references},
        "borrow_release": {name: summarize(samples[name]) for name in pools.pools},
        "contended": {
            name: {
                "threads": CONTENDED_THREADS,
                "connections": SIZE,
                "ops_per_s": statistics.median(r["ops_per_s"] for r in runs),
                "min_thread": min(r["min_thread"] for r in runs),
                "max_thread": max(r["max_thread"] for r in runs),
                "errors": sum(r["errors"] for r in runs),
            }
            for name, runs in contention.items()
        },
    }
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
