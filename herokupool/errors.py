"""Exceptions raised by the pool.

Every pool error subclasses :class:`psycopg2.OperationalError`, so inside Django it
reaches the application as :class:`django.db.OperationalError` through Django's own
error wrapping, with no extra code in views or middleware.
"""

from __future__ import annotations

import psycopg2

__all__ = ["PoolClosed", "PoolError", "PoolOverloaded", "PoolTimeout"]


class PoolError(psycopg2.OperationalError):
    """Base class of every error the pool raises itself."""


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
