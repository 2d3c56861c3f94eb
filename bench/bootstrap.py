"""Prepare a configuration's process before Django is imported.

A worker (``bench.worker``) or a gunicorn app (``bench.wsgi``) imports this first and
calls :func:`prepare`, which reads the configuration the coordinator put in the
``BENCH_CONFIG`` environment variable (JSON, see ``bench.configs.Config.spec``) and:

- for a psycopg2 configuration, hides psycopg 3 from the process: Django's PostgreSQL
  backend (and django-db-connection-pool's dialect choice) try ``import psycopg``
  first, and one virtualenv holds both drivers;
- for django-postgrespool2, installs :func:`postgrespool2_shim` (see there);
- points ``DJANGO_SETTINGS_MODULE`` at ``bench.settings``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import Any

__all__ = ["prepare"]

_HIDDEN = ("psycopg", "psycopg_pool", "psycopg_binary", "psycopg_c")


def _hide_psycopg3() -> None:
    """Make psycopg 3 look not installed: ``import psycopg`` raises ModuleNotFoundError and
    ``importlib.util.find_spec("psycopg")`` returns None (what herokupool.errors asks), both
    because of the ``None`` entries in ``sys.modules``."""
    for name in _HIDDEN:
        sys.modules[name] = None  # type: ignore[assignment]


def prepare() -> dict[str, Any]:
    """Set this process up for the configuration in ``BENCH_CONFIG``; return it."""
    config: dict[str, Any] = json.loads(os.environ["BENCH_CONFIG"])
    if config["driver"] == "psycopg2":
        if any(sys.modules.get(name) is not None for name in _HIDDEN):
            raise RuntimeError("psycopg 3 was imported before bench.bootstrap.prepare()")
        _hide_psycopg3()
    if config.get("shim") == "postgrespool2":
        postgrespool2_shim()
    os.environ["DJANGO_SETTINGS_MODULE"] = "bench.settings"
    return config


def postgrespool2_shim() -> None:
    """Give SQLAlchemy 2 back the ``sqlalchemy.pool.manage()`` django-postgrespool2 imports.

    django-postgrespool2 2.0.5 (its latest release) does ``from sqlalchemy.pool import
    manage``; SQLAlchemy 1.4 deprecated and 2.0 removed that function, so the backend
    fails to import.  This is SQLAlchemy 1.3's ``_DBProxy`` cut to what the backend
    calls (``get_pool``, ``dispose``): one pool per set of connect() arguments, of the
    class and with the arguments given to ``manage()``.  The backend's own code (its
    QueuePool checkout/checkin per Django connect/close) then runs unchanged.  With
    SQLAlchemy 2.1 it also needs ``postgresql.dialect`` to be the psycopg2 dialect.
    """
    import sqlalchemy.pool
    from sqlalchemy.dialects import postgresql
    from sqlalchemy.dialects.postgresql.psycopg2 import PGDialect_psycopg2

    # SQLAlchemy 2.1 made psycopg 3 the default PostgreSQL dialect; the backend builds
    # ``postgresql.dialect(dbapi=psycopg2)``, so give it the psycopg2 one it means.
    postgresql.dialect = PGDialect_psycopg2  # type: ignore[attr-defined]
    if hasattr(sqlalchemy.pool, "manage"):
        return

    class _DBProxy:
        def __init__(self, module: Any, poolclass: Any = sqlalchemy.pool.QueuePool, **kw: Any):
            self.module = module
            self.poolclass = poolclass
            self.kw = kw
            self.pools: dict[Any, Any] = {}
            self._lock = threading.Lock()

        def __getattr__(self, name: str) -> Any:
            return getattr(self.module, name)

        def get_pool(self, *args: Any, **kw: Any) -> Any:
            key = self._serialize(*args, **kw)
            pool = self.pools.get(key)
            if pool is None:
                with self._lock:
                    pool = self.pools.get(key)
                    if pool is None:
                        pool = self.pools[key] = self.poolclass(
                            lambda: self.module.connect(*args, **kw), **self.kw
                        )
            return pool

        def connect(self, *args: Any, **kw: Any) -> Any:
            return self.get_pool(*args, **kw).connect()

        def dispose(self, *args: Any, **kw: Any) -> None:
            self.pools.pop(self._serialize(*args, **kw), None)

        @staticmethod
        def _serialize(*args: Any, **kw: Any) -> tuple[Any, ...]:
            return (*args, *((k, repr(kw[k])) for k in sorted(kw)))

    def manage(module: Any, **params: Any) -> _DBProxy:
        return _DBProxy(module, **params)

    sqlalchemy.pool.manage = manage  # type: ignore[attr-defined]
