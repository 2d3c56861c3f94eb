"""Exceptions raised by the pool.

Every pool error subclasses :class:`psycopg2.OperationalError` and, when the ``psycopg``
package (psycopg 3) is installed, :class:`psycopg.OperationalError` as well.  Django's
error wrapper checks ``issubclass(error, Database.OperationalError)`` where ``Database`` is
the driver its PostgreSQL backend chose, so on either driver a pool error reaches the
application as :class:`django.db.OperationalError`, with no extra code in views or
middleware, and ``except psycopg.OperationalError`` / ``except psycopg2.OperationalError``
catch it too.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import psycopg2

__all__ = ["PoolClosed", "PoolError", "PoolOverloaded", "PoolTimeout"]


def _bases() -> tuple[type[Exception], ...]:
    if importlib.util.find_spec("psycopg") is None:
        return (psycopg2.OperationalError,)
    try:
        # Not a plain import: psycopg2-only installs type-check this module too.
        psycopg: Any = importlib.import_module("psycopg")
    except ImportError:  # installed without a libpq it can load: Django cannot use it either
        return (psycopg2.OperationalError,)
    return (psycopg2.OperationalError, psycopg.OperationalError)


class PoolError(*_bases()):  # type: ignore[misc]
    """Base class of every error the pool raises itself."""

    # psycopg's Error sets these in its __init__, which psycopg2's (first in the MRO) does
    # not call: without them its pgconn, pgresult and diag properties would raise
    # AttributeError instead of saying there is no connection or result.
    _info: Any = None
    _pgconn: Any = None
    _encoding = "utf-8"


class PoolTimeout(PoolError):
    """No connection became free within the pool's ``timeout``.

    The message names the pool and gives the time waited and the in use / idle /
    waiting / max numbers at that moment.  When the pool's last attempt to open a
    connection failed, that error is the ``__cause__``: the database may be
    unreachable rather than the pool exhausted.
    """


class PoolOverloaded(PoolTimeout):
    """``max_waiting`` borrowers were already queued: the borrow was refused at once.

    A :class:`PoolTimeout` (so code that handles timeouts handles it too) raised without
    waiting; the message names the pool and gives the waiting / in use / max numbers.
    """


class PoolClosed(PoolError):
    """The pool was closed (``close_pool()``, shutdown) while or before borrowing."""
