"""The process's pools, keyed by Django alias and connection parameters.

Django asks for a connection through a fresh call to ``get_connection_params()`` each
time, and a test run changes ``NAME`` under an alias; keying on the parameters (the
password left out) gives the test database its own pool, and ``close(alias)`` closes
them all.  Pools reinitialise themselves in a forked child (see ``pool.py``), so the
registry survives ``fork()`` as it is: only its own lock is replaced.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable

from herokupool import _fork
from herokupool.pool import ConnectionPool

__all__ = ["close", "close_all", "close_pools", "get", "stats"]

_lock = threading.Lock()
_pools: dict[str, dict[Hashable, ConnectionPool]] = {}


def get(alias: str, key: Hashable, factory: Callable[[], ConnectionPool]) -> ConnectionPool:
    """Return the open pool for ``(alias, key)``, creating it with ``factory()`` once."""
    pool = _pools.get(alias, {}).get(key)  # lock-free fast path: dict reads are atomic
    if pool is not None and not pool.closed:
        return pool
    with _lock:
        pools = _pools.setdefault(alias, {})
        pool = pools.get(key)
        if pool is None or pool.closed:
            pool = pools[key] = factory()
            # Newest last: stats() reports the pool most recently created for an alias.
            pools[key] = pools.pop(key)
        return pool


def close(alias: str) -> None:
    """Close every pool of ``alias`` (idle connections now, borrowed ones on release)."""
    with _lock:
        pools = _pools.pop(alias, {})
    for pool in pools.values():
        pool.close()


def close_all() -> None:
    """Close every pool of this process."""
    for alias in list(_pools):
        close(alias)


def close_pools(alias: str | None = None) -> None:
    """Close this process's pools: every alias's, or only ``alias``'s.

    Use it where a process is about to exit (gunicorn's ``worker_exit`` hook), so the
    server sees clean disconnects.  Connections borrowed at that moment are closed when
    released; a later borrow opens a new pool.
    """
    if alias is None:
        close_all()
    else:
        close(alias)


def stats() -> dict[str, dict[str, int | float]]:
    """``{alias: stats}`` for every alias with a pool in this process.

    See :meth:`ConnectionPool.stats` for the keys; no value ever holds connection
    parameters.
    """
    with _lock:
        newest = {alias: list(pools.values())[-1] for alias, pools in _pools.items() if pools}
    return {alias: pool.stats() for alias, pool in sorted(newest.items())}


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # another thread may have held it at fork time


_fork.in_child(_fork.REGISTRY, "registry", _after_fork_in_child)
