"""What the pool needs from a driver, once per driver: psycopg2 and psycopg 3.

The pool core (``pool.py``, ``_entries.py``) never touches a connection's driver-specific
interface itself; it calls the :class:`Driver` it was given or picked (see
:func:`for_connection`).  Each driver is one small class here, so what differs between
psycopg2 and psycopg 3 is written in one place:

- errors meaning a broken connection: ``psycopg2.Error`` / ``psycopg.Error``, and ``OSError``;
- transaction status: psycopg2's ``get_transaction_status()``; psycopg's
  ``pgconn.transaction_status``, or :data:`HELD` while its own ``transaction()`` block, a
  pipeline or a two-phase transaction is open;
- reading what arrived on an idle socket: psycopg2's ``poll()``; psycopg 3 has none:
  ``pgconn.consume_input()`` then ``pgconn.notifies()``, handing each notification to the
  connection's own handler, as psycopg's reading does;
- dropping unread messages: psycopg2's ``notifies`` and ``notices`` lists; psycopg's
  notifications backlog (it keeps no notices);
- ending a transaction: psycopg2's ``rollback()`` ends only a transaction it opened, so a raw
  ``BEGIN`` in autocommit needs a ``ROLLBACK`` statement; psycopg's ``rollback()`` ends
  whatever the server has open, in autocommit too;
- session characteristics: psycopg2's ``set_session(...="DEFAULT")``; psycopg's
  ``isolation_level`` / ``read_only`` / ``deferrable`` set to ``None``;
- one SQL string: a cursor; on psycopg never prepared (the simple query protocol: several
  statements are allowed, and nothing lands in psycopg's statement cache).

Transaction statuses are libpq's numbers (both drivers report those), plus :data:`HELD`.
Nothing here does I/O except :meth:`Driver.read_input`, :meth:`Driver.end_transaction`,
:meth:`Driver.reset_session` (psycopg2 only) and :meth:`Driver.execute`, which the pool
runs under a deadline.  Nothing here imports Django.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from operator import attrgetter
from typing import Any, Final

__all__ = [
    "ACTIVE",
    "HELD",
    "IDLE",
    "INERROR",
    "INTRANS",
    "UNKNOWN",
    "Driver",
    "Psycopg2",
    "Psycopg3",
    "available",
    "for_connection",
    "status_name",
]

# libpq's PGTransactionStatusType: psycopg2's TRANSACTION_STATUS_* and psycopg's
# pq.TransactionStatus have these values.
IDLE: Final = 0
ACTIVE: Final = 1
INTRANS: Final = 2
INERROR: Final = 3
UNKNOWN: Final = 4
#: A transaction the driver itself manages on the client side is still open (psycopg 3's
#: ``transaction()`` block, a pipeline, a two-phase transaction): only the code that opened
#: it may end it, and it will try to when its block ends, so the connection cannot be reused.
HELD: Final = 5

_STATUS_NAMES: Final = {
    IDLE: "IDLE",
    ACTIVE: "ACTIVE",
    INTRANS: "INTRANS",
    INERROR: "INERROR",
    UNKNOWN: "UNKNOWN",
    HELD: "HELD by a transaction() block, a pipeline or a two-phase transaction",
}


def status_name(status: int) -> str:
    """A normalised transaction status as text, for messages."""
    return _STATUS_NAMES.get(status, str(status))


def _unsupported(conn: Any) -> Any:
    raise NotImplementedError("a Driver subclass provides this")


class Driver:
    """The driver-specific half of the pool: one instance per driver, shared by every pool.

    Every method takes the connection as its argument.  Some are plain C callables
    (``operator.attrgetter``, an unbound method) rather than Python methods: they sit on
    the borrow / release fast path.
    """

    #: The driver's top-level package name: ``"psycopg2"`` or ``"psycopg"``.
    name: str = ""
    #: What the driver raises for a broken, closed or refused connection (plus ``OSError``),
    #: which the pool turns into a discard.  Anything else reaching the pool's handlers in a
    #: borrower's thread is an interruption (a signal handler's exception: Celery's
    #: SoftTimeLimitExceeded is an Exception): the pool cleans up as for any interruption
    #: and lets it propagate, never swallowing it.
    errors: tuple[type[BaseException], ...] = (OSError,)
    #: The driver's ``OperationalError``.
    operational_error: type[Exception] = OSError
    #: What a ``prepare_release`` hook raises for a session it cannot make new again:
    #: ``ValueError`` and :attr:`errors`.
    not_reusable: tuple[type[BaseException], ...] = (ValueError, OSError)

    #: Whether the connection is closed (by ``close()`` or broken).
    closed: Callable[[Any], Any] = staticmethod(attrgetter("closed"))

    def __repr__(self) -> str:
        return f"<herokupool driver {self.name}>"

    def adopt(self, conn: Any) -> None:
        """Called once for each connection the pool opens, before anyone uses it."""

    #: ``transaction_status(conn)``: :data:`IDLE`, :data:`ACTIVE`, :data:`INTRANS`,
    #: :data:`INERROR`, :data:`UNKNOWN` or :data:`HELD`.  The connection must not be closed.
    transaction_status: Callable[[Any], int] = staticmethod(_unsupported)
    #: ``fileno(conn)``: the connection's socket (raises one of :attr:`errors` when it has
    #: none).
    fileno: Callable[[Any], int] = staticmethod(_unsupported)
    #: ``read_input(conn)``: read what arrived on an idle connection's socket
    #: (notifications, parameter changes, a notice); raise one of :attr:`errors` when the
    #: server closed it.
    read_input: Callable[[Any], object] = staticmethod(_unsupported)

    def forget_messages(self, conn: Any) -> None:
        """Drop the notifications and notices nobody read: the next borrower must not see
        them, and nothing may grow without bound on a pooled connection.  No I/O."""
        raise NotImplementedError

    def session_changed(self, conn: Any) -> bool:
        """Whether the isolation level, read-only or deferrable setting was changed on the
        connection object (what :meth:`reset_session` undoes).  No I/O."""
        raise NotImplementedError

    def untouched(self, conn: Any) -> bool:
        """True when the connection is open, idle, in autocommit and its session
        characteristics unchanged: nothing to undo.  The release fast path: one call where
        :attr:`closed`, :meth:`transaction_status` and :meth:`session_changed` would be
        three.  No I/O."""
        return (
            not self.closed(conn)
            and self.transaction_status(conn) == IDLE
            and bool(conn.autocommit)
            and not self.session_changed(conn)
        )

    def end_transaction(self, conn: Any) -> None:
        """Roll back whatever transaction is open (the driver's own, or a raw ``BEGIN``
        sent in autocommit) and leave the connection in autocommit."""
        raise NotImplementedError

    def reset_session(self, conn: Any) -> None:
        """Put the session characteristics back to the server's defaults.  Outside a
        transaction."""
        raise NotImplementedError

    def execute(self, conn: Any, sql: str) -> None:
        """Run ``sql`` (one or more statements, no parameters), discarding any result."""
        raise NotImplementedError


class Psycopg2(Driver):
    """psycopg2 2.9.

    ``lookalike=True`` serves objects that only have psycopg2's interface (test doubles):
    it calls their methods by name, where the adapter for real connections calls
    psycopg2's own C methods, a tenth of the time on the release fast path.
    """

    def __init__(self, *, lookalike: bool = False) -> None:
        import psycopg2
        from psycopg2 import extensions as ext

        self.name = "psycopg2"
        self.errors = (psycopg2.Error, OSError)
        self.not_reusable = (ValueError, *self.errors)
        self.operational_error = psycopg2.OperationalError
        # poll() reads what is there, dispatching notifications into conn.notifies and
        # notices into conn.notices; it raises OperationalError for a closed connection.
        if lookalike:
            self.transaction_status = _call("get_transaction_status")
            self.fileno = _call("fileno")
            self.read_input = _call("poll")
        else:
            # psycopg2's unbound C methods: no Python frame (operator.methodcaller would
            # cost ten times as much), and TypeError for anything not a psycopg2
            # connection, which for_connection() never hands this adapter.
            self.transaction_status = ext.connection.get_transaction_status
            self.fileno = ext.connection.fileno
            self.read_input = ext.connection.poll

    def forget_messages(self, conn: Any) -> None:
        if conn.notifies:
            conn.notifies.clear()
        if conn.notices:
            conn.notices.clear()

    def session_changed(self, conn: Any) -> bool:
        return (
            conn.isolation_level is not None
            or conn.readonly is not None
            or conn.deferrable is not None
        )

    def untouched(self, conn: Any) -> bool:
        # Inline: the release fast path (get_transaction_status() raises once closed).
        return (
            not conn.closed
            and conn.get_transaction_status() == IDLE
            and conn.autocommit
            and conn.isolation_level is None
            and conn.readonly is None
            and conn.deferrable is None
        )

    def end_transaction(self, conn: Any) -> None:
        if not conn.autocommit:
            conn.rollback()  # psycopg2's own transaction, if any
            conn.autocommit = True
        if conn.get_transaction_status() != IDLE:
            # Opened with a raw BEGIN in autocommit: psycopg2's rollback() sends nothing
            # then, because it did not open it.
            self.execute(conn, "ROLLBACK")

    def reset_session(self, conn: Any) -> None:
        conn.set_session(isolation_level="DEFAULT", readonly="DEFAULT", deferrable="DEFAULT")

    def execute(self, conn: Any, sql: str) -> None:
        with conn.cursor() as cursor:
            cursor.execute(sql)


class Psycopg3(Driver):
    """psycopg 3.2 or later (the ``psycopg`` package)."""

    def __init__(self) -> None:
        # Not a plain import: psycopg2-only installs type-check this module too.
        psycopg = importlib.import_module("psycopg")

        self.name = "psycopg"
        self.errors = (psycopg.Error, OSError)
        self.not_reusable = (ValueError, *self.errors)
        self.operational_error = psycopg.OperationalError

    def adopt(self, conn: Any) -> None:
        # What psycopg_pool does to its connections: psycopg then does not warn
        # (ResourceWarning) when one is freed while open.  The pool holds lent connections
        # weakly so that one its borrower lost is freed, closed by psycopg, and reported by
        # the pool itself; a child process keeps inherited ones until it exits.  Nothing
        # else in psycopg reads a None _pool (close() returns to a pool only a true one).
        conn._pool = None

    def transaction_status(self, conn: Any) -> int:
        # Private attributes, read here only: psycopg refuses rollback() inside its own
        # transaction() block and rollback() or autocommit changes during a two-phase
        # transaction, and the block's exit would later act on whoever holds the
        # connection then.  A pipeline left open has results nobody will read.
        if conn._num_transactions or conn._pipeline is not None or conn._tpc is not None:
            return HELD
        return int(conn.pgconn.transaction_status)

    def fileno(self, conn: Any) -> int:
        return int(conn.pgconn.socket)  # raises OperationalError when there is none

    def read_input(self, conn: Any) -> None:
        # psycopg 3 has no poll(): consume_input() reads the socket (raising
        # OperationalError, and marking the connection closed, when the server closed
        # it); notifies() parses what was read (parameter statuses and notices are
        # handled by libpq as it goes) and returns the notifications, which go where
        # psycopg's own reading sends them: the handlers, else the backlog.
        pgconn = conn.pgconn
        pgconn.consume_input()
        while (notify := pgconn.notifies()) is not None:
            handler = pgconn.notify_handler
            if handler is not None:
                handler(notify)

    def forget_messages(self, conn: Any) -> None:
        # Notices only ever go to handlers; notifications with no handler wait in the
        # backlog for notifies() (None while a notifies() generator runs).
        backlog = conn._notifies_backlog
        if backlog:
            backlog.clear()

    def session_changed(self, conn: Any) -> bool:
        return (
            conn.isolation_level is not None
            or conn.read_only is not None
            or conn.deferrable is not None
        )

    def untouched(self, conn: Any) -> bool:
        # Inline, and what psycopg's properties return read without them: the release fast
        # path.  A closed connection's status is UNKNOWN (libpq), so it is never found
        # untouched.
        return (
            conn.pgconn.transaction_status == IDLE
            and not conn._num_transactions
            and conn._pipeline is None
            and conn._tpc is None
            and conn._autocommit
            and conn._isolation_level is None
            and conn._read_only is None
            and conn._deferrable is None
        )

    def end_transaction(self, conn: Any) -> None:
        # psycopg 3's rollback() sends ROLLBACK whenever the server's transaction status
        # is not IDLE, in autocommit too: a raw BEGIN is ended with no extra step.  (It
        # refuses inside a transaction() block: transaction_status() says HELD there,
        # and the pool never gets here.)
        conn.rollback()
        if not conn.autocommit:
            conn.autocommit = True

    def reset_session(self, conn: Any) -> None:
        # Client-side only: psycopg 3 sends these with each BEGIN, nothing to the server.
        if conn.isolation_level is not None:
            conn.isolation_level = None
        if conn.read_only is not None:
            conn.read_only = None
        if conn.deferrable is not None:
            conn.deferrable = None

    def execute(self, conn: Any, sql: str) -> None:
        # prepare=False: the simple query protocol (several statements allowed), and the
        # pool's own queries never become server-side prepared statements.
        with conn.cursor() as cursor:
            cursor.execute(sql, prepare=False)


def _call(method: str) -> Callable[[Any], Any]:
    def call(conn: Any) -> Any:
        return getattr(conn, method)()

    return call


_made: dict[str, Driver] = {}
_CLASSES: Final[dict[str, type[Driver]]] = {"psycopg2": Psycopg2, "psycopg": Psycopg3}


def get(name: str) -> Driver:
    """The driver adapter for ``"psycopg2"`` or ``"psycopg"`` (made once); ``ImportError``
    when that driver is not installed, ``ValueError`` for another name."""
    driver = _made.get(name)
    if driver is None:
        if name not in _CLASSES:
            raise ValueError(f"no herokupool driver named {name!r}: use 'psycopg2' or 'psycopg'")
        driver = _made[name] = _CLASSES[name]()
    return driver


def available() -> list[str]:
    """The names of the drivers installed and importable, psycopg2 first."""
    names = []
    for name in _CLASSES:
        if importlib.util.find_spec(name) is None:
            continue
        try:
            get(name)
        except ImportError:  # psycopg without a libpq it can load
            continue
        names.append(name)
    return names


def for_connection(conn: Any) -> Driver:
    """The driver a connection comes from: by the package its class (or a base class) is
    defined in, else by its interface (``pgconn``: psycopg 3; ``get_transaction_status()``:
    psycopg2, by an adapter for look-alikes).  ``TypeError`` when neither matches."""
    for cls in type(conn).__mro__:
        package = cls.__module__.partition(".")[0]
        if package in _CLASSES:
            return get(package)
    if hasattr(conn, "pgconn"):  # psycopg2's connections have none (only pgconn_ptr)
        return get("psycopg")
    if hasattr(conn, "get_transaction_status"):
        lookalike = _made.get("psycopg2 lookalike")
        if lookalike is None:
            lookalike = _made["psycopg2 lookalike"] = Psycopg2(lookalike=True)
        return lookalike
    raise TypeError(
        f"herokupool cannot pool {type(conn).__qualname__} objects: "
        "connect() must return a psycopg2 or psycopg 3 connection"
    )
