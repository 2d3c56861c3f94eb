"""The configurations compared, each as the Django settings a user would write.

Every pooled configuration gets the same number of server connections (``size``) and
the same pool timeout; everything else is the peer's default.  Every connection
carries ``application_name = "bench-<name>"`` so the coordinator can count a
configuration's server connections in ``pg_stat_activity``.

A configuration with ``prepared_only`` runs only in the prepared-statement phase (the same
few ORM queries on every request): the variants of herokupool on psycopg 3 that differ only
in psycopg 3's server-side binding and ``prepare_threshold``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["CEILING", "CONFIGS", "NO_POOL", "PREPARED", "Config", "Target", "by_name"]


@dataclass(frozen=True)
class Target:
    """Where the benchmark database is (trust authentication on loopback)."""

    host: str
    port: int
    user: str
    dbname: str
    password: str = ""


@dataclass(frozen=True)
class Config:
    name: str
    label: str
    driver: str  # "psycopg2" or "psycopg3": which one the process may import
    pooled: bool  # holds at most ``size`` server connections
    shim: str | None = None
    via_pgbouncer: bool = False
    note: str = ""
    prepared_only: bool = False  # measured in the prepared-statement phase only

    @property
    def application_name(self) -> str:
        return f"bench-{self.name}"

    def spec(
        self,
        target: Target,
        *,
        size: int,
        timeout: float,
        pgbouncer_port: int | None = None,
    ) -> dict[str, Any]:
        """The JSON-able description ``bench.bootstrap`` and ``bench.settings`` read."""
        database: dict[str, Any] = {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": target.dbname,
            "USER": target.user,
            "PASSWORD": target.password,
            "HOST": target.host,
            "PORT": str(target.port),
            "CONN_MAX_AGE": 0,
            "OPTIONS": {"application_name": self.application_name},
        }
        settings: dict[str, Any] = {}
        options = database["OPTIONS"]
        if self.name == "ceiling":
            database["CONN_MAX_AGE"] = None
        elif self.name == "django-pool":
            options["pool"] = {"min_size": size, "max_size": size, "timeout": timeout}
        elif self.name.startswith("dbcp-"):
            database["ENGINE"] = "dj_db_conn_pool.backends.postgresql"
            database["POOL_OPTIONS"] = {"POOL_SIZE": size, "MAX_OVERFLOW": 0, "TIMEOUT": timeout}
        elif self.name == "postgrespool2":
            database["ENGINE"] = "django_postgrespool2"
            settings["DATABASE_POOL_ARGS"] = {
                "pool_size": size,
                "max_overflow": 0,
                "timeout": timeout,
            }
        elif self.name == "pgbouncer":
            assert pgbouncer_port is not None
            database["PORT"] = str(pgbouncer_port)
            # Persistent client connections to PgBouncer, which multiplexes them onto
            # ``size`` server connections per transaction.
            database["CONN_MAX_AGE"] = None
            database["DISABLE_SERVER_SIDE_CURSORS"] = True
        elif self.name == "pgbouncer-connect":
            assert pgbouncer_port is not None
            database["PORT"] = str(pgbouncer_port)
            # A new client connection to PgBouncer per request (CONN_MAX_AGE=0).
            database["DISABLE_SERVER_SIDE_CURSORS"] = True
        elif self.name.startswith("herokupool"):
            # herokupool (psycopg2) and herokupool-pg3* (psycopg 3): the same settings; the
            # driver is the one the process can import (see bench.bootstrap).
            database["ENGINE"] = "herokupool.db.backends.postgresql"
            options.update({"MAX_CONNS": size, "TIMEOUT": timeout})
            if self.name == "herokupool-pg3-ssb":
                # Server-side binding, nothing prepared (Django's prepare_threshold default).
                options.update({"server_side_binding": True, "prepare_threshold": None})
            elif self.name == "herokupool-pg3-prepared":
                # Server-side binding and psycopg 3's own default threshold: a statement is
                # prepared on the server at its 5th execution on a connection.
                options.update({"server_side_binding": True, "prepare_threshold": 5})
            elif self.name not in ("herokupool", "herokupool-pg3"):
                raise ValueError(f"unknown configuration {self.name!r}")
        elif self.name == "heroku-template":
            # Heroku's getting-started app: dj_database_url.config(conn_max_age=600,
            # conn_health_checks=True): a connection per thread, checked per request.
            database["CONN_MAX_AGE"] = 600
            database["CONN_HEALTH_CHECKS"] = True
        elif self.name != "no-pool":
            raise ValueError(f"unknown configuration {self.name!r}")
        return {
            "name": self.name,
            "driver": self.driver,
            "shim": self.shim,
            "database": database,
            "settings": settings,
        }


NO_POOL = "no-pool"
CEILING = "ceiling"

CONFIGS: tuple[Config, ...] = (
    Config(NO_POOL, "no pool (CONN_MAX_AGE=0)", "psycopg2", pooled=False),
    Config(CEILING, "ceiling (CONN_MAX_AGE=None)", "psycopg2", pooled=False),
    Config(
        "django-pool",
        "Django native pool (psycopg 3)",
        "psycopg3",
        pooled=True,
        note="OPTIONS={'pool': {min_size, max_size, timeout}}",
    ),
    Config(
        "dbcp-pg2",
        "django-db-connection-pool (psycopg2)",
        "psycopg2",
        pooled=True,
        note="SQLAlchemy QueuePool; its defaults include pre_ping=True (SELECT 1 per borrow)",
    ),
    Config(
        "dbcp-pg3",
        "django-db-connection-pool (psycopg 3)",
        "psycopg3",
        pooled=True,
        note="SQLAlchemy QueuePool; its defaults include pre_ping=True (SELECT 1 per borrow)",
    ),
    Config(
        "postgrespool2",
        "django-postgrespool2 (shimmed)",
        "psycopg2",
        pooled=True,
        shim="postgrespool2",
        note="2.0.5 does not import with SQLAlchemy 2; measured with bench.bootstrap's shim",
    ),
    Config(
        "pgbouncer",
        "PgBouncer (transaction mode, CONN_MAX_AGE=None)",
        "psycopg2",
        pooled=True,
        via_pgbouncer=True,
        note="stock backend, persistent client connections, to a PgBouncer on loopback",
    ),
    Config(
        "pgbouncer-connect",
        "PgBouncer (transaction mode, CONN_MAX_AGE=0)",
        "psycopg2",
        pooled=True,
        via_pgbouncer=True,
        note="stock backend, a new client connection to PgBouncer per request",
    ),
    Config("herokupool", "herokupool", "psycopg2", pooled=True),
    Config(
        "herokupool-pg3",
        "herokupool (psycopg 3)",
        "psycopg3",
        pooled=True,
        note="Django's psycopg 3 defaults: client-side binding cursors, prepare_threshold=None "
        "(nothing prepared on the server)",
    ),
    Config(
        "herokupool-pg3-ssb",
        "herokupool (psycopg 3, server-side binding, prepare_threshold=None)",
        "psycopg3",
        pooled=True,
        prepared_only=True,
        note="OPTIONS server_side_binding=True, prepare_threshold=None: parameters bound on the "
        "server, nothing prepared",
    ),
    Config(
        "herokupool-pg3-prepared",
        "herokupool (psycopg 3, server-side binding, prepare_threshold=5)",
        "psycopg3",
        pooled=True,
        prepared_only=True,
        note="OPTIONS server_side_binding=True, prepare_threshold=5 (psycopg's own default): "
        "a statement run 5 times on a connection is prepared on the server, and the plan "
        "stays with the pooled connection across requests",
    ),
    Config(
        "heroku-template",
        "Heroku's Django template (psycopg 3, CONN_MAX_AGE=600, health checks)",
        "psycopg3",
        pooled=False,
        note="stock backend on psycopg 3 with CONN_MAX_AGE=600 and CONN_HEALTH_CHECKS=True, "
        "as heroku/python-getting-started configures it: one connection per thread",
    ),
)


#: The configurations of the prepared-statement phase (besides the ``prepared_only`` ones):
#: the references on both drivers and the stock psycopg 3 setups.
PREPARED = ("ceiling", "django-pool", "heroku-template", "herokupool", "herokupool-pg3")


def by_name(names: list[str] | None) -> tuple[Config, ...]:
    if not names:
        return CONFIGS
    known = {config.name: config for config in CONFIGS}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; choose from {sorted(known)}")
    return tuple(known[name] for name in names)
