"""Session mode without Django's per-request ``connect()``: the wrapper stays open.

Django's ``connect()`` does work that belongs to a *session*, not to a request:
turning settings into libpq parameters, checking settings, the session set-up
(time zone, ``assume_role``) and ``connection_created``.  With ``CONN_MAX_AGE=0``
(what :func:`herokupool.config` sets) it would run on every request.  Here the
wrapper stays logically open across requests, as with ``CONN_MAX_AGE=None``, while
the physical connection underneath is lent from the first statement of a request to
the request's end:

- the first ``connect()`` of a wrapper, and the first after an explicit ``close()``
  or after its pool was closed (``close_pool()``: test databases, a time zone
  change), turns the settings into parameters and finds the pool; later ones borrow
  from that pool and redo only what is per borrow: Django's transaction bookkeeping,
  autocommit, the isolation level (psycopg2 client-side state the pool resets on
  release) and the time zone check (a local read of the server-reported
  ``TimeZone``; ``SET TIME ZONE`` only when the application changed it);
- Django's session set-up (``init_connection_state()``: ``assume_role``'s ``SET
  ROLE``, the version check) and ``connection_created`` run whenever Django's own
  ``connect()`` would end with them for the wrapper (when it opens), and otherwise when
  a borrow gets a physical connection no wrapper has set up yet (or one set up for
  another ``assume_role``): per session, not per request.  With ``RESET`` (which may
  undo them) they run on every borrow;
- at the request's end (``close_old_connections()`` ->
  ``close_if_unusable_or_obsolete()``), where Django would close a connection past
  its ``CONN_MAX_AGE``, the physical connection goes back to the pool through
  ``_close()`` and the wrapper stays open; an explicit ``close()`` closes the wrapper
  too.  Inside ``atomic()`` and with ``CONN_MAX_AGE`` > 0 nothing changes.

``OPTIONS["CONNECT_PER_BORROW"] = True`` restores Django's ``connect()`` on every
borrow (herokupool 0.1's behaviour).
"""

from __future__ import annotations

import time
import weakref
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db.backends.signals import connection_created

from herokupool.db.backends.mixin import PooledDatabaseWrapperMixin
from herokupool.options import OptionError, parse_bool
from herokupool.pool import ConnectionPool

__all__ = ["LendingMixin", "connect_per_borrow"]

# Physical connection -> the assume_role Django's session set-up ran with on it (the
# time zone is checked on every borrow).  Weak: a connection the pool closes drops out.
_set_up: weakref.WeakKeyDictionary[Any, object] = weakref.WeakKeyDictionary()
_NOT_SET_UP = object()


def connect_per_borrow(alias: str, options: dict[str, Any]) -> bool:
    """Whether ``OPTIONS`` asks for Django's full ``connect()`` on every borrow.

    Raises ``ImproperlyConfigured`` for a value that is no boolean, worded as the
    backend's other OPTIONS errors.
    """
    value = options.get("CONNECT_PER_BORROW", False)
    if isinstance(value, bool):
        return value
    try:
        return parse_bool("CONNECT_PER_BORROW", value)
    except OptionError as error:
        raise ImproperlyConfigured(
            f"DATABASES[{alias!r}]['OPTIONS']['{error.name}'] ({error.value!r}) {error.rule}"
        ) from None


class LendingMixin(PooledDatabaseWrapperMixin):
    """Keep the Django wrapper open; lend the physical connection per request."""

    # The pool this wrapper borrows from while it is open between requests, else None.
    _herokupool_kept: ConnectionPool | None = None

    # Not async_unsafe itself: Django reaches connect() through ensure_connection(),
    # which is, and the full path goes through get_new_connection(), which is too.
    def connect(self) -> None:
        pool = self._herokupool_kept
        reopening = pool is None or pool.closed
        if reopening and (
            not self._pooled or connect_per_borrow(self.alias, self.settings_dict["OPTIONS"])
        ):
            self._herokupool_kept = None
            super().connect()
            return
        settings = self.settings_dict
        # What Django's connect() resets, in its order (BaseDatabaseWrapper.connect).
        self.in_atomic_block = False
        self.savepoint_ids = []
        self.atomic_blocks = []
        self.needs_rollback = False
        self.health_check_enabled = settings["CONN_HEALTH_CHECKS"]
        max_age = settings["CONN_MAX_AGE"]
        self.close_at = None if max_age is None else time.monotonic() + max_age
        self.closed_in_transaction = False
        self.errors_occurred = False
        self.health_check_done = True
        level = settings["OPTIONS"].get("isolation_level")
        if reopening:
            # Django's own steps: check the settings, turn them into parameters, find
            # (or create) the pool and borrow.
            self._herokupool_kept = None
            self.check_settings()
            conn = self.connection = self.get_new_connection(self.get_connection_params())
            pool = self._herokupool_kept = self._herokupool_pool
            assert pool is not None, "get_new_connection() borrowed"
        else:
            assert pool is not None
            conn = self.connection = self._herokupool_lend(pool, level)
        if level is None and settings["AUTOCOMMIT"]:
            # set_autocommit(True) without its checks: the pool lends connections in
            # autocommit, and the atomic state was reset above.
            self.autocommit = True
            if self.run_commit_hooks_on_set_autocommit_on:
                self.run_and_clear_commit_hooks()
                self.run_commit_hooks_on_set_autocommit_on = False
        else:
            self.set_autocommit(settings["AUTOCOMMIT"])
        role = settings["OPTIONS"].get("assume_role")
        if reopening or pool.reset is not None or _set_up.get(conn, _NOT_SET_UP) != role:
            # The wrapper opens (Django's connect() always ends so), or it got a session no
            # wrapper has set up yet, one set up for another role, or one RESET may have
            # undone.
            self.init_connection_state()
            connection_created.send(sender=self.__class__, connection=self)
            if pool.reset is None:
                _set_up[conn] = role
        else:
            # Django's time zone set-up again, in case the application changed it: a
            # local read of the TimeZone the server reports, SET only when it differs.
            # (get_parameter_status: _configure_timezone()'s conn.info.parameter_status
            # without allocating a ConnectionInfo per borrow.)
            name = self.timezone_name
            if name and conn.get_parameter_status("TimeZone") != name:
                self._configure_timezone(conn)  # type: ignore[attr-defined]
                if not self.autocommit:
                    conn.commit()
        self.run_on_commit = []

    def close_if_unusable_or_obsolete(self) -> None:
        # Only where Django would close a connection past its CONN_MAX_AGE (with 0, at
        # every request's end) does lending differ: the physical connection goes back and
        # the wrapper stays open.  Otherwise (kept under CONN_MAX_AGE > 0 or None, inside
        # atomic(), nothing borrowed) Django's own checks run, health check included.
        if (
            self.connection is None
            or self._herokupool_kept is None
            or self.in_atomic_block
            or self._herokupool_pool is None
            or self.close_at is None
            or time.monotonic() < self.close_at
        ):
            super().close_if_unusable_or_obsolete()
            return
        self.health_check_done = False
        if self.autocommit != self.settings_dict["AUTOCOMMIT"]:  # get_autocommit(), connected
            self.close()  # as Django: don't take chances, the wrapper closes too
            return
        # After errors (errors_occurred) Django would run SELECT 1 before closing; the
        # pool checks what comes back on release (transaction status, a broken
        # connection) and the socket again on the next borrow, so that round trip is
        # saved.
        self.run_on_commit = []
        self._close()

    def close(self) -> None:
        self._herokupool_kept = None
        super().close()
