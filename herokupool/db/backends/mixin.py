"""Every Django hook of herokupool's backends, in one mixin.

``postgresql/base.py`` and ``postgis/base.py`` compose this mixin with Django's own
wrappers; everything else (SQL, introspection, schema editing, test databases) is
Django's.  Each process keeps one :class:`~herokupool.pool.ConnectionPool` per alias
and connection parameters, created on first use.

Django runs ``connect()`` on every borrow: it re-applies autocommit, the isolation
level, the time zone and the role, and sends ``connection_created`` each time.
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from typing import TYPE_CHECKING, Any

import psycopg2
import psycopg2.extensions
import psycopg2.extras
from django.core.exceptions import ImproperlyConfigured
from django.db.backends.base.base import NO_DB_ALIAS
from django.db.backends.postgresql.psycopg_any import IsolationLevel, is_psycopg3

from herokupool import _fork, registry
from herokupool._redact import SECRET_KEYS
from herokupool.config import MISSING_ENV_KEY, missing_env_error, with_ssl_hint
from herokupool.options import POOL_SETTINGS, OptionError, parse_options, split_options
from herokupool.pool import ConnectionPool

if is_psycopg3:  # pragma: no cover - depends on what is installed
    raise ImproperlyConfigured(
        "herokupool's backends run on psycopg2, but Django's PostgreSQL backend chose "
        "psycopg 3 because the 'psycopg' package is installed. Uninstall psycopg, or use "
        "Django's own pool (OPTIONS={'pool': True}) with psycopg 3 instead."
    )

if TYPE_CHECKING:
    from django.db.backends.postgresql.base import DatabaseWrapper as _Base
else:
    _Base = object

__all__ = ["PooledDatabaseWrapperMixin"]

logger = logging.getLogger("herokupool.backend")


def _open(params: dict[str, Any]) -> Any:
    """Open one physical connection the way Django's own backend does."""
    conn = psycopg2.connect(**params)
    # Idle pooled connections stay in autocommit, so nothing the pool runs on them
    # (validation, reset) can leave a transaction open; Django sets it per borrow.
    conn.autocommit = True
    # What Django's get_new_connection() registers: skip psycopg2's json decoding,
    # JSONField decodes itself.
    psycopg2.extras.register_default_jsonb(conn_or_curs=conn, loads=lambda x: x)
    return conn


class PooledDatabaseWrapperMixin(_Base):
    """Borrow connections from this process's pool instead of opening them."""

    _herokupool_unusable = False  # set while close() drops a connection a health check failed
    _herokupool_last: tuple[dict[str, Any], dict[str, Any], ConnectionPool] | None = None
    # [pool, conn] while a connection is borrowed, else empty; watched for the wrapper's
    # whole life by one finalizer (see _guard_against_orphans).
    _herokupool_held: list[Any] | None = None

    @property
    def _herokupool_pool(self) -> ConnectionPool | None:
        """The pool ``self.connection`` was borrowed from, while it is borrowed."""
        held = self._herokupool_held
        return held[0] if held else None

    @property
    def _pooled(self) -> bool:
        # Django's connections to the maintenance database (CREATE/DROP DATABASE for
        # tests) must not linger in a pool: they would block DROP DATABASE.
        return self.alias != NO_DB_ALIAS

    def get_connection_params(self) -> dict[str, Any]:
        if MISSING_ENV_KEY in self.settings_dict:
            error = missing_env_error(self.settings_dict)
            if error is not None:
                raise error
        params = super().get_connection_params()  # has every OPTIONS key, ours included
        for name in POOL_SETTINGS.intersection(params):
            del params[name]
        return params

    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        if not self._pooled:
            return super().get_new_connection(conn_params)
        # As Django's get_new_connection(): the isolation level from OPTIONS, or the
        # server's default (the pool reset the session's on release).  Checked before
        # borrowing, so a bad value never holds a connection.
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
        pool = self._pool_for(conn_params)
        conn = pool.borrow()
        held = self._herokupool_held
        if held is None:
            held = self._herokupool_held = _guard_against_orphans(self)
        held[:] = (pool, conn)
        self.isolation_level = isolation_level
        if level is not None:
            # Outside autocommit, as on Django's fresh connections: psycopg2 then sends the
            # level with each BEGIN.  Set in autocommit it would SET the session's
            # default_transaction_isolation, which behind PgBouncer (transaction mode) stays on
            # the server connection and reaches other clients.  connect() restores autocommit.
            conn.autocommit = False
            conn.isolation_level = isolation_level
        return conn

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
        key = _pool_key(conn_params, options)
        pool = registry.get(self.alias, key, lambda: self._new_pool(conn_params))
        self._herokupool_last = (dict(conn_params), dict(options), pool)
        return pool

    def _new_pool(self, conn_params: dict[str, Any]) -> ConnectionPool:
        settings, _ = split_options(self.settings_dict["OPTIONS"])
        try:
            kwargs = parse_options(settings)
        except OptionError as error:
            raise ImproperlyConfigured(
                f"DATABASES[{self.alias!r}]['OPTIONS']['{error.name}'] ({error.value!r}) "
                f"{error.rule}"
            ) from None
        params = dict(conn_params)
        # Bound the time a borrower can spend connecting to an unreachable server.
        params.setdefault("connect_timeout", max(2, math.ceil(kwargs["timeout"])))
        # with_ssl_hint: a server without SSL says herokupool required it because of DYNO.
        connect = with_ssl_hint(lambda: _open(params), self.settings_dict)
        return ConnectionPool(connect, name=self.alias, **kwargs)

    def _close(self) -> None:
        pool = self._herokupool_pool
        if self._herokupool_held:
            self._herokupool_held.clear()  # returned below: the orphan guard has nothing left
        if self.connection is None or pool is None:
            super()._close()  # type: ignore[misc]
            return
        conn = self.connection
        # Never leave the wrapper holding a connection another thread may now have
        # (close() keeps it inside an atomic block).
        self.connection = None
        with self.wrap_database_errors:
            if self._herokupool_unusable:
                pool.discard(conn)
            else:
                pool.release(conn)

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
            self._herokupool_pool is None
            or self.connection is None
            or not self.health_check_enabled  # type: ignore[attr-defined]  # not in the stubs
            or self.health_check_done  # type: ignore[has-type]
        ):
            super().close_if_health_check_failed()
            return
        if not self.is_usable():
            self._herokupool_unusable = True
            try:
                self.close()
            finally:
                self._herokupool_unusable = False
        self.health_check_done = True


def _guard_against_orphans(wrapper: PooledDatabaseWrapperMixin) -> list[Any]:
    """Return a holder for ``[pool, conn]`` whose connection goes back to its pool if
    ``wrapper`` is garbage-collected while holding one.

    Django's wrappers live in thread-local storage: a thread that ends without closing
    its connection (a worker thread outside the request cycle that never calls
    close_old_connections) drops its wrapper.  Django's own backend then closes the
    socket; without this the pooled connection would stay borrowed for good.  One
    finalizer per wrapper, not per borrow: borrowing only fills the holder.
    """
    held: list[Any] = []
    guard = weakref.finalize(wrapper, _release_orphan, held)
    guard.atexit = False  # at interpreter exit there is nobody left to serve
    return held


def _release_orphan(held: list[Any]) -> None:
    if not held:
        return
    pool, conn = held
    held.clear()
    logger.warning(
        "pool %r: took back a connection whose thread ended without closing it", pool.name
    )
    with contextlib.suppress(Exception):
        pool.release(conn)


def _pool_key(conn_params: dict[str, Any], options: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """What makes two pools of one alias different: the libpq parameters (the password
    left out) and the pool settings."""
    pool_settings, _ = split_options(options)
    return tuple(
        sorted(
            (key, repr(value))
            for key, value in {**conn_params, **pool_settings}.items()
            if key not in SECRET_KEYS
        )
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
        if isinstance(wrapper, PooledDatabaseWrapperMixin) and wrapper._herokupool_held:
            wrapper._herokupool_held.clear()
            wrapper.connection = None


_fork.in_child(_fork.BACKENDS, "backends", _forget_inherited_connections)
