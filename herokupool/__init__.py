"""A real in-process connection pool for Django on psycopg2, configured the Heroku way."""

from __future__ import annotations

from herokupool.config import config, parse
from herokupool.errors import PoolClosed, PoolError, PoolTimeout
from herokupool.pool import ConnectionPool
from herokupool.registry import close_pools, stats

__all__ = [
    "ConnectionPool",
    "PoolClosed",
    "PoolError",
    "PoolTimeout",
    "__version__",
    "close_pools",
    "config",
    "parse",
    "stats",
]

__version__ = "0.1.0.dev0"
