"""A thread-safe, fork-safe pool of DB-API connections.

This module knows nothing about Django.  It is given a ``connect()`` callable that
opens one psycopg2 connection (already in autocommit) and a clock, and it lends those
connections out:

- ``borrow()`` hands out an idle connection (the most recently used first, so extra
  connections go idle and can be closed), opens a new one while fewer than
  ``max_conns`` exist, or queues the caller.  Waiters are served strictly in arrival
  order: a released connection is handed straight to the oldest waiter, so the
  releasing thread cannot take it back ahead of them.
- ``release()`` returns a connection, keeping, rolling back or dropping it according to
  its transaction status.
- ``discard()`` drops a connection the caller knows to be bad.
- ``close()`` closes idle connections at once and in-use ones as they come back.

Slow work (connecting, rolling back, closing) never happens while holding the pool's
lock: the lock only guards the bookkeeping.

The connections must provide the small part of psycopg2's connection interface the
pool uses: ``closed``, ``autocommit``, ``get_transaction_status()``, ``rollback()``,
``close()``, ``cursor()``, ``fileno()``, ``isolation_level``/``readonly``/``deferrable``
and ``set_session()``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import select
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from psycopg2 import extensions as ext

from herokupool.errors import PoolClosed, PoolOverloaded, PoolTimeout
from herokupool.metrics import MetricsReporter, WaitWindow

__all__ = ["ConnectionPool"]

logger = logging.getLogger("herokupool.pool")

# Names of the values in ``ConnectionPool.stats()``.
# Measures: the pool's state at the moment of the call.
POOL_MAX: Final = "max"
POOL_MIN: Final = "min"
IN_USE: Final = "in_use"
IDLE: Final = "idle"
WAITING: Final = "waiting"
CONNECTING: Final = "connecting"
# Counters: totals since the pool was created (or since this process forked).
BORROWS: Final = "borrows"
RELEASES: Final = "releases"
WAITS: Final = "waits"
WAIT_TIME: Final = "wait_time"
TIMEOUTS: Final = "timeouts"
SHED: Final = "shed"  # borrows refused at once by max_waiting (PoolOverloaded)
CONNECTIONS_CREATED: Final = "connections_created"
CONNECTIONS_FAILED: Final = "connections_failed"
CONNECTIONS_CLOSED: Final = "connections_closed"
CONNECTIONS_DISCARDED: Final = "connections_discarded"
CONNECTIONS_LOST: Final = "connections_lost"
VALIDATIONS: Final = "validations"
LEAKS: Final = "leaks"

# Fraction of max_lifetime taken off at random per connection, so connections opened
# together (at start-up, after a restart) do not all expire together.
_LIFETIME_JITTER = 0.1

# Sentinels handed to a waiter instead of a connection.
_SLOT: Final = "slot"  # permission to open a new connection in a freed slot
_CLOSED: Final = "closed"  # the pool closed while waiting

# Connections inherited through fork(): kept referenced so that their ids stay unique
# and nothing closes them (closing would send Terminate on the parent's socket).
_inherited: list[Any] = []


class _Entry:
    """The pool's bookkeeping for one physical connection."""

    __slots__ = ("borrowed_at", "conn", "created_at", "expires_at", "last_used", "poller", "stack")

    def __init__(self, conn: Any, now: float, lifetime: float | None) -> None:
        self.conn = conn
        self.created_at = now
        self.last_used = now
        self.borrowed_at = now
        self.expires_at = (
            now + lifetime * (1.0 - random.random() * _LIFETIME_JITTER)
            if lifetime is not None
            else float("inf")
        )
        self.stack: list[str] | None = None
        self.poller = _poller(conn)


class _Waiter:
    """A borrower queued for a connection.

    ``result`` is set under the pool's lock exactly once, by whoever serves the
    waiter; the waiter itself removes its record under the same lock when it gives
    up, so a waiter that timed out can never be handed a connection.
    """

    __slots__ = ("_signal", "result")

    def __init__(self) -> None:
        self.result: _Entry | str | None = None
        self._signal = threading.Lock()
        self._signal.acquire()

    def wait(self, timeout: float) -> None:
        self._signal.acquire(timeout=max(timeout, 0.0))

    def wake(self, result: _Entry | str) -> None:
        self.result = result
        self._signal.release()


class ConnectionPool:
    """A pool of connections for one database (one Django alias in one process).

    Use :meth:`borrow` / :meth:`release` (or the :meth:`connection` context manager).
    ``name`` appears in every error, log line and repr; it is never derived from the
    connection parameters, so no password can reach them.

    Durations are float seconds; ``None`` disables ``max_lifetime``, ``max_idle``,
    ``validate_after`` and ``leak_threshold``.
    """

    def __init__(
        self,
        connect: Callable[[], Any],
        *,
        name: str = "default",
        max_conns: int = 4,
        min_conns: int = 0,
        timeout: float = 10.0,
        max_lifetime: float | None = 3600.0,
        max_idle: float | None = 600.0,
        test_on_borrow: bool = False,
        validate_after: float | None = 0.5,
        reset: str | None = None,
        leak_threshold: float | None = None,
        max_waiting: int | None = None,
        log_metrics: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        background: bool = True,
    ) -> None:
        if max_conns < 1:
            raise ValueError(f"pool {name!r}: max_conns ({max_conns}) must be at least 1")
        if not 0 <= min_conns <= max_conns:
            raise ValueError(
                f"pool {name!r}: min_conns ({min_conns}) must be between 0 and "
                f"max_conns ({max_conns})"
            )
        if timeout <= 0:
            raise ValueError(f"pool {name!r}: timeout ({timeout}) must be greater than 0")
        if max_waiting is not None and max_waiting < 0:
            raise ValueError(f"pool {name!r}: max_waiting ({max_waiting}) must be at least 0")
        if log_metrics is not None and log_metrics <= 0:
            raise ValueError(f"pool {name!r}: log_metrics ({log_metrics}) must be greater than 0")
        self.name = name
        self.max_conns = max_conns
        self.min_conns = min_conns
        self.timeout = timeout
        self.max_lifetime = max_lifetime
        self.max_idle = max_idle
        self.test_on_borrow = test_on_borrow
        self.validate_after = validate_after
        self.reset = reset
        self.leak_threshold = leak_threshold
        self.max_waiting = max_waiting
        self.log_metrics = log_metrics
        self._connect = connect
        self._clock = clock
        self._background = background
        self._init_state()
        _live_pools.add(self)
        if background and min_conns:
            self._start_maintenance()

    def _init_state(self) -> None:
        # One lock guards every field below; nothing slow runs while holding it.
        self._lock = threading.Lock()
        self._idle: list[_Entry] = []  # a stack: the most recently used on top
        self._in_use: dict[int, _Entry] = {}
        self._waiters: deque[_Waiter] = deque()
        self._connecting = 0
        self._closed = False
        self._retire_before = float("-inf")
        self._last_error: BaseException | None = None
        self._counters = dict.fromkeys(
            (
                BORROWS,
                RELEASES,
                WAITS,
                TIMEOUTS,
                SHED,
                CONNECTIONS_CREATED,
                CONNECTIONS_FAILED,
                CONNECTIONS_CLOSED,
                CONNECTIONS_DISCARDED,
                CONNECTIONS_LOST,
                VALIDATIONS,
                LEAKS,
            ),
            0,
        )
        self._wait_time = 0.0
        self._pid = os.getpid()
        self._stop = threading.Event()
        self._maintenance: threading.Thread | None = None
        # Recent waits and the periodic metrics line / advice (herokupool.metrics).
        self._window = WaitWindow()
        self._reporter = MetricsReporter(
            self.name, log_interval=self.log_metrics, started=self._clock()
        )

    def __repr__(self) -> str:
        with self._lock:
            state = "closed" if self._closed else "open"
            return (
                f"<{type(self).__name__} {self.name!r} {state}: {len(self._in_use)} in use, "
                f"{len(self._idle)} idle, {len(self._waiters)} waiting, max {self.max_conns}>"
            )

    @property
    def closed(self) -> bool:
        return self._closed

    # ----------------------------------------------------------------- borrow

    def borrow(self, timeout: float | None = None) -> Any:
        """Return a healthy connection in autocommit, outside any transaction.

        Waits up to ``timeout`` (default: the pool's) for one to be free.  Raises
        :class:`PoolTimeout` when none became free in time, :class:`PoolClosed` when
        the pool is closed, and the driver's own error when opening a new connection
        failed (the database is unreachable, not the pool exhausted).
        """
        if self._background and self._maintenance is None:
            self._start_maintenance()
        timeout = self.timeout if timeout is None else timeout
        started: float | None = None
        while True:
            waiter = None
            overloaded = None
            with self._lock:
                if self._closed:
                    raise PoolClosed(f"pool {self.name!r} is closed")
                if self._idle:
                    entry = self._idle.pop()
                    self._in_use[id(entry.conn)] = entry
                    self._counters[BORROWS] += 1
                    got: _Entry | str = entry
                elif len(self._in_use) + self._connecting < self.max_conns:
                    self._connecting += 1
                    got = _SLOT
                elif (
                    started is None  # a borrower already served in turn is never shed
                    and self.max_waiting is not None
                    and len(self._waiters) >= self.max_waiting
                ):
                    self._counters[SHED] += 1
                    overloaded = (
                        f"pool {self.name!r}: {len(self._waiters)} borrowers already waiting "
                        f"(max_waiting {self.max_waiting}), so this one was refused at once "
                        f"({len(self._in_use)} in use, {len(self._idle)} idle, "
                        f"max {self.max_conns})"
                    )
                else:
                    waiter = _Waiter()
                    self._waiters.append(waiter)
                    queued = len(self._waiters)
                    if started is None:  # count a borrow's wait once, however often it loops
                        self._counters[WAITS] += 1
            if overloaded is not None:
                self._window.record_shed(self._clock())
                raise PoolOverloaded(overloaded)
            if waiter is not None:
                began = self._clock()
                self._window.note_waiting(queued, began)
                if started is None:
                    started = began
                got = self._wait(waiter, started, began, timeout)
            lent = self._ready(got)
            if lent is not None:
                now = lent.borrowed_at = self._clock()
                if started is not None:
                    self._window.record_wait(now - started, now)
                # Outside the lock: note_in_use is lock-free (see herokupool.metrics).
                self._window.note_in_use(len(self._in_use), now)
                if self.leak_threshold is not None:
                    lent.stack = traceback.format_stack()[:-2]
                return lent.conn

    def _wait(self, waiter: _Waiter, started: float, began: float, timeout: float) -> _Entry | str:
        """Wait in line; ``started`` is when the borrow began, ``began`` this wait."""
        waiter.wait(timeout - (began - started))
        with self._lock:
            result = waiter.result
            now = self._clock()
            self._wait_time += now - began
            waited = now - started
            if result is None:
                # Nobody served us before we took the lock: leave the queue for good.
                self._waiters.remove(waiter)
                self._counters[TIMEOUTS] += 1
                self._window.record_timeout(waited, now)
                message = (
                    f"pool {self.name!r}: timed out after {waited:.1f} s waiting for a "
                    f"connection ({len(self._in_use)} in use, {len(self._idle)} idle, "
                    f"{len(self._waiters)} waiting, max {self.max_conns})"
                )
                cause = self._last_error
                connecting = self._connecting
        if result is None:
            if connecting:
                # The slots are held by connection attempts, not by borrowers: without this
                # an unresponsive server reads as "0 in use" exhaustion.
                message += f"; {connecting} still connecting to the server"
            if cause is not None:
                message += f"; the last attempt to connect failed: {_first_line(cause)}"
            raise PoolTimeout(message) from cause
        if result == _CLOSED:
            raise PoolClosed(f"pool {self.name!r} was closed while waiting for a connection")
        return result

    def _ready(self, got: _Entry | str) -> _Entry | None:
        """Turn what borrow obtained into a checked connection (None: try again)."""
        if got == _SLOT:
            return self._open_in_slot()
        assert isinstance(got, _Entry)
        now = self._clock()
        if now >= got.expires_at or got.created_at < self._retire_before:
            # Not handed out after all: take back the borrow counted for it.
            self._drop(got, CONNECTIONS_CLOSED, "recycled", borrows=-1)
            return None
        problem = self._check(got, now)
        if problem is None:
            return got
        logger.warning("pool %r: discarded a dead connection on borrow (%s)", self.name, problem)
        self._retire_idle(now)
        # Keep the slot we hold and open a replacement in it: we were served in turn.
        with self._lock:
            del self._in_use[id(got.conn)]
            self._counters[BORROWS] -= 1
            self._counters[CONNECTIONS_LOST] += 1
            self._connecting += 1
        _close_quietly(got.conn)
        return self._open_in_slot()

    def _check(self, entry: _Entry, now: float) -> str | None:
        """Why ``entry`` may not be handed out, or None when it is healthy."""
        conn = entry.conn
        if conn.closed:
            return "closed"
        # An idle connection has nothing to read: if the socket is readable the server
        # closed it or sent something (a FATAL before terminating, a NOTIFY), which only
        # a query can tell apart.  The zero-timeout poll costs no round trip.
        suspicious = entry.poller is None or bool(entry.poller.poll(0))
        idle_for = now - entry.last_used
        if not (
            suspicious
            or self.test_on_borrow
            or (self.validate_after is not None and idle_for >= self.validate_after)
        ):
            return None
        with self._lock:
            self._counters[VALIDATIONS] += 1
        try:
            if not conn.autocommit:  # never let the check open a transaction
                conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute("SELECT 1")
        except Exception as error:
            return f"validation failed: {_first_line(error)}"
        return None

    def _connect_in_slot(self) -> Any:
        """Open a connection in a slot already counted in ``_connecting``.

        On failure the slot goes to the next waiter, which tries for itself: during an
        outage every borrower fails fast instead of queueing behind the first.
        """
        try:
            return self._connect()
        except BaseException as error:
            with self._lock:
                self._connecting -= 1
                self._counters[CONNECTIONS_FAILED] += 1
                self._last_error = error
                self._wake_for_slot()
            logger.warning(
                "pool %r: could not open a connection: %s", self.name, _first_line(error)
            )
            raise

    def _open_in_slot(self) -> _Entry:
        """Open a connection for the calling borrower (see ``_connect_in_slot``)."""
        conn = self._connect_in_slot()
        now = self._clock()
        entry = _Entry(conn, now, self.max_lifetime)
        with self._lock:
            self._connecting -= 1
            self._counters[CONNECTIONS_CREATED] += 1
            self._last_error = None
            closed = self._closed
            if not closed:
                self._in_use[id(conn)] = entry
                self._counters[BORROWS] += 1
        if closed:
            _close_quietly(conn)
            raise PoolClosed(f"pool {self.name!r} was closed while opening a connection")
        logger.debug("pool %r: opened a connection", self.name)
        return entry

    def _wake_for_slot(self) -> None:
        """A slot just became free: let the oldest waiter open a connection in it.

        Must be called with the lock held.
        """
        if (
            self._waiters
            and not self._closed
            and len(self._in_use) + self._connecting < self.max_conns
        ):
            self._connecting += 1
            self._waiters.popleft().wake(_SLOT)

    # ---------------------------------------------------------------- release

    def release(self, conn: Any) -> None:
        """Give back a borrowed connection.

        An open or failed transaction is rolled back; a broken connection, one past
        ``max_lifetime`` or one returned to a closed pool is closed instead of kept.
        """
        entry = self._in_use.get(id(conn))
        if entry is None or entry.conn is not conn:
            self._release_unknown(conn)
            return
        problem = self._reset(conn)
        if problem is not None:
            if problem == "lost":
                logger.warning(
                    "pool %r: a connection was lost while in use; retiring idle connections",
                    self.name,
                )
                self._retire_idle(self._clock())
                self._drop(entry, CONNECTIONS_LOST, problem, releases=1)
            else:
                logger.warning(
                    "pool %r: discarded a connection on release (%s)", self.name, problem
                )
                self._drop(entry, CONNECTIONS_DISCARDED, problem, releases=1)
            return
        now = self._clock()
        if now >= entry.expires_at or entry.created_at < self._retire_before:
            self._drop(entry, CONNECTIONS_CLOSED, "recycled", releases=1)
            return
        entry.last_used = now
        entry.stack = None
        with self._lock:
            self._counters[RELEASES] += 1
            if self._closed:
                del self._in_use[id(conn)]
                self._counters[CONNECTIONS_CLOSED] += 1
            elif self._waiters:
                # Hand over directly, FIFO: the entry stays in _in_use for the waiter.
                self._counters[BORROWS] += 1
                self._waiters.popleft().wake(entry)
                return
            else:
                del self._in_use[id(conn)]
                self._idle.append(entry)
                return
        _close_quietly(conn)

    def discard(self, conn: Any) -> None:
        """Give back a borrowed connection that must not be reused: close it."""
        entry = self._in_use.get(id(conn))
        if entry is None or entry.conn is not conn:
            self._release_unknown(conn)
            return
        self._drop(entry, CONNECTIONS_DISCARDED, "discarded", releases=1)

    def _release_unknown(self, conn: Any) -> None:
        if any(conn is inherited for inherited in _inherited):
            # Borrowed by our parent before fork(): the parent still owns its socket.
            return
        raise ValueError(f"pool {self.name!r}: this connection was not borrowed from this pool")

    def _reset(self, conn: Any) -> str | None:
        """Make ``conn`` ready for the next borrower; say why not when it cannot be."""
        try:
            if conn.closed:
                return "lost"
            status = conn.get_transaction_status()
            if status in (ext.TRANSACTION_STATUS_INTRANS, ext.TRANSACTION_STATUS_INERROR):
                conn.rollback()
            elif status != ext.TRANSACTION_STATUS_IDLE:
                # ACTIVE (a query still running) or UNKNOWN (a broken socket).
                return (
                    "lost"
                    if conn.closed
                    else f"transaction status {_STATUS_NAMES.get(status, status)}"
                )
            if not conn.autocommit:
                conn.autocommit = True
            if (
                conn.isolation_level is not None
                or conn.readonly is not None
                or conn.deferrable is not None
            ):
                conn.set_session(
                    isolation_level="DEFAULT", readonly="DEFAULT", deferrable="DEFAULT"
                )
            if self.reset is not None:
                with conn.cursor() as cursor:
                    cursor.execute(self.reset)
        except Exception as error:
            return "lost" if conn.closed else f"reset failed: {_first_line(error)}"
        return None

    def _drop(
        self, entry: _Entry, counter: str, reason: str, *, releases: int = 0, borrows: int = 0
    ) -> None:
        """Close a borrowed ``entry`` and free its slot for a waiter."""
        with self._lock:
            del self._in_use[id(entry.conn)]
            self._counters[RELEASES] += releases
            self._counters[BORROWS] += borrows
            self._counters[counter] += 1
            self._wake_for_slot()
        logger.debug("pool %r: closed a connection (%s)", self.name, reason)
        _close_quietly(entry.conn)

    def _retire_idle(self, moment: float) -> None:
        """Retire every connection opened before ``moment``: one was found dead.

        Idle ones close now; in-use ones close when they come back.  After a server
        restart this costs no failed request beyond those already in flight.
        """
        with self._lock:
            self._retire_before = max(self._retire_before, moment)
            retired = [e for e in self._idle if e.created_at < moment]
            if not retired:
                return
            self._idle = [e for e in self._idle if e.created_at >= moment]
            self._counters[CONNECTIONS_DISCARDED] += len(retired)
            for _ in retired:
                self._wake_for_slot()
        logger.warning("pool %r: retired %d idle connection(s)", self.name, len(retired))
        for entry in retired:
            _close_quietly(entry.conn)

    # ------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Close the pool: idle connections now, borrowed ones when released.

        Waiters get :class:`PoolClosed`; later borrows raise it.  Idempotent.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            idle, self._idle = self._idle, []
            self._counters[CONNECTIONS_CLOSED] += len(idle)
            while self._waiters:
                self._waiters.popleft().wake(_CLOSED)
        self._stop.set()
        for entry in idle:
            _close_quietly(entry.conn)
        logger.debug("pool %r: closed", self.name)

    def run_maintenance(self) -> None:
        """Close expired and surplus idle connections, refill to ``min_conns`` and
        report leaks.  The background thread calls this periodically; tests call it
        directly with an injected clock."""
        now = self._clock()
        with self._lock:
            if self._closed:
                return
            keep: list[_Entry] = []
            expired: list[_Entry] = []
            surplus = len(self._idle) + len(self._in_use) + self._connecting - self.min_conns
            # Oldest-used first (bottom of the stack), so the hottest connections stay.
            for entry in self._idle:
                if (
                    now >= entry.expires_at
                    or entry.created_at < self._retire_before
                    or (
                        self.max_idle is not None
                        and surplus > 0
                        and now - entry.last_used >= self.max_idle
                    )
                ):
                    expired.append(entry)
                    surplus -= 1
                else:
                    keep.append(entry)
            self._idle = keep
            self._counters[CONNECTIONS_CLOSED] += len(expired)
            missing = self.min_conns - (len(self._idle) + len(self._in_use) + self._connecting)
            missing = max(missing, 0)
            self._connecting += missing
            leaks = []
            if self.leak_threshold is not None:
                for entry in self._in_use.values():
                    if entry.stack is not None and now - entry.borrowed_at >= self.leak_threshold:
                        leaks.append((now - entry.borrowed_at, entry.stack))
                        entry.stack = None  # report each borrow once
                self._counters[LEAKS] += len(leaks)
        for entry in expired:
            _close_quietly(entry.conn)
        if expired:
            logger.info("pool %r: closed %d expired idle connection(s)", self.name, len(expired))
        for held, stack in leaks:
            logger.warning(
                "pool %r: a connection has been borrowed for %.1f s (leak_threshold %.1f s); "
                "borrowed at:\n%s",
                self.name,
                held,
                self.leak_threshold,
                "".join(stack).rstrip(),
            )
        for _ in range(missing):
            self._fill_one()
        self._reporter.tick(self.stats, self._clock())

    def _fill_one(self) -> None:
        """Open one connection towards ``min_conns`` (see ``_connect_in_slot``)."""
        try:
            conn = self._connect_in_slot()
        except Exception:
            return  # logged; the next maintenance run tries again
        entry = _Entry(conn, self._clock(), self.max_lifetime)
        with self._lock:
            self._connecting -= 1
            self._counters[CONNECTIONS_CREATED] += 1
            self._last_error = None
            if self._closed:
                closed = True
            else:
                closed = False
                if self._waiters:
                    self._in_use[id(conn)] = entry
                    self._counters[BORROWS] += 1
                    self._waiters.popleft().wake(entry)
                else:
                    self._idle.insert(0, entry)
        if closed:
            _close_quietly(conn)

    def _start_maintenance(self) -> None:
        with self._lock:
            if self._maintenance is not None or self._closed:
                return
            thread = threading.Thread(
                target=_maintain,
                args=(weakref.ref(self), self._stop, self._maintenance_interval()),
                name=f"herokupool-{self.name}",
                daemon=True,
            )
            self._maintenance = thread
        thread.start()

    def _maintenance_interval(self) -> float:
        periods = [
            period
            for period in (self.max_idle, self.max_lifetime, self.leak_threshold)
            if period is not None
        ]
        periods.append(self._reporter.interval())
        return min(max(min(periods, default=60.0) / 4, 0.05), 30.0)

    def _after_fork_in_child(self) -> None:
        """Forget everything inherited from the parent, closing nothing."""
        _inherited.extend(entry.conn for entry in self._idle)
        _inherited.extend(entry.conn for entry in self._in_use.values())
        for conn in _inherited:
            _detach_socket(conn)
        closed = self._closed
        self._init_state()  # new lock, counters and queues; no maintenance thread
        self._closed = closed

    # ------------------------------------------------------------------ stats

    def stats(self) -> dict[str, int | float]:
        """A snapshot of the pool's measures and counters (see the module constants)."""
        with self._lock:
            stats: dict[str, int | float] = {
                POOL_MAX: self.max_conns,
                POOL_MIN: self.min_conns,
                IN_USE: len(self._in_use),
                IDLE: len(self._idle),
                WAITING: len(self._waiters),
                CONNECTING: self._connecting,
                **self._counters,
                WAIT_TIME: round(self._wait_time, 6),
            }
        # Outside the pool's lock: the window has its own (see herokupool.metrics).
        stats.update(self._window.snapshot(self._clock()))
        return stats


_STATUS_NAMES = {
    ext.TRANSACTION_STATUS_ACTIVE: "ACTIVE",
    ext.TRANSACTION_STATUS_UNKNOWN: "UNKNOWN",
}

_live_pools: weakref.WeakSet[ConnectionPool] = weakref.WeakSet()


def _maintain(
    ref: weakref.ReferenceType[ConnectionPool], stop: threading.Event, interval: float
) -> None:
    # Holds only a weak reference between runs, so an abandoned pool can be collected.
    while not stop.wait(interval):
        pool = ref()
        if pool is None:
            return
        try:
            pool.run_maintenance()
        except Exception:
            logger.exception("pool %r: maintenance failed", pool.name)
        del pool


def _after_fork_in_child() -> None:
    for pool in list(_live_pools):
        pool._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _poller(conn: Any) -> select.poll | None:
    """A poll object on the connection's socket, made once per connection: each check
    is then one zero-timeout poll() call.  None when there is no socket to watch (the
    check then falls back to a validation query)."""
    try:
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN)
    except Exception:
        return None
    return poller


_devnull: int | None = None


def _detach_socket(conn: Any) -> None:
    """Point an inherited connection's descriptor at /dev/null.

    The child then holds no reference to the parent's socket, and whatever the driver
    might later write on it (a Terminate at exit) goes nowhere.
    """
    global _devnull
    try:
        fd = conn.fileno()
        if _devnull is None:
            _devnull = os.open(os.devnull, os.O_RDWR)
        if fd != _devnull:
            os.dup2(_devnull, fd)
    except Exception:
        pass


def _close_quietly(conn: Any) -> None:
    with contextlib.suppress(Exception):
        conn.close()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
