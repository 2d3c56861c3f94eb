"""The waiting line: borrowers queued for a connection, served first in, first out.

psycopg_pool's ``WaitingClient`` is the model: whoever serves a waiter calls
:meth:`Waiter.set`, which says no (False) when the waiter already gave up, so the connection
goes to the next one instead; the waiter gives up with :meth:`Waiter.give_up`, which says no
when it was served first (it must then hand back what it got).  Both run under the pool's
lock, so a connection is never handed to a borrower that left, and never lost between them.

The line holds its waiters by weak reference: a borrower that left without leaving the line
(an exception landing in its own clean-up) takes its waiter with it, and the line skips, and
the pool's thread removes, what is left.  A waiter is also the owner token of the entry it was
handed (see ``_entries.py``).
"""

from __future__ import annotations

import enum
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["Outcome", "Waiter", "WaitingLine"]

_TIMEOUT_MAX = threading.TIMEOUT_MAX


class Outcome(enum.Enum):
    """What a queued borrower was given."""

    PENDING = "pending"
    SERVED = "served"  # a connection: ``Waiter.entry``, HANDED
    SLOT = "slot"  # a free slot to open a connection in: ``Waiter.entry``, OPENING
    CLOSED = "closed"  # the pool closed while waiting
    GAVE_UP = "gave up"  # timed out or interrupted: serve the next one instead


_PENDING = Outcome.PENDING


class Waiter:
    """One borrower's place in line, and the token that says it is still there."""

    __slots__ = ("__weakref__", "_signal", "entry", "outcome")

    def __init__(self) -> None:
        self.outcome = _PENDING
        self.entry: Any = None
        self._signal = threading.Lock()
        self._signal.acquire()

    def wait(self, timeout: float) -> None:
        # Clamped: acquire() raises ValueError for a negative timeout (but -1) and
        # OverflowError for one above TIMEOUT_MAX.  Not min(max()): this runs on every wait.
        if timeout < 0.0:
            timeout = 0.0
        elif timeout > _TIMEOUT_MAX:
            timeout = _TIMEOUT_MAX
        self._signal.acquire(timeout=timeout)

    def set(self, outcome: Outcome, entry: Any = None) -> bool:
        """Serve this waiter; False when it already gave up (serve the next one)."""
        if self.outcome is not _PENDING:
            return False
        self.outcome = outcome
        self.entry = entry
        self._signal.release()
        return True

    def give_up(self) -> bool:
        """Leave; False when served first (the caller must hand back what it got)."""
        if self.outcome is not _PENDING:
            return False
        self.outcome = Outcome.GAVE_UP
        return True


class WaitingLine:
    """Waiters in arrival order, held weakly.  Use with the pool's lock held."""

    __slots__ = ("_on_lost", "_refs")

    def __init__(self, on_lost: Callable[[weakref.ReferenceType[Any]], None]) -> None:
        # Never replaced, only changed in place: the pool reads it directly on its fast
        # path (is anyone waiting?) without a method call.
        self._refs: deque[weakref.ReferenceType[Waiter]] = deque()
        self._on_lost = on_lost

    @property
    def refs(self) -> deque[weakref.ReferenceType[Waiter]]:
        """The line itself (for a truth test: is anybody waiting?)."""
        return self._refs

    def __len__(self) -> int:
        return len(self._refs)

    def __iter__(self) -> Iterator[Waiter]:
        for ref in self._refs:
            waiter = ref()
            if waiter is not None:
                yield waiter

    def append(self, waiter: Waiter) -> None:
        self._refs.append(weakref.ref(waiter, self._on_lost))

    def remove(self, waiter: Waiter) -> None:
        for ref in self._refs:
            if ref() is waiter:
                self._refs.remove(ref)
                return

    def next(self) -> tuple[Waiter, weakref.ReferenceType[Waiter]] | tuple[None, None]:
        """Take the oldest waiter still there and pending out of the line (the caller then
        serves it with :meth:`Waiter.set`), with the weak reference the line held it by (the
        owner reference of what it is served: same callback); (None, None) when nobody
        waits."""
        refs = self._refs
        while refs:
            ref = refs.popleft()
            waiter = ref()
            if waiter is not None and waiter.outcome is _PENDING:
                return waiter, ref
        return None, None

    def prune(self) -> int:
        """Drop waiters that are gone or no longer pending; how many."""
        before = len(self._refs)
        kept = [
            ref
            for ref in self._refs
            if (waiter := ref()) is not None and waiter.outcome is _PENDING
        ]
        self._refs.clear()
        self._refs.extend(kept)
        return before - len(kept)

    def close(self) -> None:
        """The pool closed: every waiter is told so."""
        while self._refs:
            waiter = self._refs.popleft()()
            if waiter is not None:
                waiter.set(Outcome.CLOSED)
