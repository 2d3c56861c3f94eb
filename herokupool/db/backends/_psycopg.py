"""What herokupool's backends do on psycopg 3: the driver-specific half of the mixin.

The same names as :mod:`herokupool.db.backends._psycopg2`.
"""

from __future__ import annotations

from typing import Any

import psycopg

from herokupool.tracked_psycopg import (
    TrackedConnection,
    release_hook,
    successor,
    unchanged,
)

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
    """Open one physical connection the way Django's ``get_new_connection()`` does (its
    parameters carry the adapters ``context``, the ``cursor_factory`` chosen by
    ``server_side_binding`` and ``prepare_threshold``), as a
    :class:`~herokupool.tracked_psycopg.TrackedConnection`, in autocommit: idle pooled
    connections stay in autocommit, Django sets it per borrow."""
    params = dict(params)
    params["autocommit"] = True
    conn = TrackedConnection.connect(**params)
    conn.mark_baseline(params.get("context"))
    return conn


def adopt(conn: Any, cursor: Any) -> Any:
    """Track a cursor built by calling its class (Django's ``ServerSideCursor``)."""
    return conn.adopt(cursor)


def parameter_status(conn: Any, name: str) -> str | None:
    """A parameter the server reported (``TimeZone``), without a round trip and without
    the ``ConnectionInfo`` that ``conn.info`` allocates."""
    value: bytes | None = conn.pgconn.parameter_status(name.encode())
    return None if value is None else value.decode()


def closed_error() -> Exception:
    """What a closed connection raises when used."""
    return psycopg.OperationalError("the connection is closed")


def libpq_version() -> int:
    return int(psycopg.pq.version())
