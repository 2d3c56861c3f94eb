"""psycopg 3 connections that know what a loan did to them, and cursors that end with it.

The psycopg 3 counterpart of :mod:`herokupool.tracked` (psycopg2), with the same
promises.  The backend opens every pooled connection as a :class:`TrackedConnection`.
Every cursor made on it (``conn.cursor()``, and so ``conn.execute()``, Django's cursors,
a library's raw ones) becomes an instance of a subclass of its own class that

- passes each statement (``execute``, ``executemany``, ``stream``, ``copy``) through
  :func:`herokupool.session.changes` and records the session state it changes on the
  connection, with the names of the statements it ``PREPARE``s;
- belongs to the current loan: :meth:`TrackedConnection.end_loan` ends every cursor of
  the loan before the connection can reach another borrower.  Its results are dropped
  and its connection is replaced by a closed one, so every later call of any kind
  (execute, fetch, iteration, scroll, copy, close) fails with psycopg's own
  ``OperationalError("the connection is closed")`` without taking the connection's lock
  or sending a byte.  The server's side of a ``WITH HOLD`` cursor is closed by the
  release's ``CLOSE ALL``; any other one ended with its transaction.

Cursors built by calling a cursor class directly (Django's ``ServerSideCursor``) are
adopted by the backend (:meth:`TrackedConnection.adopt`).

On release the pool calls :func:`prepare_release`, which restores what the loan changed
on the client side (adapters registered on the connection, ``cursor_factory``,
``server_cursor_factory``, ``row_factory``, ``prepare_threshold``, ``prepared_max``, notice
and notify handlers, unread notifications) and returns the undo of what it changed in
the session.

**The connection object is the loan's.** Once the release has found the session clean, the
pool asks :func:`successor` for the object the next borrower gets: a new
:class:`TrackedConnection` taking over the session, its socket, its state and psycopg's
prepared statements, while the released object becomes a closed connection
(:class:`ClosedAfterItsLoan`).  Code that kept the raw connection past its request then
gets psycopg's ``OperationalError("the connection is closed")``, as after the stock
engine's ``close()``, never the session another request now holds.

**Prepared statements.** psycopg 3 prepares a statement run ``prepare_threshold`` times
(names ``_pg3_N``) and remembers it on the connection: on a pooled session those plans
serve every later loan, which is the point.  The undo therefore never sends ``DEALLOCATE
ALL`` behind psycopg's back: a borrower's own ``PREPARE x`` is undone by name.  When the
server forgot statements psycopg knows (a borrower's ``DEALLOCATE ALL``, ``DISCARD ALL``,
``DEALLOCATE _pg3_3``; a ``RESET`` that discards them; a ``PREPARE`` whose name cannot be
read), psycopg's cache is emptied and the undo sends ``DEALLOCATE ALL``: both sides then
agree again, and psycopg prepares afresh.

This module knows nothing about Django.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import pq
from psycopg import sql as psycopg_sql
from psycopg.adapt import AdaptersMap
from psycopg.pq import TransactionStatus
from psycopg.rows import tuple_row
from psycopg.types import TypesRegistry

from herokupool import session
from herokupool.session import SessionNotReusable

__all__ = [
    "TrackedConnection",
    "apply_isolation_level",
    "prepare_release",
    "release_hook",
    "successor",
    "unchanged",
]

# Prune the loan's list of cursor references once it grows past this many.
_PRUNE_AT = 256

_ROLE_UNKNOWN: Any = object()

_IDLE = TransactionStatus.IDLE


class _LoanAdapters(AdaptersMap):
    """The connection's adapters map: says when a borrower registered a dumper, a loader
    or a type on the connection (``register_hstore(info, conn)``...)."""

    herokupool_changed = False

    def __init__(self, template: AdaptersMap) -> None:
        super().__init__(template)
        self.types = _LoanTypes(self, self.types)

    def register_dumper(self, cls: Any, dumper: Any) -> None:
        self.herokupool_changed = True
        super().register_dumper(cls, dumper)

    def register_loader(self, oid: Any, loader: Any) -> None:
        self.herokupool_changed = True
        super().register_loader(oid, loader)


class _LoanTypes(TypesRegistry):
    def __init__(self, owner: _LoanAdapters, template: TypesRegistry) -> None:
        super().__init__(template)
        self._owner = weakref.ref(owner)

    def add(self, info: Any) -> None:
        owner = self._owner()
        if owner is not None:
            owner.herokupool_changed = True
        super().add(info)


# How many items of TrackedConnection._loan_state() are client state (the rest: the session
# characteristics).
_CLIENT_STATE = 5


class TrackedConnection(psycopg.Connection[Any]):
    """A psycopg 3 connection that records what each loan changed (see the module
    docstring).  ``assumed_role`` is the role the backend's session set-up assumed on
    this session (Django's ``assume_role``), None for the login role."""

    # psycopg's __del__ only warns about a connection freed while open, which a pooled one
    # never is (the pool marks it as psycopg_pool does, see herokupool.drivers), and it is
    # Python code: a signal handler's exception (Celery's soft time limit) landing in a
    # finalizer is printed and swallowed, never reaching the code it was meant to stop.
    # One goes at each release (see successor()) and whenever the pool closes one.  A C
    # function that takes the object and does nothing.
    __del__ = object.__init__  # type: ignore[assignment]

    def __init__(self, pgconn: Any, row_factory: Any = tuple_row) -> None:
        super().__init__(pgconn, row_factory)
        # The object libpq's notices and notifications go to, through one cell that
        # successor() points at the session's next object (psycopg's own handlers hold a
        # weak reference to this one).
        self._herokupool_target = target = [weakref.ref(self)]
        pgconn.notice_handler = functools.partial(_notice, target)
        pgconn.notify_handler = functools.partial(_notify, target)
        # What successor() leaves the released object, made while connecting, so that no
        # release makes it: libpq's connect_start() tries a socket, once per process.
        _finished_pgconn()
        #: session.* flags of what the current loan changed.
        self.herokupool_flags = 0
        self.assumed_role: object = None
        # Statements the loan PREPAREd (names as the server knows them).
        self.herokupool_prepared: set[str] = set()
        # The server forgot statements psycopg may hold: its cache must be emptied.
        self.herokupool_forgot = False
        self._cursors: list[weakref.ReferenceType[Any]] = []
        self._loan_open = False
        self._handlers: list[tuple[Callable[[Any], None], Any]] | None = None
        self._template: AdaptersMap | None = None
        # The client state every loan starts from (see _loan_state(), set by mark_baseline)
        # and, with the borrower's characteristics added by begin_loan(), what
        # client_state_changed() compares.
        self._baseline: tuple[Any, ...] = ()
        self._characteristics: tuple[Any, Any, Any] = (None, None, None)
        self._expected: tuple[Any, ...] = ()

    def mark_baseline(self, context: AdaptersMap | None) -> None:
        """Take the connection's client-side state now as what every loan starts from.
        Called once, when the connection has been set up; ``context`` is the adapters
        template it was opened with (Django's)."""
        self._template = context if context is not None else self.adapters
        self._adapters = _LoanAdapters(self._template)
        state = self._loan_state()
        self._baseline = state[:_CLIENT_STATE]
        self._characteristics = state[_CLIENT_STATE:]
        self._expected = state

    def keep_adapters(self) -> None:
        """The adapters registered on the connection so far this loan are the backend's
        set-up for it (PostGIS's), not a borrower's change: the release keeps them, and
        the next borrow's set-up registers them again."""
        adapters: Any = self._adapters
        adapters.herokupool_changed = False

    def _loan_state(self) -> tuple[Any, ...]:
        # The client state (the first _CLIENT_STATE items, which restore_client_state() puts
        # back through psycopg's setters), then the session characteristics; read without
        # psycopg's properties, as it runs on every release (prepared_max as psycopg stores
        # it: its setter takes that value back unchanged).
        prepared = self._prepared
        return (
            self.cursor_factory,
            self.server_cursor_factory,
            self.row_factory,
            prepared.prepare_threshold,
            prepared.prepared_max,
            self._isolation_level,
            self._read_only,
            self._deferrable,
        )

    def begin_loan(self, isolation_level: Any = None) -> None:
        """Start a loan whose borrower's settings ask for ``isolation_level`` (None: the
        server's default; see :func:`apply_isolation_level`): forget what the pool itself
        ran between loans, and note the session characteristics the borrower's set-up gave
        it, which the release keeps."""
        if self._isolation_level != isolation_level:
            apply_isolation_level(self, isolation_level)
        self.herokupool_flags = 0
        if self.herokupool_prepared:
            self.herokupool_prepared = set()
        self.herokupool_forgot = False  # the last release's own DEALLOCATE ALL, if any
        characteristics = (self._isolation_level, self._read_only, self._deferrable)
        if characteristics != self._characteristics:  # as the last loan's, nearly always
            self._characteristics = characteristics
            self._expected = self._baseline + characteristics
        self._loan_open = True

    def note(self, flags: int, query: str) -> None:
        """Record session changes (``session.*`` flags) made by the current loan's
        ``query``."""
        if not self._loan_open:
            return  # the pool's own statements between loans (validation, the undo)
        if flags & session.FORGETS:
            self.note_forgotten(query)
            flags &= ~session.FORGETS
        if flags & session.ROLE_RESET:
            self.assumed_role = None
            flags &= ~session.ROLE_RESET
        elif flags & session.ROLE:
            self.assumed_role = _ROLE_UNKNOWN
        if flags & session.PREPARE:
            names = session.prepared_names(query)
            if names is None:
                self.herokupool_forgot = True  # undone with DEALLOCATE ALL
            else:
                self.herokupool_prepared.update(names)
        self.herokupool_flags |= flags

    def note_forgotten(self, query: str) -> None:
        """Record what ``query`` makes the server forget of its prepared statements."""
        everything, names = session.forgets_prepared(query)
        # The loan's own names stay recorded: should this statement fail, the server keeps
        # them, and the release's undo skips a name that is already gone.
        if any(name not in self.herokupool_prepared for name in names):
            everything = True  # perhaps psycopg's own
        if everything:
            # psycopg would otherwise go on executing statements by names the server is
            # about to forget (within this loan too, where a new connection would not
            # have prepared them yet).  Should the statement fail, the server keeps them
            # unknown to psycopg: the release's DEALLOCATE ALL drops them.
            self.forget_prepared()
            self.herokupool_forgot = True

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:
            return self.adopt(super().cursor(*args, **kwargs))
        # What psycopg's cursor() does when called without arguments (Django's cursors,
        # conn.execute()), with the tracking subclass of the cursor factory built directly:
        # switching a made cursor's class costs more than all the tracking does.
        self._check_connection_ok()
        factory = self.cursor_factory
        try:
            tracking = _classes.get(factory)
        except TypeError:  # unhashable: not a class
            tracking = None
        if tracking is None:
            if not isinstance(factory, type):
                return self.adopt(super().cursor())  # a function: adopt what it makes
            tracking = _tracking_class(factory)
        return self._track(tracking(self, row_factory=self.row_factory))

    def adopt(self, cursor: Any) -> Any:
        """Make ``cursor`` (made on this connection) one of the loan's: tracked, and
        ended with it.  Returns it."""
        cls = type(cursor)
        tracking = _tracking_class(cls)
        if tracking is not cls:
            cursor.__class__ = tracking
        return self._track(cursor)

    def _track(self, cursor: Any) -> Any:
        cursors = self._cursors
        cursors.append(weakref.ref(cursor))
        if len(cursors) > _PRUNE_AT:
            self._cursors = [ref for ref in cursors if ref() is not None]
        return cursor

    def add_notice_handler(self, callback: Any) -> None:
        self._added(self.remove_notice_handler, callback)
        super().add_notice_handler(callback)

    def add_notify_handler(self, callback: Any) -> None:
        self._added(self.remove_notify_handler, callback)
        super().add_notify_handler(callback)

    def _added(self, remove: Callable[[Any], None], callback: Any) -> None:
        if self._loan_open:
            if self._handlers is None:
                self._handlers = []
            self._handlers.append((remove, callback))

    def end_loan(self) -> None:
        """End every cursor of the current loan (see the module docstring).

        No I/O and no lock: safe in a garbage-collector finalizer or a dying thread.
        """
        cursors, self._cursors = self._cursors, []
        for ref in cursors:
            cursor: Any = ref()
            if cursor is None:
                continue
            cursor._close()  # drops its results; no I/O
            cursor._conn = _RELEASED
        # Last: an end_loan() interrupted above leaves the loan open, and the release
        # then closes the connection (see prepare_release).
        self._loan_open = False

    def client_state_changed(self) -> bool:
        """Whether the loan left client-side state behind (see :func:`prepare_release`)."""
        adapters: Any = self._adapters
        if (  # noqa: SIM103  # a condition, as in unchanged(): one jump per test
            self._handlers
            or self._notifies_backlog
            or adapters.herokupool_changed
            or self._loan_state() != self._expected
        ):
            return True
        return False

    def restore_client_state(self) -> None:
        """Put the client-side state back to the baseline (no I/O)."""
        if self._handlers:
            for remove, callback in self._handlers:
                with contextlib.suppress(ValueError):  # removed by the borrower itself
                    remove(callback)
        self._handlers = None
        if self._notifies_backlog:
            self._notifies_backlog.clear()
        adapters: Any = self._adapters
        if adapters.herokupool_changed and self._template is not None:
            self._adapters = _LoanAdapters(self._template)
        (
            self.cursor_factory,
            self.server_cursor_factory,
            self.row_factory,
            self.prepare_threshold,
            self.prepared_max,
        ) = self._baseline

    def forget_prepared(self) -> None:
        """Empty psycopg's cache of prepared statements, sending nothing: the caller
        sends ``DEALLOCATE ALL``."""
        prepared = self._prepared
        prepared.clear()
        prepared._to_flush.clear()


def _notice(target: list[Any], result: Any) -> None:
    # psycopg's own handler, given the weak reference it would hold to the connection.
    psycopg.Connection._notice_handler(target[0], result)


def _notify(target: list[Any], notification: Any) -> None:
    psycopg.Connection._notify_handler(target[0], notification)


class ClosedAfterItsLoan(TrackedConnection):
    """A connection object whose loan has ended: what whoever kept it past the release
    holds.  Closed, as the stock engine's connection is after ``close()``: ``closed`` is
    true, ``close()`` does nothing, and everything else (``cursor()``, ``execute()``,
    a cursor class called on it, its settings) raises psycopg's
    ``OperationalError("the connection is closed")``.  The session went on in another
    object (see :func:`successor`)."""

    def __getattr__(self, name: str) -> Any:
        # Only for what the object no longer has: everything but pgconn and _closed.
        if name.startswith("__"):
            raise AttributeError(name)
        raise psycopg.OperationalError("the connection is closed")


@functools.cache
def _finished_pgconn() -> Any:
    """A libpq connection already finished, as a closed psycopg connection holds one."""
    pgconn = pq.PGconn.connect_start(b"host=/nonexistent/herokupool port=1 connect_timeout=1")
    pgconn.finish()
    return pgconn


def successor(conn: Any) -> Any:
    """The object that takes over ``conn``'s session for the pool's next loan; ``conn``
    itself is closed from now on to whoever still holds it (:class:`ClosedAfterItsLoan`).

    Called by the pool once the release has found the session clean.  No I/O, no lock:
    the new object gets the old one's attributes as they are (the same dict: the socket,
    adapters, psycopg's prepared statements, the baseline), the notices and notifications
    go to it, and the old object is left a finished libpq connection.  The hand-over is
    assignments only, no call, so an interruption (a signal handler's exception) lands
    before it, leaving the session with the old object, or after it.  Connections that
    are not :class:`TrackedConnection` are returned as they are.
    """
    if not isinstance(conn, TrackedConnection):
        return conn
    cls = conn.__class__
    fresh = cls.__new__(cls)
    target = weakref.ref(fresh)
    finished = _finished_pgconn()
    # From here no call, so no signal handler's exception can land in the middle.
    state = conn.__dict__
    fresh.__dict__ = state
    state["_herokupool_target"][0] = target
    conn.__dict__ = {"pgconn": finished, "_closed": True}
    conn.__class__ = ClosedAfterItsLoan
    return fresh


def prepare_release(conn: Any, reset_forgets: bool = False) -> str | None:
    """The pool's release hook: restore what the loan changed on the client side of
    ``conn`` and return the SQL that undoes what it changed in the session, or None.
    ``reset_forgets``: the pool's ``RESET`` makes the server forget prepared statements
    (``DISCARD ALL``): psycopg's cache is emptied on every release.

    No I/O and no lock.  Raises :class:`~herokupool.session.SessionNotReusable` when the
    session cannot be made new again (a ``LOAD``; a ``with conn.transaction()`` block, a
    pipeline or a two-phase transaction still open; the connection's lock still held, by a
    suspended ``notifies()`` generator; the isolation level, read-only or deferrable changed
    on the connection): the pool then closes it.  Connections that
    are not :class:`TrackedConnection` are left alone.
    """
    if not isinstance(conn, TrackedConnection):
        return None
    if conn._loan_open:
        raise SessionNotReusable("the loan's cursors were not all ended")
    if conn.lock.locked():
        # Held by what the borrower left suspended (a notifies() generator): nothing could
        # use the session, the pool's undo included, until that lets go.
        raise SessionNotReusable("the connection's lock is still held")
    flags = conn.herokupool_flags
    forgot = conn.herokupool_forgot or reset_forgets
    if not flags and not forgot and not conn.client_state_changed():
        return None  # the common loan: nothing to undo
    conn.herokupool_flags = 0
    if flags & session.LOAD:
        raise SessionNotReusable("a library was loaded into the session (LOAD)")
    if conn._num_transactions or conn._pipeline is not None or conn._tpc is not None:
        # Its Transaction or Pipeline object may still act on the connection when it
        # exits: only a closed connection makes that harmless.
        raise SessionNotReusable("a transaction block or a pipeline was left open")
    if conn.client_state_changed():
        if (conn.isolation_level, conn.read_only, conn.deferrable) != conn._characteristics:
            raise SessionNotReusable("the connection's session characteristics were changed")
        conn.restore_client_state()
    if flags & session.ROLE:
        conn.assumed_role = None
    prepared = conn.herokupool_prepared
    conn.herokupool_prepared = set()
    if forgot:
        conn.herokupool_forgot = False
        conn.forget_prepared()
        undo = session.undo(flags & ~session.PREPARE, ())
        return "DEALLOCATE ALL" if undo is None else f"{undo}; DEALLOCATE ALL"
    return session.undo(flags, prepared)


def unchanged(conn: Any) -> bool:
    """The release's fast path, for a pool without ``RESET``: True only when ``conn`` is
    open, idle outside any transaction block, pipeline or two-phase transaction, in
    autocommit, its lock free, and the loan left nothing behind that
    :func:`prepare_release` would restore or undo (no session change recorded, no
    statement forgotten, no handler, no unread notification, adapters, factories,
    prepared-statement settings and session characteristics as the loan began).  The pool
    then sends nothing and calls nothing else: the same answer as the driver's checks and
    the hook together, read directly from the connection's attributes.  No I/O and no
    lock."""
    # A condition, not a returned boolean expression: CPython compiles it to one jump per
    # test, half the bytecodes of `and` kept as a value (this runs on every release).
    if (  # noqa: SIM103
        not isinstance(conn, TrackedConnection)
        or conn.pgconn.transaction_status != _IDLE  # UNKNOWN once closed
        or not conn._autocommit
        or conn._loan_open
        or conn.herokupool_flags
        or conn.herokupool_forgot
        or conn._num_transactions
        or conn._pipeline is not None
        or conn._tpc is not None
        or conn.lock.locked()
        or conn.client_state_changed()
    ):
        return False
    return True


def release_hook(reset: str | None) -> Callable[[Any], str | None]:
    """:func:`prepare_release` for a pool whose ``RESET`` is ``reset``."""
    if reset and session.forgets_prepared(reset)[0]:
        return lambda conn: prepare_release(conn, reset_forgets=True)
    return prepare_release


def apply_isolation_level(conn: Any, isolation_level: Any) -> None:
    """Give a borrowed connection the isolation level its borrower's settings ask for
    (None: the server's default), on the client side only, as Django sets it: psycopg
    sends it with each ``BEGIN``.  Sends nothing."""
    if conn.isolation_level != isolation_level:
        conn.isolation_level = isolation_level


# --------------------------------------------------------------------- cursors


class _Tracking:
    """Mixed into the cursor class a borrower asked for: records session changes."""

    __slots__ = ()

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        _record(self, query)
        return super().execute(query, params, **kwargs)  # type: ignore[misc]

    def executemany(self, query: Any, params_seq: Any, **kwargs: Any) -> Any:
        _record(self, query)
        return super().executemany(query, params_seq, **kwargs)  # type: ignore[misc]

    def stream(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        _record(self, query)
        return super().stream(query, params, **kwargs)  # type: ignore[misc]

    def copy(self, statement: Any, params: Any = None, **kwargs: Any) -> Any:
        # COPY (SELECT set_config(...)) TO STDOUT runs a query too.
        _record(self, statement)
        return super().copy(statement, params, **kwargs)  # type: ignore[misc]

    def close(self) -> None:
        if self._conn is _RELEASED:  # type: ignore[attr-defined]
            return  # ended with its loan (a server-side cursor's close would need the lock)
        super().close()  # type: ignore[misc]


class _Named(_Tracking):
    """Mixed into server-side cursors: psycopg writes their ``DECLARE`` itself, so a
    ``WITH HOLD`` one (Django's in autocommit) is recorded here, for the release's
    ``CLOSE ALL``."""

    __slots__ = ()

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        if self._withhold:  # type: ignore[attr-defined]
            self._conn.note(session.CURSOR, "")  # type: ignore[attr-defined]
        return super().execute(query, params, **kwargs)


def _record(cursor: Any, query: Any) -> None:
    if type(query) is str:
        # The ORM sends the same texts over and over: their flags, read once.
        flags = _flags_of.get(query)
        if flags is None:
            flags = session.changes_and_forgets(query)
            if len(query) <= _FLAGS_LONGEST:
                if len(_flags_of) >= _FLAGS_KEPT:
                    _flags_of.clear()
                _flags_of[query] = flags
        if flags:
            cursor._conn.note(flags, query)
        return
    if isinstance(query, str):  # str subclasses too: Django's SafeString
        text = query
    elif isinstance(query, bytes):
        text = query.decode("utf-8", "replace")
    elif isinstance(query, psycopg_sql.Composable):
        try:
            text = query.as_string(cursor._conn)
        except (psycopg.Error, TypeError, ValueError, AttributeError):
            return  # psycopg will refuse it itself
    else:
        return
    flags = session.changes_and_forgets(text)
    if flags:
        cursor._conn.note(flags, text)


# Statement text -> its session.changes_and_forgets() flags, for plain str statements of up
# to _FLAGS_LONGEST characters (a long one is read each time: reading it costs little beside
# sending it); emptied when it holds _FLAGS_KEPT texts (an application's distinct statements
# are far fewer; one that builds texts without end reads each, as without this).  At most a
# few megabytes.
_flags_of: dict[str, int] = {}
_FLAGS_KEPT = 1024
_FLAGS_LONGEST = 4096


class _ReleasedConnection:
    """What a cursor's connection is once its loan has ended: closed, as the stock
    engine's connection is after the request."""

    closed = True

    def __getattr__(self, name: str) -> Any:
        raise psycopg.OperationalError("the connection is closed")


_RELEASED: Any = _ReleasedConnection()

# cursor class -> its tracking subclass (itself for a tracking one).  Classes are few
# (Django's cursors, psycopg's): a dict read per cursor (TrackedConnection.cursor() reads it
# inline, the hot path, and calls _tracking_class() on a miss).
_classes: dict[type, type] = {}


def _tracking_class(factory: type) -> type:
    cls = _classes.get(factory)
    if cls is not None:
        return cls
    if issubclass(factory, _Tracking):
        cls = factory
    else:
        mixin = _Named if issubclass(factory, psycopg.ServerCursor) else _Tracking
        cls = type(f"Tracked{factory.__name__}", (mixin, factory), {"__slots__": ()})
        _classes[cls] = cls
    _classes[factory] = cls
    return cls
