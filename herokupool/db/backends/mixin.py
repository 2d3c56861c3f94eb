"""Every Django hook of herokupool's backends, in one mixin.

``postgresql/base.py`` and ``postgis/base.py`` compose this mixin with Django's own
wrappers; everything else (SQL, introspection, schema editing, test databases) is
Django's.  Each process keeps one :class:`~herokupool.pool.ConnectionPool` per alias
and connection parameters, created on first use.

Django's lifecycle is unchanged: every request runs Django's own ``connect()`` and
``close()`` (so every wrapper subclass and every ``connection_created`` receiver sees
what it sees without a pool); only beneath them, ``get_new_connection()`` borrows and
``_close()`` releases.  What makes that fast is caching what really is per wrapper (the
connection parameters, the pool) and not redoing per borrow what the pooled session
already has (the isolation level, the assumed role).  What makes it faithful is the
session tracking of :mod:`herokupool.tracked` (psycopg2) or
:mod:`herokupool.tracked_psycopg` (psycopg 3): the loan's cursors end with it, and the
release undoes exactly the session state the loan changed.

What differs between the drivers (opening a connection as Django's ``get_new_connection()``
does on it, the tracked connection class, what a closed connection raises, reading a
reported parameter, libpq's version, the release hook) is in one module per driver,
``_psycopg2`` and ``_psycopg``, with the same names; this mixin imports the one Django's
own backend chose (psycopg 3 when importable) as ``driver``.

A borrowed connection is recorded in a :class:`_Loan` held by the wrapper.  Two things
watch it, so that a connection whose borrower is gone comes back without anyone calling
``close()``: the borrowing thread's end (deterministic, see :func:`_thread_loans`) and,
as a fallback, the wrapper's garbage collection.  Both hand the connection to
``pool.release_later()``, which takes no lock and does no I/O: they run inside a dying
thread or a garbage collection, possibly while that thread holds the pool's lock.
"""

from __future__ import annotations

import copy
import math
import threading
import weakref
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db.backends.base.base import NO_DB_ALIAS
from django.db.backends.postgresql.psycopg_any import IsolationLevel, is_psycopg3

from herokupool import _fork, registry
from herokupool._redact import SECRET_KEYS
from herokupool.config import MISSING_ENV_KEY, missing_env_error, with_ssl_hint
from herokupool.options import POOL_SETTINGS, OptionError, parse_options, split_options
from herokupool.pool import ConnectionPool

# What differs between the drivers, in one module each (the same names): psycopg 3 when
# Django's backend chose it (it is importable), else psycopg2.
if is_psycopg3:  # pragma: no cover - depends on what is installed
    from herokupool.db.backends import _psycopg as driver
else:  # pragma: no cover - depends on what is installed
    from herokupool.db.backends import _psycopg2 as driver  # type: ignore[no-redef]

if TYPE_CHECKING:
    from django.db.backends.postgresql.base import DatabaseWrapper as _Base
else:
    _Base = object

__all__ = ["PooledDatabaseWrapperMixin"]

#: libpq TCP settings the backend adds unless OPTIONS (or the URL) set them.  A borrower
#: waiting on a query whose network path died silently (a NAT or proxy that dropped the
#: flow, a failed-over host: no FIN, no RST) would otherwise wait for the kernel's
#: defaults: about two hours of idle before the first keepalive, ~15 minutes of
#: retransmissions for unacknowledged data.  With these, such a connection fails within
#: about a minute (30 s idle + 3 probes 10 s apart; or 60 s of unacknowledged data), which
#: frees its pool slot.  A live server answers keepalives from its kernel, so a long query
#: is never cut.  libpq ignores them on Unix-domain sockets.
KEEPALIVE_DEFAULTS: dict[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 60_000,  # milliseconds
}


class PooledDatabaseWrapperMixin(_Base):
    """Borrow connections from this process's pool instead of opening them."""

    _herokupool_unusable = False  # set while close() drops a connection a health check failed
    # (settings_dict and OPTIONS as they were, USE_TZ and the time zone, the parameters
    # made from them): Django asks for the parameters on every connect().
    _herokupool_params: (
        tuple[dict[str, Any], dict[str, Any], tuple[bool, Any], dict[str, Any]] | None
    ) = None
    _herokupool_last: tuple[dict[str, Any], dict[str, Any], ConnectionPool] | None = None
    # This wrapper's loan record, made at its first borrow and watched for the wrapper's
    # whole life by one finalizer (see _guard_against_orphans).
    _herokupool_loan: _Loan | None = None

    @property
    def _herokupool_pool(self) -> ConnectionPool | None:
        """The pool ``self.connection`` was borrowed from, while it is borrowed."""
        loan = self._herokupool_loan
        if loan is None:
            return None
        held = loan.held
        return held[0][0] if held else None

    @property
    def _pooled(self) -> bool:
        # Django's connections to the maintenance database (CREATE/DROP DATABASE for
        # tests) must not linger in a pool: they would block DROP DATABASE.
        return self.alias != NO_DB_ALIAS

    def get_connection_params(self) -> dict[str, Any]:
        settings_dict = self.settings_dict
        cached = self._herokupool_params
        # Django rebuilds the parameters from the settings on every connect(); they
        # change only when the settings do (a test database's NAME, a settings override;
        # on psycopg 3 the adapters context follows USE_TZ and the time zone).  A copy
        # each time: a subclass may add to what it gets.
        zone = (settings.USE_TZ, self.timezone)
        if (
            cached is not None
            and cached[2] == zone
            and cached[0] == settings_dict
            and cached[1] == settings_dict["OPTIONS"]
        ):
            return dict(cached[3])
        if MISSING_ENV_KEY in settings_dict:
            error = missing_env_error(settings_dict)
            if error is not None:
                raise error
        # The pool settings first: Django's own refusal of OPTIONS["pool"] on psycopg2
        # ("requires psycopg >= 3") would point at the wrong fix.
        self._herokupool_pool_kwargs()
        params = super().get_connection_params()  # has every OPTIONS key, ours included
        for name in POOL_SETTINGS.intersection(params):
            del params[name]
        self._herokupool_params = (
            dict(settings_dict),
            copy.deepcopy(settings_dict["OPTIONS"]),
            zone,
            dict(params),
        )
        return params

    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        if not self._pooled:
            return super().get_new_connection(conn_params)
        # As Django's get_new_connection(): the isolation level from OPTIONS, or the
        # server's default.  Checked before borrowing, so a bad value never holds a
        # connection.
        level = self.settings_dict["OPTIONS"].get("isolation_level")
        if level is None:
            isolation_level = IsolationLevel.READ_COMMITTED
        else:
            try:
                isolation_level = IsolationLevel(level)
            except ValueError:
                raise ImproperlyConfigured(
                    f"Invalid transaction isolation level {level} specified. "
                    "Use one of the psycopg.IsolationLevel values."
                ) from None
        self.isolation_level = isolation_level
        conn = self._herokupool_lend(self._pool_for(conn_params))
        # The isolation level as Django sets it on a new connection: on the client side,
        # sent with each BEGIN (not as the session's default_transaction_isolation, which
        # behind PgBouncer in transaction mode would stay on the server connection and
        # reach other clients).  A pooled session keeps it between loans, so this sends
        # nothing.
        conn.begin_loan(None if level is None else isolation_level)
        return conn

    def _herokupool_lend(self, pool: ConnectionPool) -> Any:
        """Borrow from ``pool`` for this wrapper and record the loan."""
        loan = self._herokupool_loan
        if loan is None:
            loan = self._herokupool_loan = _guard_against_orphans(self)
        if loan.loans is None and not self._thread_sharing_count:  # type: ignore[attr-defined]
            # Watched by this thread's end from now on (a wrapper belongs to one thread, so
            # once per wrapper, not per borrow).  A wrapper shared between threads
            # (LiveServerTestCase, inc_thread_sharing) is not: one of its threads ending
            # says nothing about the others still using it.
            loans = _thread_loans()
            loans[id(loan)] = loan
            loan.loans = loans
        if loan.held:
            # Django borrows only when the wrapper holds no connection: one still recorded
            # was left by a close() interrupted before it gave it back.  Give it back now
            # rather than hold two.
            _give_back_orphans(loan)
        # Recorded in the same expression that borrows, everything else prepared before:
        # an asynchronous exception (a signal handler's) has no room to land between the
        # pool lending the connection and the loan knowing it.
        loan.held.append((pool, pool.borrow()))
        return loan.held[-1][1]

    @property
    def pool(self) -> None:
        """Django's own psycopg 3 pool: never, with herokupool's engine (one pool per
        alias; ``OPTIONS["pool"]`` is refused by the settings checks)."""
        return None

    def create_cursor(self, name: str | None = None) -> Any:
        cursor = super().create_cursor(name)
        if name and isinstance(self.connection, driver.TrackedConnection):
            # Django builds psycopg 3's server-side cursors by calling their class, not
            # through the connection: make it one of the loan's.
            cursor = driver.adopt(self.connection, cursor)
        return cursor

    def _set_autocommit(self, autocommit: bool) -> None:
        # Django sets autocommit on every connect(); a pooled connection is lent in
        # autocommit already, and the driver would send nothing for it: skip the call.
        connection = self.connection
        if connection is not None and connection.autocommit == autocommit:
            return
        super()._set_autocommit(autocommit)  # type: ignore[misc]

    def _configure_connection(self, connection: Any) -> bool:
        # Django's session set-up (time zone, assume_role) runs on every borrow, as on
        # every new connection; what it sends is the session's baseline, not a change
        # of the loan's for the release to undo.
        if not isinstance(connection, driver.TrackedConnection):
            return bool(super()._configure_connection(connection))  # type: ignore[misc]
        flags = connection.herokupool_flags
        try:
            return bool(super()._configure_connection(connection))  # type: ignore[misc]
        finally:
            connection.herokupool_flags = flags

    def _configure_timezone(self, connection: Any) -> bool:
        # Django's own check, reading the TimeZone the server reports without
        # conn.info.parameter_status(), which allocates a ConnectionInfo on every connect().
        if not isinstance(connection, driver.TrackedConnection):
            return bool(super()._configure_timezone(connection))  # type: ignore[misc]
        name = self.timezone_name
        if name and driver.parameter_status(connection, "TimeZone") != name:
            with connection.cursor() as cursor:
                cursor.execute(self.ops.set_time_zone_sql(), [name])
            return True
        return False

    def _configure_role(self, connection: Any) -> bool:
        # Django sends SET ROLE on every new connection; a pooled session that has the
        # role already (assumed by an earlier loan's set-up, and not changed since) is
        # left as it is, and one that has another is given this one.
        if not isinstance(connection, driver.TrackedConnection):
            return bool(super()._configure_role(connection))  # type: ignore[misc]
        role = self.settings_dict["OPTIONS"].get("assume_role") or None
        if connection.assumed_role == role:
            return False
        if role is None:
            with connection.cursor() as cursor:
                cursor.execute("RESET ROLE")
            committed = True
        else:
            committed = bool(super()._configure_role(connection))  # type: ignore[misc]
        connection.assumed_role = role
        return committed

    def _pool_for(self, conn_params: dict[str, Any]) -> ConnectionPool:
        # Django rebuilds conn_params on every connect(). While they and OPTIONS are
        # unchanged, reuse this wrapper's last pool: two dict comparisons instead of
        # building a sorted registry key on every borrow.
        options = self.settings_dict["OPTIONS"]
        last = self._herokupool_last
        if (
            last is not None
            and not last[2].closed
            and last[0] == conn_params
            and last[1] == options
        ):
            return last[2]
        key = _pool_key(conn_params, options, (settings.USE_TZ, self.timezone))
        pool = registry.get(self.alias, key, lambda: self._new_pool(conn_params))
        self._herokupool_last = (dict(conn_params), dict(options), pool)
        return pool

    def _herokupool_pool_kwargs(self) -> dict[str, Any]:
        """The pool's keyword arguments from OPTIONS; raises ``ImproperlyConfigured``
        naming the alias and the key for a bad value."""
        settings, _ = split_options(self.settings_dict["OPTIONS"])
        try:
            return parse_options(settings)
        except OptionError as error:
            raise ImproperlyConfigured(
                f"DATABASES[{self.alias!r}]['OPTIONS']['{error.name}'] ({error.value!r}) "
                f"{error.rule}"
            ) from None

    def _new_pool(self, conn_params: dict[str, Any]) -> ConnectionPool:
        kwargs = self._herokupool_pool_kwargs()
        params = dict(conn_params)
        # Bound the time a borrower can spend connecting to an unreachable server.
        params.setdefault("connect_timeout", max(2, math.ceil(kwargs["timeout"])))
        # And the time a dead network path can hold a slot (see KEEPALIVE_DEFAULTS); the
        # user's own values, from OPTIONS or the URL, are already in params and win.
        for key, value in KEEPALIVE_DEFAULTS.items():
            if key == "tcp_user_timeout" and driver.libpq_version() < 120000:
                continue  # libpq < 12 refuses the keyword: every connect would fail
            params.setdefault(key, value)
        # with_ssl_hint: a server without SSL says herokupool required it because of DYNO.
        connect = with_ssl_hint(lambda: driver.connect(params), self.settings_dict)
        return ConnectionPool(
            connect,
            name=self.alias,
            prepare_release=driver.release_hook(kwargs.get("reset")),
            unchanged=driver.unchanged,
            successor=driver.successor,
            describe_holder=_executor_hint,
            **kwargs,
        )

    def _close(self) -> None:
        loan = self._herokupool_loan
        if loan is None or not loan.held:
            super()._close()  # type: ignore[misc]
            return
        # Forget before giving back: an exception landing anywhere below (a signal
        # handler's) must never leave the wrapper holding a connection another thread may
        # have next.  Inside an atomic block Django keeps self.connection after close()
        # until the block ends: a stand-in that fails as a closed connection of the driver
        # does, so the next query raises what it raises with Django's own backend
        # (psycopg2: InterfaceError("connection already closed")), not ProgrammingError
        # from a reconnect attempt.  If the
        # exception lands before the pop, the loan still holds the connection and the
        # thread's end, the wrapper's collection or its next borrow gives it back.
        self.connection = _CLOSED if self.in_atomic_block else None
        taken = None
        try:
            # Atomic: the thread's end or the wrapper's collection may race for it.
            taken = loan.held.pop()
            # The loan's cursors end before the connection can reach anyone else.
            _end_loan(taken[1])
        except IndexError:
            return  # taken back meanwhile
        except BaseException:
            # Interrupted (a signal handler's exception; Python delivers it as a call
            # returns, so ``taken`` is set once the pop returned): the connection goes back
            # into the loan, whose next borrow, close() or thread end gives it back (a
            # release that closes it if its cursors did not all end).  An append, not a
            # call into the pool: a C call cannot be interrupted before it has acted.
            if taken is not None:
                loan.held.append(taken)
            raise
        pool, conn = taken
        with self.wrap_database_errors:
            if self._herokupool_unusable:
                pool.discard(conn)
            else:
                pool.release(conn)

    def close(self) -> None:
        try:
            super().close()
        finally:
            loan = self._herokupool_loan
            if loan is not None and loan.held and self.connection is None:
                # Django's close() returns at once when the wrapper holds no connection;
                # one its loan still records was left by an interrupted close() or
                # connect(): give it back now, not at the next borrow or the thread's end.
                _give_back_orphans(loan)

    def close_pool(self) -> None:
        """Close every pool of this alias in this process.

        Django calls this before creating, cloning and dropping test databases and when
        the time zone settings change; connections borrowed at that moment are closed
        when released.
        """
        registry.close(self.alias)

    def close_if_health_check_failed(self) -> None:
        # Django checks only a connection kept from an earlier request (CONN_MAX_AGE > 0
        # and CONN_HEALTH_CHECKS): one borrowed this request is marked healthy by
        # connect().  The pool has not seen a kept connection since lending it, so the
        # check must run; a connection that fails it is discarded, never pooled again.
        if (
            self.health_check_done  # type: ignore[has-type]
            or not self.health_check_enabled  # type: ignore[attr-defined]  # not in the stubs
            or self.connection is None
        ):
            return  # what Django's own method returns on too, checked first: every connect()
        if self._herokupool_pool is None:
            super().close_if_health_check_failed()
            return
        if not self.is_usable():
            self._herokupool_unusable = True
            try:
                self.close()
            finally:
                self._herokupool_unusable = False
        self.health_check_done = True


# Thread names of executors whose threads never end, so never give back a connection they
# did not close: concurrent.futures' default and asyncio's default executor (which asgiref's
# sync_to_async(thread_sensitive=False) uses).
_EXECUTOR_THREAD_PREFIXES = ("ThreadPoolExecutor", "asyncio_")


def _executor_hint(ident: int) -> str | None:
    """The pool's timeout message hint for a connection held by an executor's thread."""
    name = next((t.name for t in threading.enumerate() if t.ident == ident), None)
    if name is None or not name.startswith(_EXECUTOR_THREAD_PREFIXES):
        return None
    return (
        "an executor's threads never end, so a connection they do not close stays borrowed: "
        "call close_old_connections() in them, e.g. around sync_to_async(thread_sensitive=False) "
        "work"
    )


class _Loan:
    """One wrapper's record of its borrowed connection, reused for each borrow.

    ``held`` is ``[(pool, conn)]`` while a connection is borrowed, else empty.  It is a
    list so that whoever gives the connection back (``close()``, the thread's end, the
    wrapper's collection: possibly in different threads at once) takes it with one
    ``list.pop()``, which is atomic: exactly one of them returns it.
    """

    __slots__ = ("held", "loans", "wrapper")

    def __init__(self, wrapper: PooledDatabaseWrapperMixin) -> None:
        self.held: list[tuple[ConnectionPool, Any]] = []
        # The borrowing thread's loans (see _thread_loans), while registered there.
        self.loans: dict[int, _Loan] | None = None
        # Weak: the finalizer watching the wrapper keeps this record alive.
        self.wrapper = weakref.ref(wrapper)


def _take(loan: _Loan) -> tuple[ConnectionPool, Any] | None:
    """Take the borrowed connection out of ``loan``, if it still holds one."""
    try:
        return loan.held.pop()
    except IndexError:
        return None


class _ThreadEnd:
    """Lives in one thread's ``threading.local()`` only, so it dies when the thread's
    locals are cleared as the thread ends (under gevent's patching: as the greenlet ends),
    without waiting for a garbage collection."""

    __slots__ = ("__weakref__",)


_thread = threading.local()


def _thread_loans() -> dict[int, _Loan]:
    """This thread's loans, ``{id(loan): loan}``; given back when the thread ends."""
    try:
        loans: dict[int, _Loan] = _thread.loans
    except AttributeError:
        loans = _thread.loans = {}
        end = _thread.end = _ThreadEnd()
        finalizer = weakref.finalize(end, _thread_ended, loans)
        finalizer.atexit = False  # at interpreter exit there is nobody left to serve
    return loans


def _thread_ended(loans: dict[int, _Loan]) -> None:
    # Runs in the ending thread, during its clean-up: no lock, no logging (logging would
    # create a _DummyThread for a thread threading has already forgotten), no I/O.
    for loan in list(loans.values()):
        _reclaim(loan)
    loans.clear()


def _guard_against_orphans(wrapper: PooledDatabaseWrapperMixin) -> _Loan:
    """Return the loan record of ``wrapper``, whose connection goes back to its pool if
    ``wrapper`` is garbage-collected while holding one.

    The fallback to the thread's end: it covers a wrapper dropped by a thread that lives
    on, and one borrowed while shared between threads.  One finalizer per wrapper, not per
    borrow: borrowing only fills the record.
    """
    loan = _Loan(wrapper)
    guard = weakref.finalize(wrapper, _reclaim, loan)
    guard.atexit = False  # at interpreter exit there is nobody left to serve
    return loan


def _reclaim(loan: _Loan) -> None:
    """Give back the connection of a borrower that is gone (its thread ended, or its
    wrapper was collected).

    Runs in a dying thread or inside a garbage collection, possibly in a thread that
    holds the pool's lock: it must not block, take a lock, log or do I/O, so the
    connection goes to ``release_later()``.
    """
    # The wrapper or its thread is gone: either way no thread watches this loan any more.
    loans = loan.loans
    if loans is not None:
        loan.loans = None
        loans.pop(id(loan), None)  # dict.pop: atomic, no lock
    wrapper = loan.wrapper()
    # The count, not allow_thread_sharing: that property takes a lock.
    if wrapper is not None and wrapper._thread_sharing_count:  # type: ignore[attr-defined]
        return  # shared between threads: another one may be using it right now
    taken = _take(loan)
    if taken is None:
        return
    pool, conn = taken
    if wrapper is not None:
        # The wrapper must never use (or close) a connection the pool may lend again.
        wrapper.connection = None
    try:
        # Its cursors end now (a thread that ended mid-iteration left one open).
        _end_loan(conn)
    finally:
        # Even if interrupted: the slot must come back (a loan whose cursors did not all
        # end is closed by the release, see tracked.prepare_release).
        pool.release_later(conn)  # the pool's thread releases it, with a warning


def _give_back_orphans(loan: _Loan) -> None:
    while (taken := _take(loan)) is not None:
        pool, conn = taken
        try:
            _end_loan(conn)
        finally:
            pool.release_later(conn)  # even if interrupted: see _reclaim


def _end_loan(conn: Any) -> None:
    """End the loan's cursors (see ``herokupool.tracked``); no I/O, no lock."""
    end_loan = getattr(conn, "end_loan", None)
    if end_loan is not None:
        end_loan()


class _ClosedConnection:
    """Stands for a connection closed inside an atomic block: every use fails as on a
    closed connection of the driver."""

    closed = 1
    autocommit = False

    def __getattr__(self, name: str) -> Any:
        raise driver.closed_error()


_CLOSED: Any = _ClosedConnection()


def _pool_key(
    conn_params: dict[str, Any], options: dict[str, Any], time_zone: tuple[bool, Any]
) -> tuple[tuple[str, str], ...]:
    """What makes two pools of one alias different: the libpq parameters (the password
    left out) and the pool settings.

    psycopg 3's adapters map (``context``) counts as what Django builds it from, USE_TZ and
    the alias's time zone (``time_zone``), never as the object: Django makes it in an
    ``lru_cache`` that the first connects of two threads can each fill, and two equal maps
    must not make two pools (each holding MIN_CONNS).
    """
    pool_settings, _ = split_options(options)
    params = {**conn_params, **pool_settings}
    if "context" in params:
        params["context"] = time_zone
    return tuple(
        sorted((key, repr(value)) for key, value in params.items() if key not in SECRET_KEYS)
    )


def _forget_inherited_connections() -> None:
    """In a forked child, drop this thread's wrappers' borrowed connections unclosed.

    The pool already detached them (see ``pool.py``); the wrapper must not go on
    using a socket its parent owns.
    """
    from django.db import connections

    try:
        wrappers = connections.all(initialized_only=True)
    except Exception:  # settings not configured in this process: nothing to forget
        return
    for wrapper in wrappers:
        loan = wrapper._herokupool_loan if isinstance(wrapper, PooledDatabaseWrapperMixin) else None
        if loan is not None and _take(loan) is not None:
            wrapper.connection = None


_fork.in_child(_fork.BACKENDS, "backends", _forget_inherited_connections)
