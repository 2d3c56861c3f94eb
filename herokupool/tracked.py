"""psycopg2 connections that know what a loan did to them, and cursors that end with it.

The backend opens every pooled connection as a :class:`TrackedConnection`
(``psycopg2.connect(connection_factory=...)``).  Every cursor made on it, by Django or by
a library using the raw connection (``connection.connection.cursor()``), and with any
``cursor_factory``, is a subclass of the requested class that

- passes each statement through :func:`herokupool.session.changes` and records the
  session state it changes on the connection (a few hundred nanoseconds a statement);
- belongs to the current loan: :meth:`TrackedConnection.end_loan` ends every cursor of
  the loan before the connection can reach another borrower.  A client-side cursor is
  closed (no I/O: every later call fails in psycopg2's own C code with ``cursor already
  closed``, as on a closed connection); a server-side one is marked, and every later
  call (execute, fetch, iteration, scroll, copy) fails the same way without sending a
  byte, while the server's side of it is closed by the release's ``CLOSE ALL``.

On release the pool calls :func:`prepare_release`, which restores what the loan changed
on the client side (typecasters registered on the connection, pending notices and
notifications, the default cursor class) and gives the pool the undo of exactly what
the loan changed in the session (see ``herokupool.session``), sent in one round trip,
or nothing.

This module knows nothing about Django.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import Any

import psycopg2
from psycopg2 import extensions as ext

from herokupool import session
from herokupool.session import SessionNotReusable

__all__ = [
    "SessionNotReusable",
    "TrackedConnection",
    "apply_isolation_level",
    "connection_class",
    "prepare_release",
    "unchanged",
]

# Prune the loan's list of cursor references once it grows past this many: a loan that
# runs a million statements keeps a bounded list.
_PRUNE_AT = 256

_ROLE_UNKNOWN: Any = object()

_IDLE = ext.TRANSACTION_STATUS_IDLE


class TrackedConnection(ext.connection):
    """A psycopg2 connection that records what each loan changed (see the module
    docstring).  ``assumed_role`` is the role the backend's session set-up assumed on
    this session (Django's ``assume_role``), None for the login role."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: session.* flags of what the current loan changed.
        self.herokupool_flags = 0
        self.assumed_role: object = None
        self._cursors: list[weakref.ReferenceType[Any]] = []
        # True from begin_loan() until end_loan() has ended every cursor of the loan.
        self._loan_open = False
        # What a new loan starts from; set by mark_baseline() once the connection is
        # set up (the jsonb loader registered, autocommit on).
        self._string_types: dict[Any, Any] = {}
        self._cursor_factory: Any = None
        self._encoding: Any = None
        self._characteristics: tuple[Any, Any, Any] = (None, None, None)

    def mark_baseline(self) -> None:
        """Take the connection's client-side state now as what every loan starts from:
        the typecasters registered on it and its default cursor class.  Called once,
        when the connection has been set up."""
        self._string_types = dict(self.string_types)
        self._cursor_factory = self.cursor_factory
        self._encoding = self.encoding

    def begin_loan(self, isolation_level: Any = None) -> None:
        """Start a loan whose borrower's settings ask for ``isolation_level`` (None: the
        server's default; see :func:`apply_isolation_level`): forget what the pool itself
        ran between loans (validation, the last release's undo, ``RESET``), and note the
        session characteristics the borrower's set-up gave it, which the release keeps."""
        if self.isolation_level != isolation_level:
            apply_isolation_level(self, isolation_level)
        self.herokupool_flags = 0
        self._characteristics = (self.isolation_level, self.readonly, self.deferrable)
        self._loan_open = True

    def note(self, flags: int) -> None:
        """Record session changes (``session.*`` flags) made by the current loan."""
        if flags & session.ROLE_RESET:
            self.assumed_role = None
            flags &= ~session.ROLE_RESET
        elif flags & session.ROLE:
            self.assumed_role = _ROLE_UNKNOWN
        self.herokupool_flags |= flags

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        # The same signature as psycopg2's: cursor(name=None, cursor_factory=None,
        # withhold=False, scrollable=None).
        named = bool(args[0] if args else kwargs.get("name"))
        default: Any = self.cursor_factory  # None unless set (psycopg2 stubs say otherwise)
        factory: Any = kwargs.get("cursor_factory") or default or ext.cursor
        kwargs["cursor_factory"] = _tracking_class(factory, named)
        cursor = super().cursor(*args, **kwargs)
        cursors = self._cursors
        cursors.append(weakref.ref(cursor))
        if len(cursors) > _PRUNE_AT:
            self._cursors = [ref for ref in cursors if ref() is not None]
        return cursor

    def end_loan(self) -> None:
        """End every cursor of the current loan (see the module docstring).

        No I/O and no lock: safe in a garbage-collector finalizer or a dying thread.
        """
        cursors, self._cursors = self._cursors, []
        for ref in cursors:
            cursor: Any = ref()
            if cursor is None:
                continue
            cursor.herokupool_released = True  # its .connection is a closed one from now on
            if not isinstance(cursor, _Named):
                cursor.close()
        # Last: an end_loan() interrupted above leaves the loan open, and the release
        # then closes the connection (see prepare_release).
        self._loan_open = False

    def client_state_changed(self) -> bool:
        """Whether the loan left client-side state behind (see :func:`prepare_release`)."""
        characteristics = self._characteristics
        if (  # noqa: SIM103  # a condition, as in unchanged(): one jump per test
            self.notices
            or self.notifies
            or self.cursor_factory is not self._cursor_factory
            or self.isolation_level != characteristics[0]
            or self.readonly != characteristics[1]
            or self.deferrable != characteristics[2]
            or self.string_types != self._string_types
            or self.encoding != self._encoding
        ):
            return True
        return False


def connection_class(factory: type | None) -> type:
    """The connection class to open: :class:`TrackedConnection`, or a subclass of it and
    of ``factory`` when the settings ask for their own (``OPTIONS["connection_factory"]``)."""
    if factory is None or issubclass(factory, TrackedConnection):
        return TrackedConnection
    cls = _classes.get((factory, False))
    if cls is None:
        cls = _classes[(factory, False)] = type(
            f"Tracked{factory.__name__}", (TrackedConnection, factory), {}
        )
    return cls


def prepare_release(conn: Any) -> str | None:
    """The pool's release hook: restore what the loan changed on the client side of
    ``conn`` and return the SQL that undoes what it changed in the session (see
    ``herokupool.session``), or None when it changed nothing there.  The pool runs that
    SQL after rolling back, under its deadline, in one round trip.

    No I/O and no lock.  Raises :class:`SessionNotReusable` when the session cannot be
    made new again (a ``LOAD``; psycopg2's session characteristics changed on the
    connection itself, which psycopg2 may have sent to the server): the pool then
    closes it.  Connections that are not :class:`TrackedConnection` are left alone.
    """
    if not isinstance(conn, TrackedConnection):
        return None
    if conn._loan_open:
        # end_loan() did not finish (interrupted): a cursor of the loan may still work.
        raise SessionNotReusable("the loan's cursors were not all ended")
    flags = conn.herokupool_flags
    if not flags and not conn.client_state_changed():
        return None  # the common loan: nothing to undo
    conn.herokupool_flags = 0
    if flags & session.LOAD:
        raise SessionNotReusable("a library was loaded into the session (LOAD)")
    if conn.client_state_changed():
        if (conn.isolation_level, conn.readonly, conn.deferrable) != conn._characteristics:
            raise SessionNotReusable("the connection's session characteristics were changed")
        if conn.encoding != conn._encoding:
            # set_client_encoding() sent a SET of its own, through no cursor; RESET ALL
            # would put the server back but not psycopg2's idea of the encoding.
            raise SessionNotReusable("the connection's client encoding was changed")
        del conn.notices[:]
        del conn.notifies[:]
        if conn.string_types != conn._string_types:
            conn.string_types.clear()
            conn.string_types.update(conn._string_types)
        conn.cursor_factory = conn._cursor_factory
    if flags & session.ROLE:
        conn.assumed_role = None
    return session.undo(flags)


def unchanged(conn: Any) -> bool:
    """The release's fast path, for a pool without ``RESET``: True only when ``conn`` is
    open, idle, in autocommit, and the loan left nothing behind that
    :func:`prepare_release` would restore or undo (no session change recorded, no unread
    notice or notification, cursor class, typecasters, encoding and session
    characteristics as the loan began).  The pool then sends nothing and calls nothing
    else: the same answer as the driver's checks and the hook together.  No I/O and no
    lock."""
    # A condition, not a returned boolean expression: one jump per test (every release).
    if (  # noqa: SIM103
        not isinstance(conn, TrackedConnection)
        or conn.closed
        or conn.get_transaction_status() != _IDLE  # raises once closed: checked first
        or not conn.autocommit
        or conn._loan_open
        or conn.herokupool_flags
        or conn.client_state_changed()
    ):
        return False
    return True


def apply_isolation_level(conn: Any, isolation_level: Any) -> None:
    """Give a borrowed connection the isolation level its borrower's settings ask for
    (None: the server's default), on the client side only, as Django sets it on a new
    connection: psycopg2 then sends it with each ``BEGIN``.  Sends nothing when the
    connection has it already, which is every loan after the first."""
    if conn.isolation_level == isolation_level:
        return
    autocommit = conn.autocommit
    if autocommit:
        conn.autocommit = False  # sends nothing: the characteristics are the defaults
    conn.isolation_level = isolation_level
    if autocommit:
        conn.autocommit = True


# --------------------------------------------------------------------- cursors


class _Tracking:
    """Mixed into the cursor class a borrower asked for: records session changes; once
    its loan has ended, its ``connection`` is a closed connection (as on the stock
    engine), not the session the pool may have lent to someone else."""

    herokupool_released = False

    @property
    def connection(self) -> Any:
        if self.herokupool_released:
            return _RELEASED
        return super().connection  # type: ignore[misc]

    def execute(self, query: Any, vars: Any = None) -> Any:
        flags = _changes(self, query)
        if flags:
            self.connection.note(flags)
        return super().execute(query, vars)  # type: ignore[misc]

    def executemany(self, query: Any, vars_list: Any) -> Any:
        flags = _changes(self, query)
        if flags:
            self.connection.note(flags)
        return super().executemany(query, vars_list)  # type: ignore[misc]

    def copy_expert(self, sql: Any, file: Any, size: int = 8192) -> Any:
        # COPY (SELECT set_config(...)) TO STDOUT runs a query too.
        flags = _changes(self, sql)
        if flags:
            self.connection.note(flags)
        return super().copy_expert(sql, file, size)  # type: ignore[misc]

    def callproc(self, procname: str, parameters: Any = None) -> Any:
        name = procname.lower()
        if "advisory" in name or "set_config" in name:
            if isinstance(parameters, Mapping):  # named arguments (psycopg2 >= 2.8)
                last = parameters.get("is_local")
            else:
                last = parameters[-1] if parameters else None
            local = name.endswith("set_config") and last is True
            flags = 0 if local else session.changes(f"SELECT {name}(")
            if name.endswith("set_config") and not local:
                flags |= session.GUC
            if flags:
                self.connection.note(flags)
        return super().callproc(procname, parameters)  # type: ignore[misc]


def _changes(cursor: Any, query: Any) -> int:
    if isinstance(query, str):  # str subclasses too: Django's SafeString from a template
        return session.changes(query)
    if isinstance(query, bytes):
        return session.changes(query.decode("utf-8", "replace"))
    # A psycopg2.sql.Composable (or anything psycopg2 accepts): read its text.
    try:
        text = query.as_string(cursor)
    except (psycopg2.Error, TypeError, ValueError, AttributeError):
        return 0  # psycopg2 will refuse it itself (a signal's exception propagates)
    return session.changes(text)


def _closed_error() -> psycopg2.InterfaceError:
    return psycopg2.InterfaceError("cursor already closed")


class _Named(_Tracking):
    """Mixed into server-side (named) cursors: inert once their loan has ended.

    Django's ``QuerySet.iterator()`` closes its cursor when the generator is finalised,
    which may be after the connection went on to another borrower; a generator resumed
    then would FETCH in that borrower's session.  Once released, every call fails as on
    a closed connection and sends nothing; ``close()`` does nothing (the release's
    ``CLOSE ALL`` closed it on the server).
    """

    @property
    def closed(self) -> bool:
        return self.herokupool_released or super().closed  # type: ignore[misc]

    def close(self) -> None:
        if not self.herokupool_released:
            super().close()  # type: ignore[misc]

    def execute(self, query: Any, vars: Any = None) -> Any:
        if self.herokupool_released:
            raise _closed_error()
        if self.withhold:  # type: ignore[attr-defined]
            self.connection.note(session.CURSOR)
        return super().execute(query, vars)

    def __iter__(self) -> Any:
        if self.herokupool_released:
            raise _closed_error()
        # psycopg2.extras' cursors build their rows in their own __iter__ (which reads
        # through __next__ below); psycopg2's returns the cursor itself.
        return super().__iter__()  # type: ignore[misc]

    def __next__(self) -> Any:
        if self.herokupool_released:
            raise _closed_error()
        return super().__next__()  # type: ignore[misc]


class _ReleasedConnection:
    """What a cursor's ``connection`` is once its loan has ended: closed, as the stock
    engine's connection is after the request."""

    closed = 1

    def close(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        raise psycopg2.InterfaceError("connection already closed")


_RELEASED: Any = _ReleasedConnection()


def _guard(name: str) -> Callable[..., Any]:
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.herokupool_released:
            raise _closed_error()
        return getattr(super(_Named, self), name)(*args, **kwargs)

    method.__name__ = name
    return method


for _name in (
    "executemany",
    "callproc",
    "fetchone",
    "fetchmany",
    "fetchall",
    "scroll",
    "copy_from",
    "copy_to",
    "copy_expert",
    "mogrify",
    "nextset",
):
    if _name not in _Named.__dict__:
        setattr(_Named, _name, _guard(_name))
del _name

# (requested class, named) -> its tracking subclass (named False for connection
# classes).  Classes are few (Django's cursor, a library's DictCursor...): a dict read
# per cursor.
_classes: dict[tuple[type, bool], type] = {}


def _tracking_class(factory: type, named: bool) -> type:
    if issubclass(factory, _Named if named else _Tracking):
        return factory
    key = (factory, named)
    cls = _classes.get(key)
    if cls is None:
        mixin = _Named if named else _Tracking
        cls = _classes[key] = type(f"Tracked{factory.__name__}", (mixin, factory), {})
    return cls
