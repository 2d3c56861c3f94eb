"""The one fork hook: every step a forked child must take, in a stated order.

``os.register_at_fork`` runs its callbacks in registration (child: call) order, which
would depend on which module happened to be imported first.  Instead each module
registers a step here under a fixed stage, and one callback runs them by stage:

1. ``DEADLINES``: the deadline watchdog forgets its thread (it does not exist in the child).
2. ``POOLS``: every pool forgets the parent's connections without closing them (closing
   would send Terminate on sockets the parent still uses) and gets a new lock and queues.
3. ``REGISTRY``: the registry of pools gets a new lock.
4. ``BACKENDS``: Django wrappers drop the connections they had borrowed in the parent
   (the pool has detached them already, so this must come after ``POOLS``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Final

__all__ = ["BACKENDS", "DEADLINES", "POOLS", "REGISTRY", "in_child"]

logger = logging.getLogger("herokupool.pool")

DEADLINES: Final = 10
POOLS: Final = 20
REGISTRY: Final = 30
BACKENDS: Final = 40

_steps: dict[str, tuple[int, Callable[[], None]]] = {}


def in_child(stage: int, name: str, step: Callable[[], None]) -> None:
    """Run ``step`` in every forked child, at ``stage``; ``name`` makes re-registration
    (a reloaded module) replace the step instead of adding a second one."""
    _steps[name] = (stage, step)


def _after_fork_in_child() -> None:
    for _, name, step in sorted((stage, name, step) for name, (stage, step) in _steps.items()):
        try:
            step()
        except Exception:  # a failing step must not stop the others, nor the child
            logger.exception("herokupool: after-fork step %s failed", name)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
