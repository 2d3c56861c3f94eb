"""Helpers every test module shares: one way to wait for a condition, one way to interrupt.

``wait_until`` polls; ``interrupting`` raises an exception from a ``SIGALRM`` handler in the main
thread, once or as a storm (what Celery's soft time limit, ``signal.alarm``-based timeouts and
``KeyboardInterrupt`` do to code: an exception at whatever instruction the thread is on).
"""

from __future__ import annotations

import contextlib
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import FrameType
from typing import Any


def wait_until(
    condition: Callable[[], object], timeout: float = 5.0, interval: float = 0.005
) -> bool:
    """Poll ``condition`` until it is true: True, or False once ``timeout`` seconds passed.

    Use it as ``assert wait_until(...)`` (the assertion names the condition), never to pace
    a test: it proves something happens within a bound, not how fast.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return bool(condition())
        time.sleep(interval)
    return True


def assert_counted_once(stats: Mapping[str, Any], context: object = None) -> None:
    """Every connection a pool opened is counted once, from its ``stats()``: closed,
    dropped, or in the pool now (call it when nothing is being handed over or checked)."""
    gone = sum(stats[f"connections_{how}"] for how in ("closed", "discarded", "lost"))
    assert stats["connections_created"] == gone + stats["idle"] + stats["in_use"], (context, stats)


class Interrupted(BaseException):
    """What the tests' signal handler raises by default: not an ``Exception``, like
    ``KeyboardInterrupt`` or ``gevent.Timeout``."""


@dataclass
class Interruptions:
    """What ``interrupting`` did: how many exceptions it raised."""

    raised: int = 0
    stopped: bool = False


@contextlib.contextmanager
def interrupting(
    after: float,
    *,
    every: tuple[float, float] | None = None,
    error: Callable[[], BaseException] = Interrupted,
    seed: int | None = None,
) -> Iterator[Interruptions]:
    """Raise ``error()`` from a ``SIGALRM`` handler in the main thread after ``after`` seconds;
    with ``every=(low, high)``, again and again at random intervals in that range (seconds)
    until the block ends.  Main thread only (Python runs signal handlers there)."""
    assert threading.current_thread() is threading.main_thread(), "signals reach the main thread"
    rng = random.Random(seed)
    done = Interruptions()

    def handler(signum: int, frame: FrameType | None) -> None:
        if done.stopped:
            return
        if every is not None:
            signal.setitimer(signal.ITIMER_REAL, rng.uniform(*every))
        done.raised += 1
        raise error()

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, after)
    try:
        yield done
    finally:
        done.stopped = True
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
