"""Fake connections and a fake clock for unit tests of the pool logic (no database).

:class:`FakeConnection` has the part of psycopg2's interface the pool's psycopg2 adapter
uses; :class:`FakePsycopg3Connection` adds what its psycopg 3 adapter uses (``pgconn``,
psycopg 3's ``rollback()`` and ``autocommit`` rules), raising psycopg's errors.
:class:`FakeDriver` makes connections of the flavour set by the ``flavour`` fixture
(tests/unit/conftest.py): every driver installed.
"""

from __future__ import annotations

import itertools
import select
import socket
import threading
import weakref
from typing import Any, ClassVar

import psycopg2
from psycopg2 import extensions as ext


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeCursor:
    def __init__(self, conn: FakeConnection) -> None:
        self.conn = conn

    def __enter__(self) -> FakeCursor:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def execute(self, sql: str, **kwargs: Any) -> None:
        conn = self.conn
        if conn.interrupt is not None:
            raise conn.interrupt
        if conn.hang:
            conn.wait_for_server()
        if conn.closed or conn.server_gone or conn.ending:
            conn.closed = 2
            raise conn.OperationalError("server closed the connection unexpectedly")
        conn.executed.append(sql)
        command = sql.strip().upper()
        if command == "BEGIN":
            conn.status = ext.TRANSACTION_STATUS_INTRANS
        elif command in ("ROLLBACK", "COMMIT"):
            conn.status = ext.TRANSACTION_STATUS_IDLE
        elif not conn.autocommit and conn.status == ext.TRANSACTION_STATUS_IDLE:
            conn.status = ext.TRANSACTION_STATUS_INTRANS


class FakeConnection:
    """Just the part of psycopg2's connection the pool uses, with a real socket.

    ``kill()`` closes the "server" end of the socket, as pg_terminate_backend or a
    server restart would: the pool's zero-timeout poll then sees it readable.
    ``hang = True`` makes every query wait for an answer that never comes, as on a
    frozen server, until something shuts the client socket down (the pool's deadline).
    ``interrupt`` is raised by the next query or rollback (a signal handler's exception).
    """

    OperationalError: ClassVar[type[Exception]] = psycopg2.OperationalError
    InterfaceError: ClassVar[type[Exception]] = psycopg2.InterfaceError

    _ids = itertools.count(1)
    # Weak: a test may drop every reference to a connection (a borrower that lost it); its
    # sockets are then closed as psycopg2's deallocation closes a connection's.
    instances: ClassVar[weakref.WeakSet[FakeConnection]] = weakref.WeakSet()

    def __init__(self) -> None:
        self.id = next(self._ids)
        self.closed = 0
        self.autocommit = True
        self.status = ext.TRANSACTION_STATUS_IDLE
        self.isolation_level: int | None = None
        self.readonly: bool | None = None
        self.deferrable: bool | None = None
        self.executed: list[str] = []
        self.rollbacks = 0
        self.server_gone = False
        # The server sent its FATAL and is closing: reading succeeds, a query fails.
        self.ending = False
        self.hang = False
        self.interrupt: BaseException | None = None
        self.notifies: list[object] = []
        self.notices: list[str] = []
        self._client, self._server = socket.socketpair()
        self._finalizer = weakref.finalize(self, _close_both, self._client, self._server)
        FakeConnection.instances.add(self)

    def __repr__(self) -> str:
        return f"<FakeConnection {self.id}>"

    def fileno(self) -> int:
        return self._client.fileno()

    def get_transaction_status(self) -> int:
        return ext.TRANSACTION_STATUS_UNKNOWN if self.closed else self.status

    def cursor(self) -> FakeCursor:
        return FakeCursor(self)

    def rollback(self) -> None:
        if self.closed:
            raise self.InterfaceError("connection already closed")
        if self.interrupt is not None:
            raise self.interrupt
        if self.hang:
            self.wait_for_server()
            self.closed = 2
            raise self.OperationalError("server closed the connection unexpectedly")
        self.rollbacks += 1
        if self.autocommit:
            return  # as psycopg2: in autocommit it sends nothing, whatever the server's state
        self.status = ext.TRANSACTION_STATUS_IDLE

    def poll(self) -> int:
        """As psycopg2's: read what the server sent (here: notifications); raise when the
        server closed the connection."""
        if self.closed:
            raise self.InterfaceError("connection already closed")
        if self.server_gone:
            self.closed = 2
            raise self.OperationalError("server closed the connection unexpectedly")
        while select.select([self._client], [], [], 0)[0]:
            data = self._client.recv(4096)
            if not data:
                self.closed = 2
                raise self.OperationalError("server closed the connection unexpectedly")
            self.notifies.extend(data.split())
        return ext.POLL_OK

    def notify(self, payload: bytes = b"hello") -> None:
        """The server sends a notification while the connection sits idle."""
        self._server.send(payload + b" ")

    def wait_for_server(self) -> None:
        """Block as libpq does on a silent server: until the socket is shut down."""
        select.select([self._client], [], [])

    def set_session(self, **kwargs: Any) -> None:
        self.isolation_level = self.readonly = self.deferrable = None

    def close(self) -> None:
        if not self.closed:
            self.closed = 1
            self._client.close()
            self._server.close()

    def dispose(self) -> None:
        """Free the sockets at the end of a test, whatever the pool did."""
        self._client.close()
        self._server.close()

    def kill(self) -> None:
        """The server ends this session while it sits idle."""
        self.server_gone = True
        self._server.close()

    def begin(self) -> None:
        """Simulate the application opening a transaction."""
        self.autocommit = False
        self.status = ext.TRANSACTION_STATUS_INTRANS


class FakePgconn:
    """psycopg 3's ``conn.pgconn``, as far as the adapter uses it.  Holds its connection
    weakly, as psycopg's handlers do: dropping the connection frees it at once."""

    def __init__(self, conn: FakePsycopg3Connection) -> None:
        self._conn = weakref.ref(conn)
        self._pending: list[object] = []
        self.notify_handler: Any = None

    def _get(self) -> FakePsycopg3Connection:
        conn = self._conn()
        assert conn is not None
        return conn

    @property
    def transaction_status(self) -> int:
        return self._get().get_transaction_status()

    @property
    def socket(self) -> int:
        conn = self._get()
        if conn.closed:
            raise conn.OperationalError("the connection is lost")
        return conn.fileno()

    def consume_input(self) -> None:
        """As libpq's: read the socket, raise when the server closed it."""
        conn = self._get()
        if conn.closed or conn.server_gone:
            conn.closed = 2
            raise conn.OperationalError("consuming input failed: server closed the connection")
        while select.select([conn._client], [], [], 0)[0]:
            data = conn._client.recv(4096)
            if not data:
                conn.closed = 2
                raise conn.OperationalError("consuming input failed: server closed the connection")
            self._pending.extend(data.split())

    def notifies(self) -> object | None:
        return self._pending.pop(0) if self._pending else None


def _stored_as(attribute: str) -> Any:
    """A property kept in ``attribute``, as psycopg 3 keeps its connection's."""
    return property(
        lambda self: getattr(self, attribute, None),
        lambda self, value: setattr(self, attribute, value),
    )


class FakePsycopg3Connection(FakeConnection):
    """:class:`FakeConnection` with psycopg 3's interface and rules: ``rollback()`` ends
    whatever the server has open (autocommit or not) and is refused inside a
    ``transaction()`` block; ``autocommit`` cannot change inside a transaction; no
    ``notices`` are kept; notifications wait in ``_notifies_backlog`` (the same list as
    ``notifies`` here, for the tests)."""

    # psycopg 3 keeps the session characteristics in private attributes behind properties;
    # the driver adapter reads the attributes.
    isolation_level = _stored_as("_isolation_level")
    read_only = _stored_as("_read_only")
    deferrable = _stored_as("_deferrable")

    def __init__(self) -> None:
        import psycopg

        self._psycopg = psycopg
        self._autocommit = True
        super().__init__()
        self.read_only = None
        self._num_transactions = 0
        self._pipeline: object | None = None
        self._tpc: object | None = None
        self.pgconn = FakePgconn(self)
        self.pgconn.notify_handler = self.notifies.append

    def __repr__(self) -> str:
        return f"<FakePsycopg3Connection {self.id}>"

    @property
    def OperationalError(self) -> type[Exception]:
        return self._psycopg.OperationalError

    @property
    def InterfaceError(self) -> type[Exception]:
        return self._psycopg.InterfaceError

    @property
    def _notifies_backlog(self) -> list[object]:
        return self.notifies

    @property
    def autocommit(self) -> bool:
        return self._autocommit

    @autocommit.setter
    def autocommit(self, value: bool) -> None:
        if getattr(self, "status", ext.TRANSACTION_STATUS_IDLE) != ext.TRANSACTION_STATUS_IDLE:
            raise self._psycopg.ProgrammingError("can't change 'autocommit' now")
        self._autocommit = value

    def rollback(self) -> None:
        if self._num_transactions:
            raise self._psycopg.ProgrammingError("Explicit rollback() forbidden")
        if self.closed:
            raise self.OperationalError("the connection is closed")
        if self.interrupt is not None:
            raise self.interrupt
        if self.hang:
            self.wait_for_server()
            self.closed = 2
            raise self.OperationalError("server closed the connection unexpectedly")
        self.rollbacks += 1
        if self.status != ext.TRANSACTION_STATUS_IDLE:
            self.executed.append("ROLLBACK")  # whatever opened it: a raw BEGIN too
            self.status = ext.TRANSACTION_STATUS_IDLE

    def begin(self) -> None:
        self.autocommit = False
        self.status = ext.TRANSACTION_STATUS_INTRANS


#: The fake connection class of each driver, by the driver's name.
FLAVOURS: dict[str, type[FakeConnection]] = {
    "psycopg2": FakeConnection,
    "psycopg": FakePsycopg3Connection,
}
#: The flavour FakeDriver makes: set by the ``flavour`` fixture.
flavour = "psycopg2"


def move_session(conn: FakeConnection) -> FakeConnection:
    """A pool's ``successor`` for fakes, as psycopg 3's: a new object takes over ``conn``'s
    socket and state (``moved_from`` names the old one); ``conn`` is left closed, holding
    nothing."""
    fresh = FakeConnection.__new__(type(conn))
    conn._finalizer.detach()
    fresh.__dict__ = conn.__dict__
    fresh.moved_from = conn.id  # type: ignore[attr-defined]
    fresh._finalizer = weakref.finalize(fresh, _close_both, fresh._client, fresh._server)
    pgconn = fresh.__dict__.get("pgconn")
    if pgconn is not None:  # psycopg 3's: its handlers follow the session
        pgconn._conn = weakref.ref(fresh)
    FakeConnection.instances.add(fresh)
    # Closed: its close() does nothing; the sockets only for the tests' final dispose().
    conn.__dict__ = {"id": conn.id, "closed": 1, "_client": fresh._client, "_server": fresh._server}
    return fresh


def _close_both(client: socket.socket, server: socket.socket) -> None:
    client.close()
    server.close()


class FakeDriver:
    """A connect() callable that records what it opened and can be made to fail.

    ``opened`` keeps every connection alive; with ``keep=False`` it holds them weakly, so a
    connection nobody else references is collected at once (psycopg2 then closes it)."""

    def __init__(self, *, keep: bool = True) -> None:
        self.keep = keep
        self.opened: list[FakeConnection] = []
        self.all: weakref.WeakSet[FakeConnection] = weakref.WeakSet()
        self.count = 0
        self.fail_with: BaseException | None = None
        self.lock = threading.Lock()

    def __call__(self) -> FakeConnection:
        if self.fail_with is not None:
            raise self.fail_with
        conn = FLAVOURS[flavour]()
        with self.lock:
            self.count += 1
            self.all.add(conn)
            if self.keep:
                self.opened.append(conn)
        return conn

    @property
    def open_count(self) -> int:
        """Connections opened and neither closed nor collected."""
        return sum(1 for conn in list(self.all) if not conn.closed)
