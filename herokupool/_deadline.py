"""Deadlines for blocking driver calls that cannot take a timeout themselves.

The drivers' synchronous calls wait for the socket with no time limit (psycopg2 in libpq's
``poll()``, psycopg 3 in its own wait loop on the same socket): a query sent
to a server that stopped answering (frozen, or behind a network path that went silent
without a FIN or RST) blocks for as long as the kernel keeps the socket open, which
with a peer that still ACKs is forever.  ``statement_timeout`` cannot help (the server
is not running), and TCP keepalives only notice a peer that stopped ACKing.

So the pool arms a deadline around each query it runs itself (validation on borrow,
rollback and reset on release).  When the deadline passes, a watchdog thread shuts the
socket down: the wait sees end-of-file, the call fails with the driver's
``OperationalError`` (on both drivers: tests/integration/test_drivers.py), and the pool
discards the connection.

A deadline acts only on the socket it was armed for.  Arming takes a ``dup()`` of the
descriptor, and the watchdog cuts through that copy, which disarming closes: when libpq
closes its own descriptor (the server dropped the connection) and another socket reuses the
number before the deadline is disarmed, the copy still refers to the old socket, so the
unrelated one is never touched.  The watchdog's lock makes cutting and disarming mutually
exclusive: after :meth:`Deadline.disarm` returns, the socket is either cut already
(``disarm`` says so) or will never be.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import os
import socket
import threading
import time
from types import TracebackType

from herokupool import _fork

__all__ = ["Deadline"]


class Deadline:
    """``with Deadline(fd, seconds) as deadline:`` cuts ``fd``'s socket if the block
    is still running after ``seconds``; ``deadline.expired`` tells afterwards.

    The key is drawn before arming, so :meth:`disarm` works (and is idempotent) even
    when an asynchronous exception interrupted ``__enter__`` half-way, where ``with``
    would not call ``__exit__``: callers that can be interrupted call ``disarm()`` in
    a ``finally`` as well: a deadline left armed keeps its copy of the descriptor open.
    """

    __slots__ = ("_key", "expired", "fd", "seconds")

    def __init__(self, fd: int, seconds: float) -> None:
        self.fd = fd
        self.seconds = seconds
        self.expired = False
        self._key: int | None = next(_keys)

    def __enter__(self) -> Deadline:
        assert self._key is not None, "a Deadline is armed once"
        _watchdog.arm(self._key, self.fd, time.monotonic() + max(self.seconds, 0.0))
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.disarm()

    def disarm(self) -> bool:
        """Stop watching; True when the socket had already been cut."""
        key = self._key
        if key is not None:
            self.expired = _watchdog.disarm(key)
            self._key = None
        return self.expired


_keys = itertools.count()  # next() on a count is atomic: no lock needed


class _Watchdog:
    """One thread per process, sleeping until the earliest armed deadline."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int]] = []
        # key -> our dup() of the descriptor, while armed and not yet cut.
        self._armed: dict[int, int] = {}
        self._cut: dict[int, int] = {}  # key -> the dup, once cut, until disarmed
        self._thread: threading.Thread | None = None
        # When the thread's wait ends by itself (inf: it waits for a notify).  An arming
        # earlier than that wakes it, whatever else is queued: a deadline queued by an
        # arming that an exception interrupted before it woke the thread may be at the
        # top of the heap, disarmed, while the thread sleeps without a timeout.
        self._sleeps_until = math.inf

    def arm(self, key: int, fd: int, when: float) -> None:
        """Watch a copy of ``fd`` (raises OSError when ``fd`` is already closed)."""
        with self._cond:
            self._armed[key] = os.dup(fd)
            heapq.heappush(self._heap, (when, key))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="herokupool-deadlines", daemon=True
                )
                self._thread.start()
            elif when < self._sleeps_until:
                self._cond.notify()
                # After the notify: interrupted before it, the next arming wakes the thread.
                self._sleeps_until = when

    def disarm(self, key: int) -> bool:
        with self._cond:
            copy = self._armed.pop(key, None)
            cut = self._cut.pop(key, None)
        # Outside the lock: the copy is ours alone once out of both tables.
        for fd in (copy, cut):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        return cut is not None

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                while self._heap and (self._heap[0][1] not in self._armed):
                    heapq.heappop(self._heap)  # disarmed in time
                if not self._heap:
                    self._sleeps_until = math.inf
                    self._cond.wait()
                    continue
                when, key = self._heap[0]
                if when > now:
                    self._sleeps_until = when
                    self._cond.wait(when - now)
                    continue
                heapq.heappop(self._heap)
                fd = self._armed.pop(key)
                # Our own copy of the descriptor: it still refers to the socket it was
                # armed for, whatever libpq closed meanwhile.  Closed by disarm().
                self._cut[key] = fd
                _shutdown(fd)

    def after_fork_in_child(self) -> None:
        self.__init__()  # type: ignore[misc]  # the thread and the lock are the parent's


def _shutdown(fd: int) -> None:
    try:
        sock = socket.socket(fileno=fd)
    except Exception:  # not a socket (any more): nothing to cut
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.detach()  # the descriptor stays open until disarm() closes it


_watchdog = _Watchdog()
_fork.in_child(_fork.DEADLINES, "deadlines", _watchdog.after_fork_in_child)
