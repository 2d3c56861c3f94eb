"""A thread-safe, fork-safe pool of DB-API connections.

This module knows nothing about Django, nor about which driver it pools.  It is given a
``connect()`` callable that opens one connection (psycopg2 or psycopg 3, already in
autocommit) and a clock, and it lends those connections out:

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

Who owns a connection at every moment is one field: each connection is an entry in one
state (``_entries.py``: opening, idle, reserved, handed, lent), changed under the lock in
one step, and every measure in ``stats()`` is read off the states.  The waiting line is
``_waiting.py``; the pool's own thread (queued work, repairs, maintenance) is
``_housekeeping.py``; deadlines on the queries the pool runs itself are ``_deadline.py``.

Promises kept at every step, which the tests check one by one:

- Slow work (connecting, rolling back, closing) never happens while holding the pool's
  lock: the lock only guards the bookkeeping.
- Every query the pool runs itself has a deadline: a silent server costs a borrower
  about ``timeout``, not forever.
- An exception of any kind (``KeyboardInterrupt``, a signal handler's, ``gevent.Timeout``)
  at any step strands nothing for long: the caller gets it; a connection whose state it
  left unknown is discarded; a connection, slot or place in line whose owner left (even
  one whose clean-up was itself interrupted) is found and put right by the next party that
  meets it or by the pool's thread within about a second, with a warning; and
  ``borrows == releases + in_use`` holds by construction.

Everything that differs between drivers (errors, transaction status, the socket, reading
an idle socket, rollback, session characteristics) is asked of a
:class:`~herokupool.drivers.Driver`, the one place that knows psycopg2 from psycopg 3; this
module only calls ``close()`` and reads ``autocommit`` itself.  The connections must
accept weak references.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import threading
import time
import traceback
import weakref
from _thread import get_ident
from collections.abc import Callable, Iterator
from typing import Any, Final

from herokupool import _fork, drivers
from herokupool._deadline import Deadline
from herokupool._entries import _LENT_AT, Entries, Entry, State
from herokupool._housekeeping import FILL, REPAIR, STOP, work
from herokupool._redact import mask_driver_text
from herokupool._waiting import Outcome, Waiter, WaitingLine
from herokupool.drivers import IDLE as _TX_IDLE
from herokupool.drivers import INERROR as _TX_INERROR
from herokupool.drivers import INTRANS as _TX_INTRANS
from herokupool.drivers import Driver
from herokupool.errors import PoolClosed, PoolError, PoolOverloaded, PoolTimeout
from herokupool.metrics import MetricsReporter, WaitWindow

__all__ = ["ConnectionPool"]

logger = logging.getLogger("herokupool.pool")

# Names of the values in ``ConnectionPool.stats()``.
# Measures: the pool's state at the moment of the call, read off the entries' states.
POOL_MAX: Final = "max"
POOL_MIN: Final = "min"
IN_USE: Final = "in_use"
IDLE: Final = "idle"
WAITING: Final = "waiting"
CONNECTING: Final = "connecting"
# Counters: totals since the pool was created (or since this process forked).
BORROWS: Final = "borrows"
RELEASES: Final = "releases"  # borrows that ended: borrows - in_use, by construction
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

# The least time a query the pool runs itself is given, however little of the
# borrower's timeout is left: a healthy server answers SELECT 1 far sooner.
_MIN_QUERY_TIME = 0.1

# Seconds between the background thread's checks of idle connections when min_conns > 0.
_MIN_CONNS_CHECK = 1.0

_LENT = State.LENT
_IDLE = State.IDLE
_OPENING = State.OPENING
_RESERVED = State.RESERVED
_HANDED = State.HANDED

_SERVED = Outcome.SERVED
_SLOT = Outcome.SLOT
_CLOSED = Outcome.CLOSED


class ConnectionPool:
    """A pool of connections for one database (one Django alias in one process).

    Use :meth:`borrow` / :meth:`release`, or the :meth:`connection` context manager.
    ``name`` appears in every error, log line and repr; it is never derived from the
    connection parameters, so no password can reach them.

    Durations are float seconds; ``None`` disables ``max_lifetime``, ``max_idle``,
    ``validate_after`` and ``leak_threshold``.  ``describe_holder(thread_ident)`` may add a
    hint to the timeout message about the thread that has held a connection longest (the
    Django backend names executor threads that never give theirs back).

    ``prepare_release(conn)``, when given, is called on each release before anything is
    sent: it restores what the borrower changed on the client side and returns SQL that
    undoes what it changed in the session (run after the rollback, with ``cleanup``, in
    one round trip), or None; an exception from it closes the connection.  It replaces
    the reset of the driver's session characteristics (isolation level, read only,
    deferrable) done without it.  Must not block or do I/O.  ``unchanged(conn)``, given
    with it, is its fast path: True only when the connection is open, idle, in autocommit
    and the loan left nothing the hook would restore or undo and nothing unread; such a
    release (without ``cleanup``, in a pool without ``reset``) then calls neither the hook
    nor the driver's checks.

    ``successor(conn)``, when given, is called on each release that keeps the connection,
    once it is clean: it returns the object the next borrower gets for the same session,
    after which ``conn`` is closed to whoever still holds it (a borrower that kept it past
    its loan then reaches nothing).  Must not block or do I/O; an exception from it
    closes the connection.

    ``driver`` is the :class:`~herokupool.drivers.Driver` for the connections ``connect()``
    returns, or its name (``"psycopg2"``, ``"psycopg"``).  Left None, the pool picks it from
    the first connection it opens (:func:`herokupool.drivers.for_connection`: the package
    that defines its class), which is right for any connection either driver makes,
    subclasses included; a ``connect()`` returning connections of both drivers is not
    supported.
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
        unchanged: Callable[[Any], bool] | None = None,
        successor: Callable[[Any], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        background: bool = True,
        describe_holder: Callable[[int], str | None] | None = None,
        driver: Driver | str | None = None,
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
        self._test_on_borrow = test_on_borrow
        self._validate_after = validate_after
        self._fresh_for = self._freshness()
        self.reset = reset
        self.leak_threshold = leak_threshold
        self.max_waiting = max_waiting
        self.log_metrics = log_metrics
        self.prepare_release = prepare_release
        self.unchanged = unchanged
        self.successor = successor
        self.describe_holder = describe_holder
        self._connect = connect
        # Until the first connection is attached: a Driver that knows nothing (no
        # connection can reach it).
        self._driver = drivers.get(driver) if isinstance(driver, str) else driver or _UNDECIDED
        self._clock = clock
        self._background = background
        self._init_state()
        _live_pools.add(self)
        if background and min_conns:
            self._start_worker()  # opens min_conns at once, in the background

    def _init_state(self) -> None:
        # One lock guards the entries, the line and the counters; nothing slow runs while
        # holding it.
        self._lock = threading.Lock()
        # The background thread's work (see _housekeeping).  A SimpleQueue because its put()
        # is reentrant: safe from a finalizer or a weak reference's callback that runs in a
        # thread holding any lock, ours included.
        self._tasks: queue.SimpleQueue[Any] = queue.SimpleQueue()
        put = self._tasks.put

        def on_lost(ref: weakref.ReferenceType[Any], put: Callable[[Any], None] = put) -> None:
            # A lent connection, a waiter or an owner was freed: maybe something is stranded.
            # Runs wherever the last reference went: no lock, no I/O, just a note.
            put(REPAIR)

        self._on_lost = on_lost
        self._entries = Entries()
        self._line = WaitingLine(on_lost)
        self._waiting = self._line.refs  # the deque itself: a truth test on the fast path
        self._closed = False
        self._last_error: BaseException | None = None
        self._counters = dict.fromkeys(
            (
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
        self._worker: threading.Thread | None = None
        # Recent waits and the periodic metrics line / advice (herokupool.metrics).
        self._window = WaitWindow()
        self._reporter = MetricsReporter(
            self.name, log_interval=self.log_metrics, started=self._clock()
        )

    def __repr__(self) -> str:
        with self._lock:
            state = "closed" if self._closed else "open"
            counts = self._entries.counts
            return (
                f"<{type(self).__name__} {self.name!r} {state}: {counts[_LENT]} in use, "
                f"{counts[_IDLE]} idle, {len(self._line)} waiting, max {self.max_conns}>"
            )

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def test_on_borrow(self) -> bool:
        return self._test_on_borrow

    @test_on_borrow.setter
    def test_on_borrow(self, value: bool) -> None:
        self._test_on_borrow = value
        self._fresh_for = self._freshness()

    @property
    def validate_after(self) -> float | None:
        return self._validate_after

    @validate_after.setter
    def validate_after(self, value: float | None) -> None:
        self._validate_after = value
        self._fresh_for = self._freshness()

    def _freshness(self) -> float:
        """How long after its last use an idle connection is lent without a query (the
        fast path reads one number where it would read two settings)."""
        if self._test_on_borrow:
            return -math.inf
        return math.inf if self._validate_after is None else self._validate_after

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
        none became free in time (:class:`PoolOverloaded` at once when ``max_waiting``
        borrowers already wait), :class:`PoolClosed` when the pool is closed, and the
        driver's own error when opening a new connection failed (the database is
        unreachable, not the pool exhausted).
        """
        if self._worker is None:
            self._without_worker()
        conn = None
        with self._lock:
            if self._closed:
                raise PoolClosed(f"pool {self.name!r} is closed")
            entries = self._entries
            idle = entries.idle
            if idle:
                # The fast path: the top idle connection needs no query (not expired, used
                # within validate_after, nothing read from or waiting on its socket), so it
                # is lent in one step.
                entry = idle[-1]
                now = self._clock()
                if self._lendable_as_is(entry, now):
                    conn = entries.lend_top(now, get_ident())
                    in_use = entries.counts[_LENT_AT]
        if conn is None:
            return self._borrow_slowly(self.timeout if timeout is None else timeout)
        if not self._unread(entry, conn):
            return self._borrow_slowly(self.timeout if timeout is None else timeout)
        # Outside the lock: note_in_use is lock-free (see herokupool.metrics).
        self._window.note_in_use(in_use, now)
        if self.leak_threshold is not None:
            entry.stack = _borrowers_stack()
        return conn

    def _lendable_as_is(self, entry: Entry, now: float) -> bool:
        """True when ``entry`` may be lent without a query, once a poll of its socket finds
        nothing: not expired, used within ``validate_after`` (and not ``test_on_borrow``),
        nothing read from it meanwhile."""
        if (  # noqa: SIM103  # a condition: one jump per test, on every borrow
            now >= entry.expires_at
            or now - entry.last_used >= self._fresh_for
            or entry.poll is None
            or entry.suspect
        ):
            return False
        return True

    def _without_worker(self) -> None:
        """Start the pool's thread (background) or run its queued work here (not)."""
        if self._background:
            self._start_worker()
        elif not self._tasks.empty():
            self._run_tasks()

    def _take_back(self, entry: Entry, conn: Any, waiter: Waiter | None = None) -> None:
        """``entry`` was lent without a query, then its socket was found readable or the poll
        was interrupted: IDLE again, marked for whoever takes it next to check with a query,
        or RESERVED for ``waiter`` to check in its turn (closed, if the pool closed
        meanwhile)."""
        with self._lock:
            if not self._closed:
                if waiter is None:
                    self._entries.take_back(entry, conn)
                    entry.suspect = True
                else:
                    owner = weakref.ref(waiter, self._on_lost)
                    self._entries.take_back(entry, conn, owner, self._clock())
                return
        self._end_loan(entry, conn, CONNECTIONS_CLOSED, "taken back into a closed pool")

    def _borrow_slowly(self, timeout: float) -> Any:
        """Validate, open or wait: every borrow the fast path could not serve.

        ``waiter`` is this borrow's token (one per turn in line): it owns whatever entry the
        borrow works on, so an entry left behind by an exception (even one landing in the
        clean-up below) is stranded with a dead owner, which the pool's thread puts right.
        """
        waiter = Waiter()
        started: float | None = None
        try:
            entry = self._claim(waiter, False)
            while True:
                if entry is None:  # queued
                    started = self._clock()
                    self._window.note_waiting(len(self._waiting), started)
                    waiter.wait(timeout)
                    entry, conn = self._resolve(waiter, started)
                    # Handed over and lent in one step; or, something to read on its
                    # socket, RESERVED for this borrow again and checked below.
                    if conn is not None and self._unread(entry, conn, waiter):
                        # The count read without the lock, as note_in_use itself is: a peak.
                        in_use = self._entries.counts[_LENT_AT]
                        self._lent(entry, in_use, entry.borrowed_at, started)
                        return conn
                if entry.state is _OPENING:
                    return self._open(entry, started)
                problem = self._check(entry, started, timeout)
                conn, entry = self._lend_checked(entry, problem, started, waiter)
                if conn is not None:
                    return conn
                if entry is None:
                    # It had been put right meanwhile: a new turn, in a new place in line if
                    # it must queue (a waiter is served once), but not shed by max_waiting.
                    waiter = Waiter()
                    entry = self._claim(waiter, True)
        except BaseException:
            self._abandon(waiter)
            raise

    def _take(self, waiter: Waiter) -> Entry:
        """Take the top idle connection (RESERVED for checking), else a free slot (OPENING),
        owned by ``waiter``.  Must be called with the lock held, when there is one or the
        other."""
        entries = self._entries
        if entries.idle:
            entry = entries.idle[-1]
            entries.move(entry, _RESERVED, weakref.ref(waiter, self._on_lost), self._clock())
        else:
            entry = Entry(self._clock(), weakref.ref(waiter, self._on_lost))
            entries.add(entry)
        waiter.entry = entry
        return entry

    def _claim(self, waiter: Waiter, keep_turn: bool) -> Entry | None:
        """:meth:`_take`; else queue ``waiter`` and return None."""
        overloaded = None
        with self._lock:
            if self._closed:
                raise PoolClosed(f"pool {self.name!r} is closed")
            entries = self._entries
            if entries.idle or len(entries.all) < self.max_conns:
                return self._take(waiter)
            if not keep_turn and self.max_waiting is not None:
                if len(self._line) >= self.max_waiting:
                    self._line.prune()  # a borrower that left does not count
                if len(self._line) >= self.max_waiting:
                    self._counters[SHED] += 1
                    overloaded = (
                        f"pool {self.name!r}: {len(self._line)} borrowers already waiting "
                        f"(max_waiting {self.max_waiting}), so this one was refused at once "
                        f"({entries.counts[_LENT]} in use, {entries.counts[_IDLE]} idle, "
                        f"max {self.max_conns})"
                    )
            if overloaded is None:
                self._line.append(waiter)
                self._counters[WAITS] += 1
                return None
        self._window.record_shed(self._clock())
        raise PoolOverloaded(overloaded)

    def _resolve(self, waiter: Waiter, started: float) -> tuple[Entry, Any]:
        """What a queued borrower got once woken (or timed out): an entry to check (RESERVED)
        or open (OPENING) and None, or, for a connection handed over that the fast path
        would lend as it is, the entry LENT and its connection (poll it: ``_unread``).
        """
        message = None
        conn = None
        with self._lock:
            now = self._clock()
            self._wait_time += now - started
            # Read under the lock, as the pool's set() and close() write it: the common
            # outcome first, then give_up(), which succeeds only for a waiter still pending.
            outcome = waiter.outcome
            if outcome is _SERVED:
                entry: Entry = waiter.entry
                if entry.state is _HANDED and entry.owner is not None and entry.owner() is waiter:
                    # Handed over clean by a release just now: lent in this step when the
                    # fast path would lend it, polled by the caller as the fast path does.
                    if self._lendable_as_is(entry, now) and not self._closed:
                        conn = self._entries.lend_top(now, get_ident(), entry)
                    else:
                        self._entries.move(entry, _RESERVED, entry.owner, now)
            elif waiter.give_up():
                self._line.remove(waiter)
                self._counters[TIMEOUTS] += 1
                self._window.record_timeout(now - started, now)
                message = self._timeout_message(now - started, now)
                cause = self._last_error
            elif outcome is _SLOT:
                entry = waiter.entry
        if message is not None:
            raise PoolTimeout(message) from cause
        if outcome is _CLOSED:
            raise PoolClosed(f"pool {self.name!r} was closed while waiting for a connection")
        return entry, conn

    def _unread(self, entry: Entry, conn: Any, waiter: Waiter | None = None) -> bool:
        """Poll the socket of a connection just lent without a query (by the fast path, or
        to a ``waiter`` it was handed to): True when nothing was read from or waits on it;
        else it is RESERVED for ``waiter`` to check with a query in its turn, or, by the fast
        path or interrupted, IDLE again, marked for whoever takes it next to check.

        Outside the lock: ``select.poll`` (where ctypes' is missing) lets go of the GIL, and
        a lock held meanwhile would queue every other borrower and releaser behind a thread
        waiting for the GIL back.
        """
        try:
            readable = entry.poll()  # type: ignore[misc]  # checked: not None
        except BaseException:
            self._take_back(entry, conn)  # interrupted: back in the pool, untouched
            raise
        if readable:
            self._take_back(entry, conn, waiter)
            return False
        return True

    def _check(self, entry: Entry, started: float | None, timeout: float) -> str | None:
        """Why a RESERVED ``entry`` may not be lent, or None when it is healthy.  A validation
        query gets what is left of the borrow's ``timeout`` from ``started`` (None: now)."""
        conn = entry.conn
        if entry.state is not _RESERVED or conn is None:
            return "moved"  # put right meanwhile: try another one
        driver = self._driver
        if driver.closed(conn):
            return "closed"
        now = self._clock()
        if now >= entry.expires_at:
            return "recycled"
        readable = entry.readable()
        if readable and entry.poll is not None:
            # Something arrived while idle: a notification, a parameter change, or the
            # server's goodbye.  read_input() reads it (raising when it sees the close); the
            # query below tells a FATAL whose close has not arrived yet from a notification.
            try:
                _read_idle(driver, entry, conn)
            except driver.errors as error:
                return f"closed ({_first_line(error)})"
            driver.forget_messages(conn)
        if entry.suspect:  # a sweep read something from it without a query: as readable
            entry.suspect = False
            readable = True
        if not (
            readable
            or self.test_on_borrow
            or (self.validate_after is not None and now - entry.last_used >= self.validate_after)
        ):
            return None
        deadline = (now if started is None else started) + timeout
        with self._lock:
            self._counters[VALIDATIONS] += 1
        try:
            limit = Deadline(driver.fileno(conn), max(deadline - now, _MIN_QUERY_TIME))
        except driver.errors:
            return "closed"
        try:
            with limit:
                if not conn.autocommit:  # never let the check open a transaction
                    conn.autocommit = True
                driver.execute(conn, "SELECT 1")
        except driver.errors as error:
            if limit.disarm():
                return "validation got no answer in time; the connection was cut"
            return f"validation failed: {_first_line(error)}"
        finally:
            limit.disarm()  # also when interrupted inside __enter__
        if limit.expired:  # answered, but the socket was cut just after
            return "validation got no answer in time; the connection was cut"
        return None

    def _lend_checked(
        self, entry: Entry, problem: str | None, started: float | None, waiter: Waiter
    ) -> tuple[Any, Entry | None]:
        """Lend a checked entry (the connection, None); or drop it (``problem``) and keep its
        slot for this borrow, ``waiter``'s turn: (None, what took its place: the top idle
        connection, RESERVED, else the slot, OPENING), or (None, None) when it was put right
        meanwhile (no longer ``waiter``'s)."""
        close = replacement = None
        with self._lock:
            now = self._clock()
            owner = entry.owner
            ours = entry.state is _RESERVED and owner is not None and owner() is waiter
            if problem is None and ours and not self._closed:
                conn = self._entries.lend(entry, now, get_ident())
                in_use = self._entries.counts[_LENT]
            else:
                conn = None
                closed = self._closed
                if ours:
                    close = self._entries.remove(entry)
                    lost = problem not in ("recycled", "moved") and not closed
                    self._counters[CONNECTIONS_LOST if lost else CONNECTIONS_CLOSED] += 1
                    if not closed:
                        # Replaced in the same turn (the slot it freed at least is there): a
                        # borrower arriving now does not take it from one that may have queued.
                        replacement = self._take(waiter)
        if conn is not None:
            self._lent(entry, in_use, now, started)
            return conn, None
        if close is not None:
            self._close_quietly(close)
        if closed:
            raise PoolClosed(f"pool {self.name!r} was closed while lending a connection")
        if problem not in ("recycled", "moved"):
            logger.warning(
                "pool %r: discarded a dead connection on borrow (%s)", self.name, problem
            )
            self._sweep()  # a restart ends them all: find the others now
        return None, replacement

    def _open(self, entry: Entry, started: float | None) -> Any:
        """Open a connection in the OPENING ``entry`` (a slot this borrow owns) and lend it.

        On failure the slot goes to the next waiter, which tries for itself: during an
        outage every borrower fails fast instead of queueing behind the first.
        """
        conn = self._connect_in(entry)
        try:
            now = self._clock()
            self._attach(entry, conn, now)
        except BaseException:
            self._close_quietly(conn)
            raise
        with self._lock:
            self._opened()
            if self._closed:
                lent = None
                self._entries.remove(entry)
            elif entry.state is _OPENING:
                lent = self._entries.lend(entry, now, get_ident())
                in_use = self._entries.counts[_LENT]
            else:  # put right meanwhile (cannot happen while we own it): do not lend it
                lent = None
        if lent is None:
            self._close_quietly(conn)
            raise PoolClosed(f"pool {self.name!r} was closed while opening a connection")
        logger.debug("pool %r: opened a connection", self.name)
        self._lent(entry, in_use, now, started)
        return lent

    def _lent(self, entry: Entry, in_use: int, now: float, started: float | None) -> None:
        """Record a loan the slow path just made, outside the lock: the wait it ended (if
        it queued, from ``started``), the in-use peak, and for ``leak_threshold`` the
        borrower's stack."""
        if started is not None:
            self._window.record_wait(now - started, now)
        self._window.note_in_use(in_use, now)
        if self.leak_threshold is not None:
            entry.stack = _borrowers_stack()

    def _attach(self, entry: Entry, conn: Any, now: float) -> None:
        """Record a connection just opened in its slot; the first one decides the driver."""
        driver = self._driver
        if driver is _UNDECIDED:
            # Outside the lock: threads attaching their first connections at once all
            # find the same driver, and the assignment is atomic.
            driver = self._driver = drivers.for_connection(conn)
        driver.adopt(conn)
        entry.attach(conn, now, self.max_lifetime, self._on_lost, driver.fileno)

    def _connect_in(self, entry: Entry) -> Any:
        try:
            return self._connect()
        except BaseException as error:
            masked = _masked(error) if isinstance(error, Exception) else None
            with self._lock:
                self._entries.remove(entry)
                self._counters[CONNECTIONS_FAILED] += 1
                if isinstance(error, Exception):
                    self._last_error = error if masked is None else masked
                self._wake_for_slot(refill=False)
            logger.warning(
                "pool %r: could not open a connection: %s", self.name, _first_line(error)
            )
            if masked is None:
                raise
        # Raised here, outside the handler, so that the original (whose text holds what
        # was masked) is neither its cause nor its context.
        raise masked

    def _opened(self) -> None:
        """Count a connection just opened.  Must be called with the lock held."""
        self._counters[CONNECTIONS_CREATED] += 1
        self._last_error = None

    def _abandon(self, waiter: Waiter) -> None:
        """A borrow ended in an exception: leave the line, and put right whatever entry it
        was working on (hand on a connection it was given, free its slot, discard one whose
        check it left unfinished).  Idempotent."""
        with self._lock:
            if waiter.give_up():
                self._line.remove(waiter)
            entry: Entry | None = waiter.entry
            close = None
            if entry is not None and entry.owner is not None and entry.owner() is waiter:
                close = self._put_right(entry)
        if close is not None:
            self._close_quietly(close)

    def _put_right(self, entry: Entry) -> Any:
        """Move on an entry whose owner left; return a connection to close outside the
        lock, if any.  Must be called with the lock held."""
        state = entry.state
        if state is _HANDED and not self._closed:
            # Handed over clean and never used: the next waiter, or the idle stack.
            self._hand_on(entry, entry.conn, self._clock())
            return None
        if state in (_HANDED, _RESERVED, _LENT):
            self._counters[CONNECTIONS_CLOSED if self._closed else CONNECTIONS_DISCARDED] += 1
        conn = self._entries.remove(entry)  # OPENING: a slot; RESERVED: its state unknown
        self._wake_for_slot()
        return conn

    def _hand_on(self, entry: Entry, conn: Any, now: float, *, bottom: bool = False) -> None:
        """Give a clean connection to the oldest waiter, else to the idle stack.  Must be
        called with the lock held."""
        waiter, ref = self._line.next()
        if waiter is None:
            self._entries.shelve(entry, conn, bottom=bottom)
            return
        entry.conn = conn
        self._entries.move(entry, _HANDED, ref, now)
        waiter.set(_SERVED, entry)  # last: the waiter finds the entry HANDED to it

    def _wake_for_slot(self, *, refill: bool = True) -> None:
        """Slots may be free: let the oldest waiters open connections in them, or ask the
        background thread to refill towards ``min_conns`` (not after a failed connect:
        during an outage that would retry in a tight loop; maintenance retries).

        Must be called with the lock held.
        """
        if self._closed:
            return
        entries = self._entries
        while len(entries) < self.max_conns:
            waiter, ref = self._line.next()
            if waiter is None:
                break
            entry = Entry(self._clock(), ref)
            entries.add(entry)
            waiter.set(_SLOT, entry)
        if refill and len(entries) < self.min_conns:
            self._tasks.put(FILL)

    def _timeout_message(self, waited: float, now: float) -> str:
        """Why a borrower timed out, with the numbers.  Called with the lock held."""
        counts = self._entries.counts
        message = (
            f"pool {self.name!r}: timed out after {waited:.1f} s waiting for a "
            f"connection ({counts[_LENT]} in use, {counts[_IDLE]} idle, "
            f"{len(self._line)} waiting, max {self.max_conns})"
        )
        if counts[_OPENING]:
            # The slots are held by connection attempts, not by borrowers: without this
            # an unresponsive server reads as "0 in use" exhaustion.
            message += f"; {counts[_OPENING]} still connecting to the server"
        held = [e for e in self._entries.lent.values() if e.holder is not None]
        if held:
            oldest = min(held, key=lambda e: e.borrowed_at)
            names = {thread.ident: thread.name for thread in threading.enumerate()}
            name = names.get(oldest.holder)
            message += f"; held longest: {now - oldest.borrowed_at:.1f} s by " + (
                f"thread {name!r}" if name is not None else "a thread that has ended"
            )
            if self.describe_holder is not None and oldest.holder is not None:
                with contextlib.suppress(Exception):
                    hint = self.describe_holder(oldest.holder)
                    if hint:
                        message += f" ({hint})"
        if self._last_error is not None:
            message += f"; the last attempt to connect failed: {_first_line(self._last_error)}"
        return message

    # ---------------------------------------------------------------- release

    def release(self, conn: Any, *, cleanup: str | None = None) -> None:
        """Give back a borrowed connection.

        An open or failed transaction is rolled back (a raw ``BEGIN`` too); ``cleanup``
        is SQL run first to undo what only the caller knows it left (e.g. ``CLOSE ALL``
        after server-side cursors), then the pool's ``reset``.  Notifications and notices
        the borrower left unread are dropped.  A connection that cannot be cleaned within
        the pool's timeout, a broken one, one past ``max_lifetime`` or one returned to a
        closed pool is closed instead of kept.  Raises ``ValueError`` for a connection
        this pool did not lend.
        """
        entry = self._entries.lent.get(id(conn))
        if entry is None or entry.ref is None or conn is not entry.ref():
            self._release_unknown(conn)
            return
        try:
            quick = self.unchanged
            if quick is not None and cleanup is None and not self.reset and quick(conn):
                problem = None  # the common loan: nothing to undo, nothing unread
            else:
                problem = self._reset(conn, cleanup)
                if problem is None:
                    # What the borrower left unread must not reach the next one, nor grow.
                    self._driver.forget_messages(conn)
            now = self._clock()
        except BaseException:
            # Interrupted while cleaning: the session's state is unknown.
            self._end_loan(entry, conn, CONNECTIONS_DISCARDED, "interrupted on release")
            raise
        if problem is not None:
            if problem == "lost":
                logger.warning("pool %r: a connection was lost while in use", self.name)
                self._end_loan(entry, conn, CONNECTIONS_LOST, problem, sweep=True)
            else:
                logger.warning(
                    "pool %r: discarded a connection on release (%s)", self.name, problem
                )
                self._end_loan(entry, conn, CONNECTIONS_DISCARDED, problem)
            return
        if now >= entry.expires_at:
            self._end_loan(entry, conn, CONNECTIONS_CLOSED, "recycled")
            return
        kept = conn
        if self.successor is not None:
            try:
                # The session goes on in a new object; conn is closed to its holder.
                kept = self.successor(conn)
                ref, key = weakref.ref(kept, self._on_lost), id(kept)
            except BaseException:
                # Interrupted (or failed): the session is in conn, or already in kept;
                # closed either way.
                self._end_loan(entry, conn, CONNECTIONS_DISCARDED, "interrupted on release")
                if kept is not conn:
                    self._close_quietly(kept)
                raise
        with self._lock:
            if entry.state is not _LENT or conn is not entry.ref():
                return  # given back twice at once: the other call took it
            if not self._closed:
                entries = self._entries
                if kept is not conn:
                    # The entry follows the session to its new object (give_back() then
                    # finds nothing left to unindex).
                    entries.lent.pop(entry.key, None)
                    entry.ref = ref
                    entry.key = key
                if self._waiting:
                    # FIFO: straight to the oldest waiter (_hand_on's step, inlined).
                    waiter, owner = self._line.next()
                    if waiter is not None:
                        entries.give_back(entry, kept, now, owner)
                        waiter.set(_SERVED, entry)  # last: it finds the entry HANDED to it
                        return
                entries.give_back(entry, kept, now)
                return
            self._entries.remove(entry)
            self._counters[CONNECTIONS_CLOSED] += 1
        self._close_quietly(kept)

    def release_later(self, conn: Any, *, cleanup: str | None = None) -> None:
        """Have the pool's own thread release ``conn`` soon (with ``cleanup``, as
        :meth:`release`).

        For code that must not block or take a lock: a garbage-collector finalizer or a
        weakref callback runs in whichever thread triggered it, possibly one inside
        this pool's lock.  Never raises; a connection this pool does not know is
        ignored when its turn comes.  After :meth:`close` the pool's thread stays until
        every lent connection came back, so such a connection is closed at once.
        """
        self._tasks.put((conn, cleanup))

    def discard(self, conn: Any) -> None:
        """Give back a borrowed connection that must not be reused: close it."""
        entry = self._entries.lent.get(id(conn))
        if entry is None or entry.ref is None or conn is not entry.ref():
            self._release_unknown(conn)
            return
        self._end_loan(entry, conn, CONNECTIONS_DISCARDED, "discarded")

    def _release_unknown(self, conn: Any) -> None:
        if any(conn is inherited for inherited in _inherited):
            # Borrowed by our parent before fork(): the parent still owns its socket.
            return
        raise ValueError(f"pool {self.name!r}: this connection was not borrowed from this pool")

    def _end_loan(
        self, entry: Entry, conn: Any, counter: str, reason: str, *, sweep: bool = False
    ) -> None:
        """Close a lent ``conn`` and free its slot for a waiter."""
        with self._lock:
            if entry.state is _LENT and entry.ref is not None and entry.ref() is conn:
                self._entries.remove(entry)
                self._counters[counter] += 1
                self._wake_for_slot()
        logger.debug("pool %r: closed a connection (%s)", self.name, reason)
        self._close_quietly(conn)
        if sweep:
            self._sweep()

    def _reset(self, conn: Any, cleanup: str | None) -> str | None:
        """Make ``conn`` ready for the next borrower; say why not when it cannot be."""
        driver = self._driver
        hook = self.prepare_release
        if not (cleanup or self.reset) and driver.untouched(conn):
            # The common case, in one call: open, idle, in autocommit, its characteristics
            # unchanged; nothing to undo unless the hook says so.
            if hook is None:
                return None
            in_transaction = session = False
        else:
            if driver.closed(conn):
                return "lost"
            status = driver.transaction_status(conn)
            if status == _TX_IDLE:
                in_transaction = False
            elif status in (_TX_INTRANS, _TX_INERROR):
                in_transaction = True
            else:
                # ACTIVE (a query still running), UNKNOWN (a broken socket) or HELD (a
                # transaction block of the driver's own is still open).
                if driver.closed(conn):
                    return "lost"
                return f"transaction status {drivers.status_name(status)}"
            # A hook knows what the loan changed, the characteristics included.
            session = hook is None and driver.session_changed(conn)
        if hook is not None:
            # Its undo runs after the rollback.
            try:
                undo = hook(conn)
            except driver.not_reusable as error:
                return f"it cannot be made new again: {_first_line(error)}"
            if undo:
                cleanup = undo if cleanup is None else f"{cleanup}; {undo}"
        if not (in_transaction or cleanup or self.reset or session or not conn.autocommit):
            return None  # nothing to undo, no round trip
        return self._clean(conn, in_transaction, session, cleanup)

    def _clean(
        self, conn: Any, in_transaction: bool, session: bool, cleanup: str | None
    ) -> str | None:
        """End the transaction, reset the session characteristics, run ``cleanup`` and
        the pool's ``reset``, under the pool's deadline; say why not when it failed."""
        driver = self._driver
        try:
            limit = Deadline(driver.fileno(conn), self.timeout)
        except driver.errors:
            return "lost"
        try:
            with limit:
                if in_transaction or not conn.autocommit:
                    driver.end_transaction(conn)  # a raw BEGIN in autocommit too
                if session:
                    driver.reset_session(conn)
                for sql in (cleanup, self.reset):
                    if sql:
                        driver.execute(conn, sql)
        except driver.errors as error:
            if limit.disarm():
                return "cleaning it got no answer in time; the connection was cut"
            if driver.closed(conn):
                return "lost"
            return f"reset failed: {_first_line(error)}"
        finally:
            limit.disarm()  # also when interrupted inside __enter__
        if limit.expired:
            return "cleaning it got no answer in time; the connection was cut"
        if driver.transaction_status(conn) != _TX_IDLE:
            return "a transaction could not be ended"
        return None

    def _sweep(self) -> int:
        """One connection was found dead: take out the idle ones that died too (a server
        restart ends them all), by a zero-timeout poll each.  A readable socket is not a
        dead one (a notification, a parameter change): the driver's ``read_input()`` reads
        what is there and raises only for a closed connection, outside the lock.  Healthy
        ones stay, so one killed backend costs one reconnect.  Returns how many were dead."""
        token = Waiter()  # owns the suspects while they are polled
        owner = weakref.ref(token, self._on_lost)
        with self._lock:
            now = self._clock()
            closed = self._driver.closed
            suspects = [e for e in self._entries.idle if closed(e.conn) or e.readable()]
            for entry in suspects:
                self._entries.move(entry, _RESERVED, owner, now)
        if not suspects:
            del owner  # before the token, so its callback never runs
            return 0
        alive: list[Entry] = []
        driver = self._driver
        try:
            for entry in suspects:
                conn = entry.conn
                if driver.closed(conn) or entry.poll is None:
                    continue
                try:
                    _read_idle(driver, entry, conn)
                except Exception:
                    continue
                driver.forget_messages(conn)
                # What was read may be a FATAL whose close is still on its way: the next
                # borrow of this one runs a query first.
                entry.suspect = True
                alive.append(entry)
        finally:
            dead = []
            with self._lock:
                for entry in suspects:
                    if entry.state is not _RESERVED or entry.owner is not owner:
                        continue  # put right meanwhile
                    if entry in alive and not self._closed:
                        self._entries.shelve(entry, entry.conn, bottom=True)
                    else:
                        dead.append(self._entries.remove(entry))
                        self._counters[CONNECTIONS_LOST] += 1
                if dead:
                    self._wake_for_slot()
            # Dropped before the token: a weak reference that dies first never calls back,
            # so a sweep that finished leaves no repair behind.
            del owner
            for conn in dead:
                self._close_quietly(conn)
        if dead:
            logger.warning("pool %r: %d idle connection(s) found dead", self.name, len(dead))
        del token
        return len(dead)

    # ------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Close the pool: idle connections now, borrowed ones when released.

        Waiters get :class:`PoolClosed`; later borrows raise it.  Idempotent.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            idle = [self._entries.remove(entry) for entry in list(self._entries.idle)]
            self._counters[CONNECTIONS_CLOSED] += len(idle)
            self._line.close()
        self._tasks.put(STOP)
        for conn in idle:
            self._close_quietly(conn)
        if self._worker is None:
            self._run_tasks()  # connections given to release_later
        logger.debug("pool %r: closed", self.name)

    def run_maintenance(self) -> None:
        """Close expired and surplus idle connections, refill to ``min_conns``, report
        leaks, release what ``release_later`` was given and put right anything stranded.
        The background thread calls this periodically; tests call it directly with an
        injected clock."""
        self._run_tasks()
        self._repair()
        now = self._clock()
        with self._lock:
            if self._closed:
                return
            entries = self._entries
            expired: list[Any] = []
            surplus = len(entries) - self.min_conns
            # Oldest-used first (bottom of the stack), so the hottest connections stay.
            for entry in list(entries.idle):
                if now >= entry.expires_at or (
                    self.max_idle is not None
                    and surplus > 0
                    and now - entry.last_used >= self.max_idle
                ):
                    expired.append(entries.remove(entry))
                    surplus -= 1
            self._counters[CONNECTIONS_CLOSED] += len(expired)
            leaks = []
            if self.leak_threshold is not None:
                for entry in entries.lent.values():
                    if entry.stack is not None and now - entry.borrowed_at >= self.leak_threshold:
                        leaks.append((now - entry.borrowed_at, entry.stack))
                        entry.stack = None  # report each borrow once
                self._counters[LEAKS] += len(leaks)
        for conn in expired:
            self._close_quietly(conn)
        if expired:
            logger.info("pool %r: closed %d expired idle connection(s)", self.name, len(expired))
        # Idle connections the server ended meanwhile (pg_terminate_backend,
        # idle_session_timeout): _fill() below replaces them now rather than at the next borrow.
        self._sweep()
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

    def _repair(self) -> None:
        """Find and put right what an interruption left stranded: entries whose owner (or,
        lent, whose connection) is gone, waiters that left without leaving the line, counts
        or indexes that drifted from the states.  Cheap when there is nothing to do."""
        with self._lock:
            entries = self._entries
            drift = entries.audit()
            ghosts = self._line.prune()
            repaired: list[tuple[State, Any]] = []
            for entry in [e for e in entries.all if e.stranded()]:
                repaired.append((entry.state, self._put_right(entry)))
            self._wake_for_slot(refill=False)  # _put_right asked for a refill if one is due
        for _, conn in repaired:
            if conn is not None:
                self._close_quietly(conn)
        if drift:
            logger.warning("pool %r: repaired its books: %s", self.name, "; ".join(drift))
        if ghosts:
            logger.warning(
                "pool %r: removed %d waiter(s) whose borrower had left the line", self.name, ghosts
            )
        for state, _ in repaired:
            logger.warning("pool %r: %s", self.name, _REPAIRED[state])

    def _outstanding(self) -> int:
        """Connections not idle: lent, being opened, checked or handed over."""
        with self._lock:
            return len(self._entries) - self._entries.counts[_IDLE]

    def _run_tasks(self) -> None:
        """Do what was queued for the background thread (without one: now)."""
        while True:
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                return
            self._run_task(task)

    def _run_task(self, task: Any) -> None:
        if task is FILL:
            self._fill()
        elif task is REPAIR:
            self._repair()
        elif task is not STOP:
            self._release_orphan(*task)

    def _release_orphan(self, conn: Any, cleanup: str | None) -> None:
        entry = self._entries.lent.get(id(conn))
        if entry is None or entry.ref is None or conn is not entry.ref():
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
        """Open connections until ``min_conns`` exist, each in a slot of its own."""
        while True:
            token = Waiter()  # owns the slot while connecting
            with self._lock:
                if self._closed or len(self._entries) >= self.min_conns:
                    return
                entry = Entry(self._clock(), weakref.ref(token, self._on_lost))
                self._entries.add(entry)
            try:
                conn = self._connect_in(entry)
            except Exception:
                return  # logged; the next maintenance run tries again
            try:
                now = self._clock()
                self._attach(entry, conn, now)
            except BaseException:
                self._close_quietly(conn)
                raise
            with self._lock:
                self._opened()
                closed = self._closed or entry.state is not _OPENING
                if closed:
                    self._entries.remove(entry)
                else:
                    self._hand_on(entry, conn, now, bottom=True)
            if closed:
                self._close_quietly(conn)
                return

    def _start_worker(self) -> None:
        with self._lock:
            if self._worker is not None or self._closed:
                return
            thread = threading.Thread(
                target=work,
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
        inherited = []
        for entry in self._entries.all:
            conn = entry.conn if entry.conn is not None else entry.ref() if entry.ref else None
            if conn is not None:
                inherited.append(conn)
        for conn in inherited:
            _detach_socket(conn, self._driver)  # this pool's own: its driver knows them
        _inherited.extend(inherited)
        closed = self._closed
        self._init_state()  # new lock, entries and queues; no background thread yet
        self._closed = closed

    def _close_quietly(self, conn: Any) -> None:
        with contextlib.suppress(*self._driver.errors):
            conn.close()

    # ------------------------------------------------------------------ stats

    def stats(self) -> dict[str, int | float]:
        """A snapshot of the pool's measures and counters (see the module constants)."""
        with self._lock:
            entries = self._entries
            counts = entries.counts
            stats: dict[str, int | float] = {
                POOL_MAX: self.max_conns,
                POOL_MIN: self.min_conns,
                IN_USE: counts[_LENT],
                IDLE: counts[_IDLE],
                WAITING: len(self._line),
                CONNECTING: counts[_OPENING],
                BORROWS: entries.borrows,
                RELEASES: entries.releases,
                **self._counters,
                WAIT_TIME: round(self._wait_time, 6),
            }
        # Outside the pool's lock: the window has its own (see herokupool.metrics).
        stats.update(self._window.snapshot(self._clock()))
        return stats


_REPAIRED = {
    State.OPENING: "freed a slot held for a connection its borrower stopped opening",
    State.RESERVED: "discarded a connection a borrower left half-checked",
    State.HANDED: "took back a connection handed to a borrower that left before taking it up",
    State.LENT: "a borrower lost a connection without releasing it (freed, so closed): "
    "its slot is free again",
    State.IDLE: "",
}

_UNDECIDED: Final = Driver()

_live_pools: weakref.WeakSet[ConnectionPool] = weakref.WeakSet()

# Connections inherited through fork(): kept referenced so that their ids stay unique
# and nothing closes them (closing would send Terminate on the parent's socket).
_inherited: list[Any] = []


def _after_fork_in_child() -> None:
    for pool in list(_live_pools):
        pool._after_fork_in_child()


_fork.in_child(_fork.POOLS, "pools", _after_fork_in_child)


_devnull: int | None = None


def _detach_socket(conn: Any, driver: Driver) -> None:
    """Point an inherited connection's descriptor at /dev/null.

    The child then holds no reference to the parent's socket, and whatever the driver
    might later write on it (a Terminate at exit) goes nowhere.
    """
    global _devnull
    try:
        fd = driver.fileno(conn)
        if _devnull is None:
            _devnull = os.open(os.devnull, os.O_RDWR)
        if fd != _devnull:
            os.dup2(_devnull, fd)
    except Exception:
        pass


#: Most reads of an idle socket per check: a killed backend's FATAL and its close may take
#: two; a stream of notifications must not keep a check reading.
_MAX_IDLE_READS: Final = 4


def _read_idle(driver: Driver, entry: Entry, conn: Any) -> None:
    """Read what arrived on an idle connection until its socket is quiet (at most
    :data:`_MAX_IDLE_READS` reads); raise the driver's error when the server closed it.

    One read is not enough: libpq hands an error that arrives while idle (a terminated
    backend's FATAL) to the notice processor and sees the close that follows only at the
    next read, so a single read would keep a dead connection until the next sweep.
    """
    for _ in range(_MAX_IDLE_READS):
        driver.read_input(conn)
        if not entry.readable():
            return


def _borrowers_stack() -> list[str]:
    """The calling thread's stack, formatted, down to its call of ``borrow()``: the
    borrower's frames, none of the pool's below it, whichever path lent the connection."""
    frames = traceback.extract_stack()
    for index in range(len(frames) - 1, -1, -1):
        frame = frames[index]
        if frame.name == "borrow" and frame.filename == __file__:
            return traceback.format_list(frames[:index])
    return traceback.format_list(frames)


def _first_line(error: BaseException) -> str:
    text = mask_driver_text(str(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _masked(error: Exception) -> Exception | None:
    """A copy of a driver's ``error`` with what may be a password masked (see
    :func:`~herokupool._redact.mask_driver_text`), of the same type where it can be made;
    None when there was nothing to mask."""
    text = str(error)
    masked = mask_driver_text(text)
    if masked == text:
        return None
    try:
        copy = type(error)(masked)
    except Exception:
        copy = PoolError(masked)  # an OperationalError of every driver installed
    if str(copy) != masked:  # a type whose str() is not its argument
        copy = PoolError(masked)
    return copy
