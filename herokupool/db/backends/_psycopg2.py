"""What herokupool's backends do on psycopg2: the driver-specific half of the mixin.

:mod:`herokupool.db.backends._psycopg` has the same names for psycopg 3; the mixin
imports the one Django's own backend chose (psycopg 3 when importable).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg2
import psycopg2.extensions
import psycopg2.extras

from herokupool import tracked
from herokupool.tracked import TrackedConnection, unchanged

__all__ = [
    "TrackedConnection",
    "adopt",
    "closed_error",
    "connect",
    "libpq_version",
    "parameter_status",
    "release_hook",
    "successor",
    "unchanged",
]


def connect(params: dict[str, Any]) -> Any:
    """Open one physical connection the way Django's ``get_new_connection()`` does, as a
    :class:`~herokupool.tracked.TrackedConnection`, in autocommit."""
    params = dict(params)
    params["connection_factory"] = tracked.connection_class(params.get("connection_factory"))
    conn = psycopg2.connect(**params)
    # Idle pooled connections stay in autocommit, so nothing the pool runs on them
    # (validation, reset) can leave a transaction open; Django sets it per borrow.
    conn.autocommit = True
    # What Django's get_new_connection() registers: skip psycopg2's json decoding,
    # JSONField decodes itself.
    psycopg2.extras.register_default_jsonb(conn_or_curs=conn, loads=_identity)
    conn.mark_baseline()  # what every loan starts from: these typecasters, this cursor class
    return conn


def _identity(value: Any) -> Any:
    return value


def release_hook(reset: str | None) -> Callable[[Any], str | None]:
    """The pool's ``prepare_release`` (psycopg2 prepares nothing itself: ``reset`` does
    not matter)."""
    return tracked.prepare_release


def adopt(conn: Any, cursor: Any) -> Any:
    """Every psycopg2 cursor is made by ``conn.cursor()``, tracked already."""
    return cursor


def parameter_status(conn: Any, name: str) -> str | None:
    """A parameter the server reported (``TimeZone``), without a round trip."""
    value: str | None = conn.get_parameter_status(name)
    return value


def closed_error() -> Exception:
    """What a closed connection raises when used."""
    return psycopg2.InterfaceError("connection already closed")


def libpq_version() -> int:
    return int(psycopg2.extensions.libpq_version())


#: No new object per loan on psycopg2: its connection is a C object whose libpq connection
#: cannot move to another, and a proxy would break the C functions that take it
#: (``register_type``, ``execute_values``).  See the README's Limitations.
successor = None
