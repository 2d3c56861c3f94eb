"""One record per physical connection, in exactly one state, and the table that holds them.

HikariCP's ``PoolEntry`` / ``ConcurrentBag`` are the model.  Every connection the pool knows
is an :class:`Entry` in one :class:`State`, changed only by :class:`Entries` while the pool's
lock is held, in one step; every measure in ``stats()`` (in use, idle, connecting) is read
off the states, never adjusted by hand.

Who owns a connection at every moment:

- ``OPENING``: a slot is taken and its owner (a borrower) is connecting; no connection yet.
- ``IDLE``: the pool; the entry holds the connection and sits on the idle stack.
- ``RESERVED``: its owner (a borrower validating it, or a sweep polling it) works on it
  outside the lock.
- ``HANDED``: given to a queued borrower (its owner) that has not taken it up yet.
- ``LENT``: the borrower.  The pool then holds the connection only by a weak reference, so
  a connection its borrower lost every reference to is known at once (CPython frees it, and
  the driver closes it, the moment the last reference goes).

An owner is held by a weak reference too.  An entry whose owner (or, when lent, whose
connection) is gone is stranded; the weak reference's callback asks the pool's thread to put
it right, and whoever meets it first does.  Nothing here does I/O or takes a lock.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import random
import select
import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["Entries", "Entry", "State"]

# Fraction of max_lifetime taken off at random per connection, so connections opened
# together (at start-up, after a restart) do not all expire together.
LIFETIME_JITTER = 0.1


class State(enum.IntEnum):
    """Where an entry is; an int, so the counts are a list indexed by it."""

    OPENING = 0
    IDLE = 1
    RESERVED = 2
    HANDED = 3
    LENT = 4


# The states of the fast paths (lend_top, give_back): the members, for entry.state, and plain
# ints, to index Entries.counts (CPython's quick list indexing takes exact ints only).
_IDLE, _HANDED, _LENT = State.IDLE, State.HANDED, State.LENT
_IDLE_AT, _HANDED_AT, _LENT_AT = int(_IDLE), int(_HANDED), int(_LENT)


class Entry:
    """The pool's bookkeeping for one connection (or one slot being connected)."""

    __slots__ = (
        "borrowed_at",
        "conn",
        "created_at",
        "expires_at",
        "holder",
        "key",
        "last_used",
        "owner",
        "poll",
        "ref",
        "since",
        "stack",
        "state",
        "suspect",
    )

    def __init__(self, now: float, owner: weakref.ReferenceType[Any] | None) -> None:
        self.state = State.OPENING
        self.owner = owner
        self.since = now
        self.conn: Any = None
        # A weakref.ref; typed as a plain callable so that `ref() is conn` keeps conn Any.
        self.ref: Callable[[], Any] | None = None
        self.key = 0
        self.created_at = self.last_used = self.borrowed_at = now
        self.expires_at = float("inf")
        self.stack: list[str] | None = None
        self.holder: int | None = None  # the borrowing thread's ident
        # The zero-timeout poll() of its socket (see _poll_of): truthy when readable.
        self.poll: Callable[[], Any] | None = None
        # Something arrived while idle and was read without a query (a sweep): a
        # notification, or a FATAL whose close has not arrived yet.  The next borrow checks
        # it with a query.
        self.suspect = False

    def attach(
        self,
        conn: Any,
        now: float,
        lifetime: float | None,
        on_lost: Callable[[weakref.ReferenceType[Any]], None],
        fileno: Callable[[Any], int],
    ) -> None:
        """Record the connection just opened in this slot (no lock needed: the entry is
        still its opener's alone); ``fileno`` is its driver's way to its socket."""
        self.ref = weakref.ref(conn, on_lost)
        self.conn = conn
        self.key = id(conn)
        self.created_at = self.last_used = self.borrowed_at = now
        if lifetime is not None:
            self.expires_at = now + lifetime * (1.0 - random.random() * LIFETIME_JITTER)
        self.poll = _poll_of(conn, fileno)

    def readable(self) -> bool:
        """True when the socket has something to read (or none to watch): the server sent
        something (a notification, a parameter change) or closed the connection.  One
        zero-timeout poll, no round trip; only reading it (the driver's ``read_input()``)
        tells the two apart."""
        return self.poll is None or bool(self.poll())

    def stranded(self) -> bool:
        """True when nobody can move this entry on: its owner is gone, or, lent, its
        connection was freed by its borrower."""
        if self.state is State.LENT:
            return self.ref is None or self.ref() is None
        if self.state is State.IDLE:
            return False
        return self.owner is None or self.owner() is None


class Entries:
    """Every entry of one pool, with the counts read off their states.

    Must be used with the pool's lock held.  Each method is one state change; the idle stack
    (most recently used on top) and the index of lent connections by ``id()`` follow the
    states and are rebuilt from them by :meth:`audit`.
    """

    __slots__ = ("all", "borrows", "counts", "idle", "lent")

    def __init__(self) -> None:
        self.all: set[Entry] = set()
        self.idle: list[Entry] = []
        self.lent: dict[int, Entry] = {}
        self.counts = [0] * len(State)
        # Counted as an entry becomes LENT; releases are borrows - lent, by construction.
        self.borrows = 0

    def __len__(self) -> int:
        return len(self.all)

    def add(self, entry: Entry) -> None:
        """A new slot, OPENING."""
        self.all.add(entry)
        self.counts[State.OPENING] += 1

    def move(
        self, entry: Entry, state: State, owner: weakref.ReferenceType[Any] | None, now: float
    ) -> None:
        """Move ``entry`` to ``state`` (not LENT or IDLE: see :meth:`lend`, :meth:`shelve`),
        owned by ``owner``."""
        self._leave(entry)
        self.counts[state] += 1
        entry.state = state
        entry.owner = owner
        entry.since = now

    def lend(self, entry: Entry, now: float, holder: int) -> Any:
        """Move ``entry`` to LENT and return its connection, which the pool no longer holds."""
        self._leave(entry)
        self.counts[_LENT_AT] += 1
        self.borrows += 1
        entry.state = _LENT
        conn = entry.conn
        entry.conn = None
        entry.owner = None
        entry.borrowed_at = now
        entry.holder = holder
        self.lent[entry.key] = entry
        return conn

    def lend_top(self, now: float, holder: int, handed: Entry | None = None) -> Any:
        """:meth:`lend` for the top of the idle stack (the fast path), or for ``handed``, an
        entry HANDED to the borrower now taking it up: the same step, inlined."""
        counts = self.counts
        if handed is None:
            entry = self.idle.pop()
            counts[_IDLE_AT] -= 1
        else:
            entry = handed
            counts[_HANDED_AT] -= 1
            entry.owner = None
        counts[_LENT_AT] += 1
        self.borrows += 1
        entry.state = _LENT
        conn = entry.conn
        entry.conn = None
        entry.borrowed_at = now
        entry.holder = holder
        self.lent[entry.key] = entry
        return conn

    def take_back(
        self,
        entry: Entry,
        conn: Any,
        owner: weakref.ReferenceType[Any] | None = None,
        now: float = 0.0,
    ) -> None:
        """Undo :meth:`lend_top` or :meth:`lend` of a connection the borrower did not get
        (its socket was readable, or the poll was interrupted), not counted as a borrow:
        IDLE on top again, or, with an ``owner``, RESERVED for it to check."""
        if owner is None:
            self.shelve(entry, conn)
        else:
            self.move(entry, State.RESERVED, owner, now)
            entry.conn = conn
        self.borrows -= 1

    def give_back(
        self,
        entry: Entry,
        conn: Any,
        now: float,
        owner: weakref.ReferenceType[Any] | None = None,
    ) -> None:
        """A lent ``entry`` comes back clean: IDLE, on top of the stack, or HANDED to the
        queued borrower ``owner`` (:meth:`shelve` and :meth:`move` for the release, inlined).
        Nobody holds it either way: no holder, no borrower's stack."""
        lent = self.lent
        key = entry.key
        if lent.get(key) is entry:
            del lent[key]
        counts = self.counts
        counts[_LENT_AT] -= 1
        entry.conn = conn
        entry.last_used = now
        entry.holder = None
        entry.stack = None
        if owner is None:
            counts[_IDLE_AT] += 1
            entry.state = _IDLE
            self.idle.append(entry)
        else:
            counts[_HANDED_AT] += 1
            entry.state = _HANDED
            entry.owner = owner
            entry.since = now

    def shelve(self, entry: Entry, conn: Any, *, bottom: bool = False) -> None:
        """Move ``entry`` (with its connection) to IDLE, on top of the stack (or at the
        bottom, for one that was not just used)."""
        self._leave(entry)
        self.counts[State.IDLE] += 1
        entry.state = State.IDLE
        entry.conn = conn
        entry.owner = None
        entry.holder = None
        entry.stack = None
        if bottom:
            self.idle.insert(0, entry)
        else:
            self.idle.append(entry)

    def remove(self, entry: Entry) -> Any:
        """Forget ``entry``; return its connection (None when lent or never opened) for the
        caller to close outside the lock."""
        if entry not in self.all:
            return None
        self._leave(entry)
        self.all.discard(entry)
        conn, entry.conn = entry.conn, None
        entry.owner = None
        return conn

    def _leave(self, entry: Entry) -> None:
        state = entry.state
        self.counts[state] -= 1
        if state is _LENT:
            lent = self.lent
            key = entry.key
            if lent.get(key) is entry:
                del lent[key]
        elif state is _IDLE:
            idle = self.idle
            if idle and idle[-1] is entry:
                del idle[-1]
            elif entry in idle:
                idle.remove(entry)

    @property
    def in_use(self) -> int:
        return self.counts[State.LENT]

    @property
    def releases(self) -> int:
        return self.borrows - self.counts[State.LENT]

    def audit(self) -> list[str]:
        """Recount from the states and rebuild the idle stack and the lent index; return
        what did not match (an interruption inside a state change), for the log."""
        found: list[str] = []
        counts = [0] * len(State)
        for entry in self.all:
            counts[entry.state] += 1
        if counts != self.counts:
            found.append(f"counts {self.counts} recounted as {counts}")
            self.counts = counts
        idle = [e for e in dict.fromkeys(self.idle) if e.state is State.IDLE and e in self.all]
        missing = [e for e in self.all if e.state is State.IDLE and e not in idle]
        if missing or len(idle) != len(self.idle):
            found.append("idle stack rebuilt")
            self.idle = missing + idle
        # Keyed by id(conn): a lent entry whose connection was freed (stranded, for the
        # repair to remove) may share its key with a live connection that reused the id;
        # the index must point at the live one.
        lent = {
            e.key: e
            for e in self.all
            if e.state is State.LENT and e.ref is not None and e.ref() is not None
        }
        if lent.keys() != self.lent.keys() or any(self.lent[k] is not e for k, e in lent.items()):
            found.append("lent index rebuilt")
            self.lent = lent
        return found


def _poll_of(conn: Any, fileno: Callable[[Any], int]) -> Callable[[], Any] | None:
    """The connection's socket check, made once per connection: a call with no arguments,
    one zero-timeout ``poll()``, truthy when the socket has something to read (or an error).
    None when there is no socket to watch (the check then falls back to a validation query).

    libc's ``poll()`` through ctypes' ``PyDLL``, which keeps the GIL, where ctypes has it;
    else ``select.poll``, which lets go of it.  ``select.poll().poll(0)`` lets go of the GIL
    for a call that never blocks: under load another thread then takes it, and the
    borrower, holding the connection it just took, waits to get it back (a context switch
    per borrow, and a connection idle meanwhile; measured in docs/benchmarks.md).  A zero
    timeout never blocks, so keeping the GIL costs nobody anything.

    The arguments are bound once (``functools.partial``; the descriptor as ``byref()``, the
    timeout as a plain int, which ctypes passes faster than a ``c_int``): about 330 ns a
    check against 460 for a method passing ``pointer()`` and ``c_int`` (docs/benchmarks.md),
    on a borrow's fast path.  An error (a descriptor closed under the check: ``POLLNVAL``)
    returns nonzero too, so the pool checks the connection with a query.
    """
    try:
        fd = fileno(conn)
        if _libc_poll is not None:
            pollfd = _PollFd(fd, select.POLLIN, 0)
            # byref() keeps pollfd alive; the timeout is C's int, what ctypes makes of 0.
            return functools.partial(_libc_poll, ctypes.byref(pollfd), _ONE, 0)
        poller = select.poll()
        poller.register(fd, select.POLLIN)
    except Exception:
        return None
    return functools.partial(poller.poll, 0)


class _PollFd(ctypes.Structure):
    _fields_ = (("fd", ctypes.c_int), ("events", ctypes.c_short), ("revents", ctypes.c_short))


def _held_poll() -> Callable[..., int] | None:
    """libc's poll() as a ctypes function that keeps the GIL, or None (then select.poll)."""
    try:
        function = ctypes.PyDLL(None).poll
    except (AttributeError, OSError):
        return None
    function.restype = ctypes.c_int
    # No argtypes: converting through them costs more than the system call.
    return function


_ONE = ctypes.c_ulong(1)  # nfds_t: one descriptor
_libc_poll = _held_poll()
