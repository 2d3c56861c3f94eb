"""Django's PostgreSQL backend with no pool at all: its first connection is kept aside and
handed to every later ``connect()``, and ``close()`` closes nothing.

Not a configuration anyone should run: it is the floor of ``bench.instructions``, what
Django's own ``connect()`` + ``close()`` cost when getting a connection costs nothing.
"""

from __future__ import annotations

from typing import Any

from django.db.backends.postgresql import base

_kept: dict[str, Any] = {}


class DatabaseWrapper(base.DatabaseWrapper):
    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        conn = _kept.get(self.alias)
        if conn is None:
            conn = _kept[self.alias] = super().get_new_connection(conn_params)
        return conn

    def _close(self) -> None:
        pass
