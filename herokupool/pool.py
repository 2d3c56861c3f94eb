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
  its transaction status; ``release_later()`` does so from the pool's own thread, for
  callers that must not block or take a lock (garbage-collector finalizers).
- ``discard()`` drops a connection the caller knows to be bad.
- ``close()`` closes idle connections at once and in-use ones as they come back.

Promises kept at every step, which the tests check one by one:

- Slow work (connecting, rolling back, closing) never happens while holding the pool's
  lock: the lock only guards the bookkeeping.
- Every query the pool runs itself has a deadline (see ``_deadline.py``): a silent
  server costs a borrower about ``timeout``, not forever.
- An exception of any kind (``KeyboardInterrupt``, a signal handler's, ``gevent.Timeout``)
  at any step loses no slot: the caller gets it, a connection whose state it left
  unknown is discarded, and ``borrows == releases + in_use`` holds afterwards.

The connections must provide the small part of psycopg2's connection interface the
pool uses: ``closed``, ``autocommit``, ``get_transaction_status()``, ``rollback()``,
``close()``, ``cursor()``, ``fileno()``, ``isolation_level``/``readonly``/``deferrable``
and ``set_session()``.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import queue
import random
import select
import threading
import time
import traceback
import weakref
from _thread import get_ident
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Final

from psycopg2 import extensions as ext

from herokupool import _fork
from herokupool._deadline import Deadline
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

# The least time a query the pool runs itself is given, however little of the
# borrower's timeout is left: a healthy server answers SELECT 1 far sooner.
_MIN_QUERY_TIME = 0.1

# Thread names of executors whose threads never end, so never give back a connection
# they did not close: concurrent.futures' default and asyncio's default executor (which
# asgiref's sync_to_async(thread_sensitive=False) uses).
# Seconds between the background thread's checks of idle connections when min_conns > 0.
_MIN_CONNS_CHECK = 1.0
_EXECUTOR_THREAD_PREFIXES = ("ThreadPoolExecutor", "asyncio_")


class _Outcome(enum.Enum):
    """What a queued borrower was given."""

    PENDING = "pending"
    SERVED = "served"  # a connection: ``_Waiter.entry``
    SLOT = "slot"  # permission to open a new connection in a freed slot
    CLOSED = "closed"  # the pool closed while waiting
    GAVE_UP = "gave up"  # timed out or interrupted: serve the next one instead


class _Entry:
    """The pool's bookkeeping for one physical connection."""

    __slots__ = (
        "borrowed_at",
        "conn",
        "created_at",
        "expires_at",
        "holder",
        "last_used",
        "poller",
        "stack",
    )

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
        self.holder: int | None = None  # the borrowing thread's ident
        self.poller = _poller(conn)

    def readable(self) -> bool:
        """True when the server closed the socket or sent something: an idle
        connection has nothing to read.  One zero-timeout poll, no round trip."""
        return self.poller is None or bool(self.poller.poll(0))


class _Waiter:
    """A borrower queued for a connection.

    Both sides act under the pool's lock: whoever serves the waiter pops it from the
    queue and calls :meth:`serve`, which says no when the waiter already gave up; the
    waiter gives up with :meth:`give_up`, which says no when it was served first (the
    waiter must then hand back what it got).  So a connection is never handed to a
    borrower that has left, and never lost between the two.
    """

    __slots__ = ("_signal", "entry", "outcome")

    def __init__(self) -> None:
        self.outcome = _Outcome.PENDING
        self.entry: _Entry | None = None
        self._signal = threading.Lock()
        self._signal.acquire()

    def wait(self, timeout: float) -> None:
        # Clamped: a larger timeout makes acquire() raise OverflowError.
        self._signal.acquire(timeout=min(max(timeout, 0.0), threading.TIMEOUT_MAX))

    def serve(self, outcome: _Outcome, entry: _Entry | None = None) -> bool:
        if self.outcome is not _Outcome.PENDING:
            return False
        self.outcome = outcome
        self.entry = entry
        self._signal.release()
        return True

    def give_up(self) -> bool:
        if self.outcome is not _Outcome.PENDING:
            return False
        self.outcome = _Outcome.GAVE_UP
        return True


# Work for the pool's background thread, besides connections to release.
_FILL: Final = object()
_STOP: Final = object()


class ConnectionPool:
    """A pool of connections for one database (one Django alias in one process).

    Use :meth:`borrow` / :meth:`release`, or the :meth:`connection` context manager.
    ``name`` appears in every error, log line and repr; it is never derived from the
    connection parameters, so no password can reach them.

    Durations are float seconds; ``None`` disables ``max_lifetime``, ``max_idle``,
    ``validate_after`` and ``leak_threshold``.

    ``prepare_release(conn)``, when given, is called on each release before anything is
    sent: it restores what the borrower changed on the client side and returns SQL that
    undoes what it changed in the session (run after the rollback, with ``cleanup``, in
    one round trip), or None; an exception from it closes the connection.  It replaces
    the reset of psycopg2's session characteristics (isolation level, read only,
    deferrable) done without it.  Must not block or do I/O.
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
        prepare_release: Callable[[Any], str | None] | None = None,
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
        self.prepare_release = prepare_release
        self._connect = connect
        self._clock = clock
        self._background = background
        self._init_state()
        _live_pools.add(self)
        if background and min_conns:
            self._start_worker()  # opens min_conns at once, in the background

    def _init_state(self) -> None:
        # One lock guards every field below; nothing slow runs while holding it.
        self._lock = threading.Lock()
        self._idle: list[_Entry] = []  # a stack: the most recently used on top
        self._in_use: dict[int, _Entry] = {}
        self._waiters: deque[_Waiter] = deque()
        self._connecting = 0
        self._closed = False
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
        # The background thread's work: connections to release (release_later), _FILL,
        # _STOP.  A SimpleQueue because its put() is reentrant: safe from a finalizer
        # that runs in a thread holding any lock, ours included.
        self._tasks: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
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

    @contextlib.contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[Any]:
        """``with pool.connection() as conn:`` borrow, and release when the block ends
        (however it ends: an open transaction is rolled back, a connection left busy
        by an interruption is discarded)."""
        conn = self.borrow(timeout)
        try:
            yield conn
        finally:
            self.release(conn)

    def borrow(self, timeout: float | None = None) -> Any:
        """Return a healthy connection in autocommit, outside any transaction.

        Waits up to ``timeout`` (default: the pool's) for one to be free, and bounds
        the validation query by what is left of it.  Raises :class:`PoolTimeout` when
        none became free in time, :class:`PoolClosed` when the pool is closed, and the
        driver's own error when opening a new connection failed (the database is
        unreachable, not the pool exhausted).
        """
        if self._background:
            if self._worker is None:
                self._start_worker()
        elif not self._tasks.empty():
            self._run_tasks()
        timeout = self.timeout if timeout is None else timeout
        started = None  # read only when the borrow must wait: the fast path reads the clock once
        waiter = None
        overloaded = None
        with self._lock:
            if self._closed:
                raise PoolClosed(f"pool {self.name!r} is closed")
            if self._idle:
                entry = self._idle.pop()
                self._in_use[id(entry.conn)] = entry
                self._counters[BORROWS] += 1
                got: _Entry | None = entry
            elif len(self._in_use) + self._connecting < self.max_conns:
                self._connecting += 1
                got = None  # a slot: open a connection in it
            elif self.max_waiting is not None and len(self._waiters) >= self.max_waiting:
                self._counters[SHED] += 1
                overloaded = (
                    f"pool {self.name!r}: {len(self._waiters)} borrowers already waiting "
                    f"(max_waiting {self.max_waiting}), so this one was refused at once "
                    f"({len(self._in_use)} in use, {len(self._idle)} idle, max {self.max_conns})"
                )
            else:
                waiter = _Waiter()
                self._waiters.append(waiter)
                queued = len(self._waiters)
                self._counters[WAITS] += 1
        if overloaded is not None:
            self._window.record_shed(self._clock())
            raise PoolOverloaded(overloaded)
        if waiter is not None:
            started = self._clock()
            self._window.note_waiting(queued, started)
            got = self._wait(waiter, started, timeout)
        entry = self._ready(got, started, timeout)
        now = entry.borrowed_at  # set by _ready: no second clock read
        if started is not None:
            self._window.record_wait(now - started, now)
        # Outside the lock: note_in_use is lock-free (see herokupool.metrics).
        self._window.note_in_use(len(self._in_use), now)
        entry.holder = get_ident()
        if self.leak_threshold is not None:
            entry.stack = traceback.format_stack()[:-2]
        return entry.conn

    def _wait(self, waiter: _Waiter, started: float, timeout: float) -> _Entry | None:
        """Wait in line; return a connection or None for a slot to open one in."""
        try:
            waiter.wait(timeout)
        except BaseException:
            # Interrupted (a signal handler's exception, gevent.Timeout): leave the
            # line, or hand on what we were given in the meantime.
            self._leave_line(waiter)
            raise
        message, cause = "", None
        with self._lock:
            now = self._clock()
            self._wait_time += now - started
            if waiter.give_up():
                self._waiters.remove(waiter)
                self._counters[TIMEOUTS] += 1
                self._window.record_timeout(now - started, now)
                message = self._timeout_message(now - started, now)
                cause = self._last_error
                outcome = _Outcome.GAVE_UP
            else:
                outcome = waiter.outcome
        if outcome is _Outcome.GAVE_UP:
            raise PoolTimeout(message) from cause
        if outcome is _Outcome.CLOSED:
            raise PoolClosed(f"pool {self.name!r} was closed while waiting for a connection")
        return waiter.entry  # SERVED: a connection; SLOT: None

    def _leave_line(self, waiter: _Waiter) -> None:
        with self._lock:
            if waiter.give_up():
                self._waiters.remove(waiter)
                return
        if waiter.outcome is _Outcome.SERVED:
            assert waiter.entry is not None
            self._hand_back(waiter.entry)
        elif waiter.outcome is _Outcome.SLOT:
            with self._lock:
                self._connecting -= 1
                self._wake_for_slot()

    def _timeout_message(self, waited: float, now: float) -> str:
        """Why a borrower timed out, with the numbers.  Called with the lock held."""
        message = (
            f"pool {self.name!r}: timed out after {waited:.1f} s waiting for a "
            f"connection ({len(self._in_use)} in use, {len(self._idle)} idle, "
            f"{len(self._waiters)} waiting, max {self.max_conns})"
        )
        if self._connecting:
            # The slots are held by connection attempts, not by borrowers: without this
            # an unresponsive server reads as "0 in use" exhaustion.
            message += f"; {self._connecting} still connecting to the server"
        held = [e for e in self._in_use.values() if e.holder is not None]
        if held:
            oldest = min(held, key=lambda e: e.borrowed_at)
            names = {thread.ident: thread.name for thread in threading.enumerate()}
            name = names.get(oldest.holder)
            message += f"; held longest: {now - oldest.borrowed_at:.1f} s by " + (
                f"thread {name!r}" if name is not None else "a thread that has ended"
            )
            if name is not None and name.startswith(_EXECUTOR_THREAD_PREFIXES):
                message += (
                    " (an executor's threads never end, so a connection they do not close "
                    "stays borrowed: call close_old_connections() in them, e.g. around "
                    "sync_to_async(thread_sensitive=False) work)"
                )
        if self._last_error is not None:
            message += f"; the last attempt to connect failed: {_first_line(self._last_error)}"
        return message

    def _ready(self, got: _Entry | None, started: float | None, timeout: float) -> _Entry:
        """Turn what borrow obtained (a connection, or None for a slot) into a checked
        connection.  A bad one is replaced without losing the borrower's turn: by
        another idle connection, else by a new one in the same slot."""
        while True:
            if got is None:
                return self._open_in_slot()
            entry = got
            try:
                problem = self._check(entry, started, timeout)
            except BaseException:
                # Interrupted during validation: the session's state is unknown.
                self._drop(entry, CONNECTIONS_DISCARDED, "interrupted on borrow", borrows=-1)
                raise
            if problem is None:
                return entry
            counter = CONNECTIONS_CLOSED if problem == "recycled" else CONNECTIONS_LOST
            if counter == CONNECTIONS_LOST:
                logger.warning(
                    "pool %r: discarded a dead connection on borrow (%s)", self.name, problem
                )
            with self._lock:
                del self._in_use[id(entry.conn)]
                self._counters[counter] += 1
                dead = self._sweep_idle() if counter == CONNECTIONS_LOST else []
                closed = self._closed
                if self._idle and not closed:
                    got = self._idle.pop()
                    self._in_use[id(got.conn)] = got
                else:
                    self._counters[BORROWS] -= 1
                    self._connecting += 0 if closed else 1
                    got = None
            for other in (entry, *dead):
                _close_quietly(other.conn)
            if closed:
                raise PoolClosed(f"pool {self.name!r} was closed while lending a connection")

    def _check(self, entry: _Entry, started: float | None, timeout: float) -> str | None:
        """Why ``entry`` may not be handed out, or None when it is healthy (then it is
        marked borrowed now).  A validation query gets what is left of the borrow's
        ``timeout`` from ``started`` (None: now)."""
        conn = entry.conn
        if conn.closed:
            return "closed"
        now = self._clock()
        if now >= entry.expires_at:
            return "recycled"
        entry.borrowed_at = now
        # The zero-timeout poll costs no round trip; only a query can tell a FATAL
        # before termination from, say, a NOTIFY, so a readable socket gets one.
        poller = entry.poller
        if not (
            poller is None
            or poller.poll(0)
            or self.test_on_borrow
            or (self.validate_after is not None and now - entry.last_used >= self.validate_after)
        ):
            return None
        deadline = (now if started is None else started) + timeout
        with self._lock:
            self._counters[VALIDATIONS] += 1
        try:
            limit = Deadline(conn.fileno(), max(deadline - now, _MIN_QUERY_TIME))
        except Exception:
            return "closed"
        try:
            with limit:
                if not conn.autocommit:  # never let the check open a transaction
                    conn.autocommit = True
                with conn.cursor() as cursor:
                    cursor.execute("SELECT 1")
        except Exception as error:
            if limit.disarm():
                return "validation got no answer in time; the connection was cut"
            return f"validation failed: {_first_line(error)}"
        finally:
            limit.disarm()  # also when interrupted inside __enter__
        if limit.expired:  # answered, but the socket was cut just after
            return "validation got no answer in time; the connection was cut"
        return None

    def _sweep_idle(self) -> list[_Entry]:
        """One connection was found dead: take out the idle ones whose socket says they
        died too (a server restart ends them all), by a zero-timeout poll each, with no
        round trip.  Healthy ones stay, so one killed backend costs one reconnect.

        Must be called with the lock held; the caller closes what it returns.
        """
        dead = [e for e in self._idle if e.conn.closed or e.readable()]
        if dead:
            self._idle = [e for e in self._idle if not (e.conn.closed or e.readable())]
            self._counters[CONNECTIONS_LOST] += len(dead)
            for _ in dead:
                self._wake_for_slot()
        return dead

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
                if isinstance(error, Exception):
                    self._last_error = error
                self._wake_for_slot(refill=False)
            logger.warning(
                "pool %r: could not open a connection: %s", self.name, _first_line(error)
            )
            raise

    def _entry_for(self, conn: Any) -> _Entry:
        """The bookkeeping for ``conn``, just opened in a slot counted in
        ``_connecting``; if even that is interrupted, the slot is freed and ``conn``
        closed."""
        try:
            return _Entry(conn, self._clock(), self.max_lifetime)
        except BaseException:
            with self._lock:
                self._connecting -= 1
                self._wake_for_slot()
            _close_quietly(conn)
            raise

    def _opened(self) -> bool:
        """Count a connection opened in a slot; True when the pool closed meanwhile (the
        caller then closes it).  Must be called with the lock held."""
        self._connecting -= 1
        self._counters[CONNECTIONS_CREATED] += 1
        self._last_error = None
        return self._closed

    def _open_in_slot(self) -> _Entry:
        """Open a connection for the calling borrower (see ``_connect_in_slot``)."""
        conn = self._connect_in_slot()
        entry = self._entry_for(conn)
        with self._lock:
            closed = self._opened()
            if not closed:
                self._in_use[id(conn)] = entry
                self._counters[BORROWS] += 1
        if closed:
            _close_quietly(conn)
            raise PoolClosed(f"pool {self.name!r} was closed while opening a connection")
        logger.debug("pool %r: opened a connection", self.name)
        return entry

    def _wake_for_slot(self, *, refill: bool = True) -> None:
        """A slot just became free: let the oldest waiter open a connection in it, or
        ask the background thread to refill towards ``min_conns`` (not after a failed
        connect: during an outage that would retry in a tight loop; maintenance retries).

        Must be called with the lock held.
        """
        if self._closed or len(self._in_use) + self._connecting >= self.max_conns:
            return
        while self._waiters:
            self._connecting += 1
            if self._waiters.popleft().serve(_Outcome.SLOT):
                return
            self._connecting -= 1
        if refill and len(self._in_use) + len(self._idle) + self._connecting < self.min_conns:
            self._tasks.put(_FILL)

    def _hand_over(self, entry: _Entry) -> bool:
        """Give a clean, borrowed ``entry`` to the oldest waiter, if any, counting a
        borrow for it.  Must be called with the lock held."""
        while self._waiters:
            if self._waiters.popleft().serve(_Outcome.SERVED, entry):
                self._counters[BORROWS] += 1
                return True
        return False

    def _hand_back(self, entry: _Entry) -> None:
        """Take back a connection that was handed to a borrower who left before using
        it: it is clean, so it goes to the next waiter or the idle stack as it is."""
        with self._lock:
            self._counters[BORROWS] -= 1
            if self._closed:
                del self._in_use[id(entry.conn)]
                self._counters[CONNECTIONS_CLOSED] += 1
            elif self._hand_over(entry):
                return
            else:
                del self._in_use[id(entry.conn)]
                self._idle.append(entry)
                return
        _close_quietly(entry.conn)

    # ---------------------------------------------------------------- release

    def release(self, conn: Any, *, cleanup: str | None = None) -> None:
        """Give back a borrowed connection.

        An open or failed transaction is rolled back (a raw ``BEGIN`` too); ``cleanup``
        is SQL run first to undo what only the caller knows it left (e.g. ``CLOSE ALL``
        after server-side cursors).  A connection that cannot be cleaned within the
        pool's timeout, a broken one, one past ``max_lifetime`` or one returned to a
        closed pool is closed instead of kept.
        """
        entry = self._in_use.get(id(conn))
        if entry is None or entry.conn is not conn:
            self._release_unknown(conn)
            return
        try:
            problem = self._reset(conn, cleanup)
        except BaseException:
            # Interrupted while cleaning: the session's state is unknown.
            self._drop(entry, CONNECTIONS_DISCARDED, "interrupted on release", releases=1)
            raise
        if problem is not None:
            if problem == "lost":
                logger.warning("pool %r: a connection was lost while in use", self.name)
                self._drop(entry, CONNECTIONS_LOST, problem, releases=1, sweep=True)
            else:
                logger.warning(
                    "pool %r: discarded a connection on release (%s)", self.name, problem
                )
                self._drop(entry, CONNECTIONS_DISCARDED, problem, releases=1)
            return
        now = self._clock()
        if now >= entry.expires_at:
            self._drop(entry, CONNECTIONS_CLOSED, "recycled", releases=1)
            return
        entry.last_used = now
        entry.stack = None
        entry.holder = None
        with self._lock:
            self._counters[RELEASES] += 1
            if self._closed:
                del self._in_use[id(conn)]
                self._counters[CONNECTIONS_CLOSED] += 1
            elif self._hand_over(entry):  # FIFO: the entry stays in _in_use for the waiter
                return
            else:
                del self._in_use[id(conn)]
                self._idle.append(entry)
                return
        _close_quietly(conn)

    def release_later(self, conn: Any, *, cleanup: str | None = None) -> None:
        """Have the pool's own thread release ``conn`` soon (with ``cleanup``, as
        :meth:`release`).

        For code that must not block or take a lock: a garbage-collector finalizer or a
        weakref callback runs in whichever thread triggered it, possibly one inside
        this pool's lock.  Never raises; a connection this pool does not know is
        ignored when its turn comes.
        """
        self._tasks.put((conn, cleanup))

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

    def _reset(self, conn: Any, cleanup: str | None) -> str | None:
        """Make ``conn`` ready for the next borrower; say why not when it cannot be."""
        if conn.closed:
            return "lost"
        status = conn.get_transaction_status()
        if status not in (
            ext.TRANSACTION_STATUS_IDLE,
            ext.TRANSACTION_STATUS_INTRANS,
            ext.TRANSACTION_STATUS_INERROR,
        ):
            # ACTIVE (a query still running) or UNKNOWN (a broken socket).
            return (
                "lost" if conn.closed else f"transaction status {_STATUS_NAMES.get(status, status)}"
            )
        in_transaction = status != ext.TRANSACTION_STATUS_IDLE
        if self.prepare_release is None:
            session = (
                conn.isolation_level is not None
                or conn.readonly is not None
                or conn.deferrable is not None
            )
        else:
            # The hook knows what the loan changed: its undo runs after the rollback.
            session = False
            try:
                undo = self.prepare_release(conn)
            except Exception as error:
                return f"it cannot be made new again: {_first_line(error)}"
            if undo:
                cleanup = undo if cleanup is None else f"{cleanup}; {undo}"
        if not (in_transaction or cleanup or self.reset or session or not conn.autocommit):
            return None  # the common case: nothing to undo, no round trip
        try:
            limit = Deadline(conn.fileno(), self.timeout)
        except Exception:
            return "lost"
        try:
            with limit:
                if in_transaction and not conn.autocommit:
                    conn.rollback()  # psycopg2's own transaction
                if not conn.autocommit:
                    conn.autocommit = True
                if conn.get_transaction_status() != ext.TRANSACTION_STATUS_IDLE:
                    # Opened with a raw BEGIN in autocommit: psycopg2's rollback() does
                    # nothing then, because it did not open it.
                    with conn.cursor() as cursor:
                        cursor.execute("ROLLBACK")
                if session:
                    conn.set_session(
                        isolation_level="DEFAULT", readonly="DEFAULT", deferrable="DEFAULT"
                    )
                for sql in (cleanup, self.reset):
                    if sql:
                        with conn.cursor() as cursor:
                            cursor.execute(sql)
        except Exception as error:
            if limit.disarm():
                return "cleaning it got no answer in time; the connection was cut"
            if conn.closed:
                return "lost"
            return f"reset failed: {_first_line(error)}"
        finally:
            limit.disarm()  # also when interrupted inside __enter__
        if limit.expired:
            return "cleaning it got no answer in time; the connection was cut"
        if conn.get_transaction_status() != ext.TRANSACTION_STATUS_IDLE:
            return "a transaction could not be ended"
        return None

    def _drop(
        self,
        entry: _Entry,
        counter: str,
        reason: str,
        *,
        releases: int = 0,
        borrows: int = 0,
        sweep: bool = False,
    ) -> None:
        """Close a borrowed ``entry`` and free its slot for a waiter."""
        with self._lock:
            del self._in_use[id(entry.conn)]
            self._counters[RELEASES] += releases
            self._counters[BORROWS] += borrows
            self._counters[counter] += 1
            dead = self._sweep_idle() if sweep else []
            self._wake_for_slot()
        logger.debug("pool %r: closed a connection (%s)", self.name, reason)
        for other in (entry, *dead):
            _close_quietly(other.conn)

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
                self._waiters.popleft().serve(_Outcome.CLOSED)
        self._tasks.put(_STOP)
        for entry in idle:
            _close_quietly(entry.conn)
        if self._worker is None:
            self._run_tasks()  # connections given to release_later
        logger.debug("pool %r: closed", self.name)

    def run_maintenance(self) -> None:
        """Close expired and surplus idle connections, refill to ``min_conns``, report
        leaks and release what ``release_later`` was given.  The background thread
        calls this periodically; tests call it directly with an injected clock."""
        self._run_tasks()
        now = self._clock()
        with self._lock:
            if self._closed:
                return
            keep: list[_Entry] = []
            expired: list[_Entry] = []
            surplus = len(self._idle) + len(self._in_use) + self._connecting - self.min_conns
            # Oldest-used first (bottom of the stack), so the hottest connections stay.
            for entry in self._idle:
                if now >= entry.expires_at or (
                    self.max_idle is not None
                    and surplus > 0
                    and now - entry.last_used >= self.max_idle
                ):
                    expired.append(entry)
                    surplus -= 1
                else:
                    keep.append(entry)
            self._idle = keep
            self._counters[CONNECTIONS_CLOSED] += len(expired)
            # Idle connections the server ended meanwhile (pg_terminate_backend,
            # idle_session_timeout): a zero-timeout poll each, so _fill() below replaces
            # them now rather than at the next borrow.
            dead = self._sweep_idle()
            leaks = []
            if self.leak_threshold is not None:
                for entry in self._in_use.values():
                    if entry.stack is not None and now - entry.borrowed_at >= self.leak_threshold:
                        leaks.append((now - entry.borrowed_at, entry.stack))
                        entry.stack = None  # report each borrow once
                self._counters[LEAKS] += len(leaks)
        for entry in (*expired, *dead):
            _close_quietly(entry.conn)
        if expired:
            logger.info("pool %r: closed %d expired idle connection(s)", self.name, len(expired))
        if dead:
            logger.warning("pool %r: %d idle connection(s) found dead", self.name, len(dead))
        for held, stack in leaks:
            logger.warning(
                "pool %r: a connection has been borrowed for %.1f s (leak_threshold %.1f s); "
                "borrowed at:\n%s",
                self.name,
                held,
                self.leak_threshold,
                "".join(stack).rstrip(),
            )
        self._fill()
        self._reporter.tick(self.stats, self._clock())

    def _run_tasks(self) -> None:
        """Do what was queued for the background thread (without one: now)."""
        while True:
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                return
            self._run_task(task)

    def _run_task(self, task: Any) -> None:
        if task is _FILL:
            self._fill()
        elif task is not _STOP:
            self._release_orphan(*task)

    def _release_orphan(self, conn: Any, cleanup: str | None) -> None:
        if self._in_use.get(id(conn)) is None:
            return  # released meanwhile, or never ours
        logger.warning(
            "pool %r: took back a connection whose borrower ended without releasing it",
            self.name,
        )
        try:
            self.release(conn, cleanup=cleanup)
        except Exception:
            logger.exception("pool %r: could not take back a connection", self.name)

    def _fill(self) -> None:
        """Open connections until ``min_conns`` exist (see ``_connect_in_slot``)."""
        while True:
            with self._lock:
                total = len(self._idle) + len(self._in_use) + self._connecting
                if self._closed or total >= self.min_conns:
                    return
                self._connecting += 1
            try:
                conn = self._connect_in_slot()
            except Exception:
                return  # logged; the next maintenance run tries again
            entry = self._entry_for(conn)
            with self._lock:
                closed = self._opened()
                if not closed:
                    self._in_use[id(conn)] = entry  # _hand_over expects it there
                    if not self._hand_over(entry):
                        del self._in_use[id(conn)]
                        self._idle.insert(0, entry)
            if closed:
                _close_quietly(conn)
                return

    def _start_worker(self) -> None:
        with self._lock:
            if self._worker is not None or self._closed:
                return
            thread = threading.Thread(
                target=_work,
                args=(weakref.ref(self), self._tasks, self._maintenance_interval()),
                name=f"herokupool-{self.name}",
                daemon=True,
            )
            self._worker = thread
        thread.start()

    def _maintenance_interval(self) -> float:
        periods = [
            period
            for period in (self.max_idle, self.max_lifetime, self.leak_threshold)
            if period is not None
        ]
        periods.append(self._reporter.interval())
        interval = min(max(min(periods, default=60.0) / 4, 0.05), 30.0)
        # With MIN_CONNS, a connection the server ends while idle is noticed (by a poll,
        # no round trip) and replaced within a second.
        return min(interval, _MIN_CONNS_CHECK) if self.min_conns else interval

    def _after_fork_in_child(self) -> None:
        """Forget everything inherited from the parent, closing nothing."""
        _inherited.extend(entry.conn for entry in self._idle)
        _inherited.extend(entry.conn for entry in self._in_use.values())
        for conn in _inherited:
            _detach_socket(conn)
        closed = self._closed
        self._init_state()  # new lock, counters and queues; no background thread yet
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

# Connections inherited through fork(): kept referenced so that their ids stay unique
# and nothing closes them (closing would send Terminate on the parent's socket).
_inherited: list[Any] = []


def _work(
    ref: weakref.ReferenceType[ConnectionPool], tasks: queue.SimpleQueue[Any], interval: float
) -> None:
    """The pool's background thread: queued work at once, maintenance every ``interval``.

    Holds only a weak reference between runs, so an abandoned pool can be collected.
    Starts with a maintenance run, which opens ``min_conns`` right away.
    """
    due = time.monotonic()
    while True:
        try:
            task = tasks.get(timeout=max(due - time.monotonic(), 0.0))
        except queue.Empty:
            task = None
        if task is _STOP:
            return
        pool = ref()
        if pool is None:
            return
        try:
            if task is None:
                pool.run_maintenance()
                due = time.monotonic() + interval
            else:
                pool._run_task(task)
        except Exception:
            logger.exception("pool %r: background work failed", pool.name)
        del pool


def _after_fork_in_child() -> None:
    for pool in list(_live_pools):
        pool._after_fork_in_child()


_fork.in_child(_fork.POOLS, "pools", _after_fork_in_child)


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
