"""The pool's own thread: queued work at once, repairs within a second, maintenance on a tick.

HikariCP's ``HouseKeeper`` and psycopg_pool's maintenance tasks are the model: nothing here
runs in a borrower's thread.  The thread is started by a pool's first borrow (or at creation
with ``min_conns``) and works from a queue that anything may feed without blocking or taking a
lock (``queue.SimpleQueue.put`` is reentrant: safe from a finalizer or a weak reference's
callback running in a thread that holds any lock, the pool's included):

- ``(conn, cleanup)``: a connection handed to ``release_later()``, released here;
- :data:`REPAIR`: something may be stranded (a waiter, an owner or a lent connection was
  freed): the pool puts it right now;
- :data:`FILL`: open connections up to ``min_conns``;
- :data:`STOP`: the pool closed.  The thread stays while connections are still lent or
  being worked on, so one handed back after ``close()`` is closed at once, then ends.

Between tasks it wakes at least every :data:`REPAIR_INTERVAL` seconds to check the pool's
books (a few comparisons under the lock), and runs the pool's maintenance at its interval.
"""

from __future__ import annotations

import logging
import queue
import time
import weakref
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from herokupool.pool import ConnectionPool

__all__ = ["FILL", "REPAIR", "REPAIR_INTERVAL", "STOP", "work"]

logger = logging.getLogger("herokupool.pool")

FILL: Final = object()
STOP: Final = object()
REPAIR: Final = object()

#: Longest a stranded connection, waiter or slot waits for the pool's thread to notice it
#: when no weak reference's callback announced it.
REPAIR_INTERVAL: Final = 1.0


def work(
    ref: weakref.ReferenceType[ConnectionPool], tasks: queue.SimpleQueue[Any], interval: float
) -> None:
    """The pool's background thread: queued work at once, repairs every
    :data:`REPAIR_INTERVAL`, maintenance every ``interval``.

    Holds only a weak reference between runs, so an abandoned pool can be collected.
    Starts with a maintenance run, which opens ``min_conns`` right away.
    """
    now = time.monotonic()
    due = now
    repair_due = now + REPAIR_INTERVAL
    stopping = False
    while True:
        wake = min(repair_due, due) if not stopping else repair_due
        try:
            task = tasks.get(timeout=max(wake - time.monotonic(), 0.0))
        except queue.Empty:
            task = None
        pool = ref()
        if pool is None:
            return
        try:
            if task is STOP:
                stopping = True
            elif task is not None:
                pool._run_task(task)
            now = time.monotonic()
            if now >= repair_due:
                pool._repair()
                repair_due = now + REPAIR_INTERVAL
            if not stopping and now >= due:
                pool.run_maintenance()
                due = time.monotonic() + interval
            if stopping and pool._outstanding() == 0 and tasks.empty():
                return
        except Exception:
            logger.exception("pool %r: background work failed", pool.name)
        del pool
