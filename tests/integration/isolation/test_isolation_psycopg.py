"""Issue 15's guarantees where psycopg 3 differs from psycopg2 (issue 17).

psycopg 3 has its own ways into a session: ``Connection.execute()``, ``transaction()``
blocks, notification and notice handlers, an adapters map per connection, connection-level
``cursor_factory`` / ``row_factory`` / ``prepare_threshold``, and statements it prepares
on the server by itself.  Each test runs on the stock engine (the control: a new session
per request) and on herokupool's (``MAX_CONNS`` 1: provably the same physical session, or
a replaced one where the promise is to close it).  Those about a driver-neutral behaviour
(a raw ``BEGIN``, Django's server-side cursors) run on psycopg2 too.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import pytest
from django.db import (
    DatabaseError,
    OperationalError,
    close_old_connections,
    connections,
    transaction,
)

from tests.conftest import Server
from tests.helpers import Interrupted, interrupting
from tests.integration.isolation.conftest import (
    DRIVER,
    in_thread,
    is_pooled,
    one,
    pid_of,
    request,
)
from tests.testapp.models import Item

pytestmark = pytest.mark.integration

ONLY_PSYCOPG3 = pytest.mark.psycopg3_only


@pytest.fixture(scope="module")
def items_url(pg_server: Server) -> str:
    """A database of this module's own with testapp's Item table, three rows."""
    url = pg_server.create_database(f"hp_pg3_{uuid.uuid4().hex[:10]}")
    conn = psycopg2.connect(url)  # set-up: psycopg2 is always installed
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute(
            "CREATE TABLE testapp_item (id bigserial PRIMARY KEY, name varchar(100) NOT NULL,"
            " data jsonb NOT NULL DEFAULT '{}', created timestamptz NOT NULL DEFAULT now())"
        )
        cursor.execute("INSERT INTO testapp_item (name) VALUES ('a'), ('b'), ('c')")
    conn.close()
    return url


def raw(wrapper: Any) -> Any:
    wrapper.ensure_connection()
    return wrapper.connection


# ------------------------------------------------------------ transactions the driver ends


def test_a_raw_begin_in_autocommit_is_rolled_back_when_the_request_ends(
    register: Callable[..., str], engine: str, items_url: str
) -> None:
    """``BEGIN`` sent through a raw cursor in autocommit (psycopg 3's ``rollback()`` ends it,
    psycopg2's does not, the pool must either way): its insert is gone, the next request
    on that session is outside any transaction."""
    alias = register(url=items_url)
    name = f"raw-begin-{uuid.uuid4().hex[:6]}"

    def begin(wrapper: Any) -> int:
        with raw(wrapper).cursor() as cursor:
            cursor.execute("BEGIN")
            cursor.execute("INSERT INTO testapp_item (name) VALUES (%s)", [name])
        return pid_of(wrapper)

    def look(wrapper: Any) -> tuple[Any, ...]:
        return (
            one(wrapper, "SELECT count(*) FROM testapp_item WHERE name = %s", [name])[0],
            one(wrapper, "SELECT now() = statement_timestamp()")[0],  # no open transaction
            pid_of(wrapper),
        )

    pid1 = in_thread(lambda: request(alias, begin))
    count, fresh_transaction, pid2 = in_thread(lambda: request(alias, look))
    assert (count, fresh_transaction) == (0, True)
    if is_pooled(engine):
        assert pid2 == pid1, "rolled back, not closed"


@ONLY_PSYCOPG3
def test_a_transaction_block_left_open_closes_its_session(
    register: Callable[..., str], engine: str, items_url: str
) -> None:
    """``with connection.connection.transaction():`` suspended in a generator when the
    request ends: the block belongs to the connection, and when the generator is finally
    closed its exit would act on whoever holds the session then.  The session is closed
    (as the stock engine's): the next request gets another one, sees nothing of the
    block's insert, and the block's late exit fails on its own."""
    alias = register(url=items_url)
    name = f"tx-open-{uuid.uuid4().hex[:6]}"

    def open_block(wrapper: Any) -> Iterator[None]:
        with raw(wrapper).transaction(), raw(wrapper).cursor() as cursor:
            cursor.execute("INSERT INTO testapp_item (name) VALUES (%s)", [name])
            yield

    def start(wrapper: Any) -> tuple[Iterator[None], int]:
        block = open_block(wrapper)
        next(block)
        return block, pid_of(wrapper)

    block, pid1 = request(alias, start)

    def look(wrapper: Any) -> tuple[int, int]:
        count = one(wrapper, "SELECT count(*) FROM testapp_item WHERE name = %s", [name])[0]
        return count, pid_of(wrapper)

    count, pid2 = in_thread(lambda: request(alias, look))
    assert count == 0
    if is_pooled(engine):
        assert pid2 != pid1, "the session of a block still open is not lent again"
    # GeneratorExit: the block ends on a closed connection (psycopg sends nothing then).
    with contextlib.suppress(DRIVER.Error):
        block.close()
    assert in_thread(lambda: request(alias, look))[0] == 0


# ------------------------------------------------------------ Django's server-side cursors


def test_django_server_side_cursors_work_and_end_with_their_request(
    register: Callable[..., str], engine: str, items_url: str
) -> None:
    """``QuerySet.iterator()`` (Django names the cursor ``_django_curs_...``; in autocommit
    it is ``WITH HOLD``) in and out of ``atomic()``: the rows come, and the next request on
    the session has no cursor left open."""
    alias = register(url=items_url)

    def iterate(wrapper: Any) -> tuple[list[str], list[str], Any, int]:
        outside = [item.name for item in Item.objects.using(alias).order_by("id").iterator(1)]
        with transaction.atomic(using=alias):
            inside = [i.name for i in Item.objects.using(alias).order_by("id").iterator(1)][:3]
        cursor = wrapper.chunked_cursor()  # executed, and still open at the request's end
        cursor.execute("SELECT name FROM testapp_item")
        cursor.fetchone()
        return outside[:3], inside, cursor, pid_of(wrapper)

    outside, inside, kept, pid1 = in_thread(lambda: request(alias, iterate))
    assert outside == inside == ["a", "b", "c"]
    cursors, pid2 = in_thread(
        lambda: request(alias, lambda w: (one(w, "SELECT count(*) FROM pg_cursors")[0], pid_of(w)))
    )
    assert cursors == 0
    with contextlib.suppress(DRIVER.Error):
        kept.close()  # late, as a generator's finalizer would: sends nothing
    if is_pooled(engine):
        assert pid2 == pid1


# ------------------------------------------------------------ client-side state (psycopg 3)


def _loader() -> Any:
    from psycopg.types.string import TextLoader

    class Int4AsText(TextLoader):
        def load(self, data: Any) -> Any:
            return f"cast:{bytes(data).decode()}"

    return Int4AsText


#: name -> what request 1 does to the raw connection (and checks it took effect)
CLIENT_CHANGES: dict[str, Callable[[Any], None]] = {
    "adapters_register_loader": lambda conn: conn.adapters.register_loader("int4", _loader()),
    "row_factory": lambda conn: setattr(conn, "row_factory", __import__("psycopg").rows.dict_row),
    "cursor_factory": lambda conn: setattr(conn, "cursor_factory", __import__("psycopg").Cursor),
    "prepare_threshold": lambda conn: setattr(conn, "prepare_threshold", 0),
    "prepared_max": lambda conn: setattr(conn, "prepared_max", 1),
}


def _name(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _client_state(wrapper: Any) -> tuple[Any, ...]:
    """What the raw connection gives a new cursor, read without Django's cursor (which a
    changed ``row_factory`` breaks)."""
    from psycopg.rows import tuple_row

    conn = raw(wrapper)
    with conn.cursor(row_factory=tuple_row) as cursor:
        cursor.execute("SELECT 7::int4")
        seven = cursor.fetchone()[0]
    return (
        seven,
        _name(conn.row_factory),
        _name(conn.cursor_factory),
        conn.prepare_threshold,
        conn.prepared_max,
    )


@ONLY_PSYCOPG3
@pytest.mark.parametrize("change", list(CLIENT_CHANGES))
def test_client_side_state_set_on_the_raw_connection_ends_with_its_request(
    register: Callable[..., str], engine: str, change: str
) -> None:
    """A loader registered on ``connection.connection.adapters``, a ``row_factory``,
    ``cursor_factory``, ``prepare_threshold`` or ``prepared_max`` set on it in request 1:
    request 2, on the same session, sees a new connection's (restored, nothing sent)."""
    alias = register()
    fresh = in_thread(lambda: request(alias, _client_state))

    def customise(wrapper: Any) -> int:
        pid = pid_of(wrapper)
        CLIENT_CHANGES[change](raw(wrapper))
        assert _client_state(wrapper) != fresh, "the change took effect"
        return pid

    pid1 = in_thread(lambda: request(alias, customise))

    def look(wrapper: Any) -> tuple[Any, int]:
        return _client_state(wrapper), int(raw(wrapper).info.backend_pid)

    seen, pid2 = in_thread(lambda: request(alias, look))
    assert seen == fresh
    if is_pooled(engine):
        assert pid2 == pid1, "restored on the client, the session kept"


def _own_cursor_class() -> Any:
    import psycopg

    class OwnCursor(psycopg.ClientCursor):  # type: ignore[type-arg]
        made_as: type | None = None

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.made_as = type(self)

    return OwnCursor


def _by_class(conn: Any) -> tuple[Any, type]:
    cls = _own_cursor_class()
    conn.cursor_factory = cls
    cursor = conn.cursor()
    assert cursor.made_as is type(cursor), "built as what it is"
    cursor.execute("SELECT 1")
    return cursor, cls


def _by_function(conn: Any) -> tuple[Any, type]:
    import psycopg

    conn.cursor_factory = lambda conn, row_factory=None: psycopg.ClientCursor(
        conn, row_factory=row_factory
    )
    cursor = conn.cursor()
    cursor.execute("SELECT 1")
    return cursor, psycopg.ClientCursor


class _Factory:
    """A callable object as ``cursor_factory``, unhashable (``__eq__`` without ``__hash__``)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Factory)

    def __call__(self, conn: Any, row_factory: Any = None) -> Any:
        import psycopg

        return psycopg.ClientCursor(conn, row_factory=row_factory)


def _by_callable_object(conn: Any) -> tuple[Any, type]:
    import psycopg

    conn.cursor_factory = _Factory()
    cursor = conn.cursor()
    cursor.execute("SELECT 1")
    return cursor, psycopg.ClientCursor


def _by_execute(conn: Any) -> tuple[Any, type]:
    return conn.execute("SELECT 1"), conn.cursor_factory


#: name -> how request 1 makes a cursor on the raw connection; returns it and its kind
MADE_CURSORS: dict[str, Callable[[Any], tuple[Any, type]]] = {
    "cursor_factory_class": _by_class,
    "cursor_factory_function": _by_function,
    "cursor_factory_unhashable_object": _by_callable_object,
    "connection_execute": _by_execute,
}


@ONLY_PSYCOPG3
@pytest.mark.parametrize("made", list(MADE_CURSORS))
def test_cursors_made_by_the_connection_are_what_was_asked_and_end_with_their_request(
    register: Callable[..., str], engine: str, made: str
) -> None:
    """A cursor the raw connection makes (its ``cursor_factory`` a class of the borrower's,
    built once, as itself; a function; an unhashable callable object; ``conn.execute()``)
    is of the kind asked for and works; kept past the request it fails as on a closed
    connection.  The next request, on the same session, gets Django's own cursors again."""
    import psycopg

    alias = register()
    django_factory = in_thread(lambda: request(alias, lambda w: raw(w).cursor_factory))

    def first(wrapper: Any) -> tuple[Any, int]:
        cursor, kind = MADE_CURSORS[made](raw(wrapper))
        assert isinstance(cursor, kind)
        assert cursor.fetchone() == (1,)
        return cursor, pid_of(wrapper)

    stale, pid1 = in_thread(lambda: request(alias, first))
    with pytest.raises(psycopg.OperationalError, match="the connection is closed"):
        stale.execute("SELECT 2")

    def second(wrapper: Any) -> tuple[Any, Any, int]:
        return raw(wrapper).cursor_factory, one(wrapper, "SELECT 3")[0], pid_of(wrapper)

    factory, three, pid2 = in_thread(lambda: request(alias, second))
    assert (factory, three) == (django_factory, 3)
    if is_pooled(engine):
        assert pid2 == pid1, "the session kept"


@ONLY_PSYCOPG3
def test_handlers_and_notifications_of_a_request_are_not_seen_by_the_next(
    register: Callable[..., str], engine: str
) -> None:
    """Request 1 adds a notice handler and a notification handler to the raw connection,
    then LISTENs and is sent a notification it never reads, with a handler that it
    removes first.  Request 2, on the same session: its notices and notifications reach
    none of request 1's handlers, and ``notifies()`` has nothing of request 1's."""
    alias = register()
    channel = f"hp_{uuid.uuid4().hex[:8]}"
    seen_by_request_1: list[str] = []

    def first(wrapper: Any) -> int:
        conn = raw(wrapper)
        conn.add_notice_handler(lambda diag: seen_by_request_1.append(diag.message_primary))
        conn.add_notify_handler(lambda notify: seen_by_request_1.append(notify.payload))
        one(wrapper, "DO $$ BEGIN RAISE NOTICE 'hp-notice-1'; END $$")
        assert seen_by_request_1 == ["hp-notice-1"]
        conn.execute(f"LISTEN {channel}")
        return pid_of(wrapper)

    pid1 = in_thread(lambda: request(alias, first))

    def second(wrapper: Any) -> tuple[list[str], int]:
        conn = raw(wrapper)
        one(wrapper, "DO $$ BEGIN RAISE NOTICE 'hp-notice-2'; END $$")
        conn.execute(f"LISTEN {channel}")
        conn.execute(f"NOTIFY {channel}, 'hp-2'")
        payloads = [n.payload for n in conn.notifies(timeout=0.5, stop_after=1)]
        return payloads, pid_of(wrapper)

    payloads, pid2 = in_thread(lambda: request(alias, second))
    assert seen_by_request_1 == ["hp-notice-1"], "request 1's handlers were removed"
    assert payloads == ["hp-2"]
    if is_pooled(engine):
        assert pid2 == pid1


@ONLY_PSYCOPG3
def test_a_raw_connection_kept_past_its_request_is_closed_and_the_session_goes_on(
    register: Callable[..., str], engine: str
) -> None:
    """Request 1 keeps its raw connection. Afterwards that object is a closed connection,
    as on the stock engine after ``close()``: ``closed``, psycopg's "the connection is
    closed" from ``execute()`` and ``cursor()``, ``close()`` a no-op. The session goes on
    (herokupool: the same backend) in another object, where each later request's own
    notice and notification handlers get its notices and notifications."""
    import psycopg

    alias = register()
    channel = f"hp_{uuid.uuid4().hex[:8]}"
    kept: list[Any] = []

    def first(wrapper: Any) -> int:
        kept.append(raw(wrapper))
        return pid_of(wrapper)

    pid1 = in_thread(lambda: request(alias, first))
    stale = kept[0]
    assert stale.closed, "closed as the request ended"
    with pytest.raises(psycopg.OperationalError, match="the connection is closed"):
        stale.execute("SELECT 1")
    with pytest.raises(psycopg.OperationalError, match="the connection is closed"):
        stale.cursor()
    stale.close()  # closed already: nothing

    def later(wrapper: Any) -> tuple[Any, list[str], int]:
        conn = raw(wrapper)
        heard: list[str] = []
        conn.add_notice_handler(lambda diag: heard.append(diag.message_primary))
        conn.add_notify_handler(lambda notify: heard.append(notify.payload))
        one(wrapper, "DO $$ BEGIN RAISE NOTICE 'hp-notice'; END $$")
        conn.execute(f"LISTEN {channel}")
        conn.execute(f"NOTIFY {channel}, 'hp-notify'")
        one(wrapper, "SELECT 1")
        return conn, heard, pid_of(wrapper)

    seen = [in_thread(lambda: request(alias, later)) for _ in range(3)]
    objects = [stale] + [conn for conn, _, _ in seen]
    assert len({id(conn) for conn in objects}) == len(objects), "an object per request"
    assert all(conn.closed for conn in objects)
    assert [heard for _, heard, _ in seen] == [["hp-notice", "hp-notify"]] * 3
    if is_pooled(engine):
        assert {pid for _, _, pid in seen} == {pid1}, "MAX_CONNS=1: one session throughout"


@ONLY_PSYCOPG3
def test_a_cache_keyed_weakly_by_the_raw_connection_forgets_it_with_its_request(
    register: Callable[..., str], engine: str
) -> None:
    """A library caching per connection (a ``WeakKeyDictionary`` keyed by
    ``connection.connection``, a plain weak reference): with Django's own backend the
    entry goes when the request's connection is closed and dropped; with herokupool's too,
    although the session lives on in the pool (in another object)."""
    import weakref

    alias = register()
    cache: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
    refs: list[Any] = []

    def first(wrapper: Any) -> int:
        conn = raw(wrapper)
        cache[conn] = "registered types"
        refs.append(weakref.ref(conn))
        return pid_of(wrapper)

    pid1 = in_thread(lambda: request(alias, first))
    pid2, cached = in_thread(lambda: request(alias, lambda w: (pid_of(w), raw(w) in cache)))
    assert not cached, "a new request's connection is not the cached one"
    assert len(cache) == 0
    assert refs[0]() is None
    if is_pooled(engine):
        assert pid2 == pid1


@ONLY_PSYCOPG3
@pytest.mark.parametrize("goes", ["released", "closed"])
def test_an_interruption_as_a_connection_object_goes_is_never_swallowed(
    dsn: str, goes: str
) -> None:
    """A connection object goes at nearly every release (``released``: the session moves to
    a new one) and whenever the pool closes one (``closed``: expired, discarded, lost). An
    exception a signal handler raises while it goes (Celery's soft time limit in a task
    that borrows and releases in a loop) must reach the loop: landing in a finalizer's
    Python code it would be printed and dropped, and the task would never stop (found by
    the Celery test: with psycopg's own ``__del__`` about half of such interruptions were
    lost)."""
    from herokupool.tracked_psycopg import TrackedConnection, successor

    conn = TrackedConnection.connect(dsn, autocommit=True)
    conn._pool = None  # as the pool marks its connections (herokupool.drivers)
    if goes == "closed":
        conn.close()
        state = conn.__dict__

        def step() -> None:
            gone = TrackedConnection.__new__(TrackedConnection)
            gone.__dict__ = dict(state)  # a closed pooled connection, freed right here

    else:

        def step() -> None:
            nonlocal conn
            conn = successor(conn)

    stopped = ran_out = 0
    try:
        for _ in range(300):
            try:
                with interrupting(0.00002):
                    for _ in range(20_000):
                        step()
                ran_out += 1
            except Interrupted:
                stopped += 1
    finally:
        conn.close()
    assert (stopped, ran_out) == (300, 0)


@ONLY_PSYCOPG3
def test_an_unread_notification_is_not_read_by_the_next_request(
    register: Callable[..., str], engine: str
) -> None:
    """A notification request 1 received (LISTEN, NOTIFY) but never read waits in
    psycopg's backlog: request 2 on the same session must not get it from ``notifies()``."""
    alias = register()
    channel = f"hp_{uuid.uuid4().hex[:8]}"

    def first(wrapper: Any) -> int:
        conn = raw(wrapper)
        conn.execute(f"LISTEN {channel}")
        conn.execute(f"NOTIFY {channel}, 'hp-secret-1'")
        one(wrapper, "SELECT 1")  # the notification arrives with this result
        return pid_of(wrapper)

    pid1 = in_thread(lambda: request(alias, first))

    def second(wrapper: Any) -> tuple[list[str], int]:
        conn = raw(wrapper)
        conn.execute(f"LISTEN {channel}")
        payloads = [n.payload for n in conn.notifies(timeout=0.3)]
        return payloads, pid_of(wrapper)

    payloads, pid2 = in_thread(lambda: request(alias, second))
    assert payloads == []
    if is_pooled(engine):
        assert pid2 == pid1


# ------------------------------------------------------------ prepared statements

#: Django's options for statements psycopg prepares: server-side binding (its client-side
#: cursors never prepare) and preparing after two executions.
PREPARING = {"server_side_binding": True, "prepare_threshold": 2}

PREPARED = (
    "SELECT name, generic_plans + custom_plans FROM pg_prepared_statements"
    " WHERE statement LIKE %s ORDER BY name"
)


def orm_query(alias: str) -> list[str]:
    return list(
        Item.objects.using(alias).filter(name__in=["a", "c"]).values_list("name", flat=True)
    )


#: The statements a request PREPAREd itself (psycopg's are named _pg3_N).
OWN_PREPARED = r"SELECT name FROM pg_prepared_statements WHERE name NOT LIKE '\_pg3%' ORDER BY 1"


def prepared_item_queries(wrapper: Any) -> list[tuple[str, int]]:
    return [tuple(row) for row in _rows(wrapper, PREPARED, ["%testapp_item%name%IN%"])]


def _rows(wrapper: Any, sql: str, params: Any = None) -> list[Any]:
    with wrapper.cursor() as cursor:
        cursor.execute(sql, params)
        return list(cursor.fetchall())


@pytest.fixture
def preparing(register: Callable[..., str], engine: str, items_url: str) -> Callable[..., str]:
    """``preparing(**OPTIONS)``: this test's alias with :data:`PREPARING`.  For herokupool's
    engine only (the stock engine's session ends with each request: nothing to keep)."""
    assert is_pooled(engine)

    def make(**pool: Any) -> str:
        return register(url=items_url, pool=pool, **PREPARING)

    return make


@ONLY_PSYCOPG3
@pytest.mark.parametrize("engine", ["herokupool.db.backends.postgresql"], indirect=True)
def test_an_orm_query_is_prepared_once_and_executed_by_name_across_requests(
    preparing: Callable[..., str],
) -> None:
    """The same ORM query in 10 consecutive requests on one pooled session: psycopg
    prepares it at its third execution (``prepare_threshold`` 2), and every later request
    executes that statement by name; the server shows one statement, executed 8 times."""
    alias = preparing()
    pids = set()
    for _ in range(10):
        names, pid = in_thread(lambda: request(alias, lambda w: (orm_query(alias), pid_of(w))))
        assert sorted(names) == ["a", "c"]
        pids.add(pid)
    assert len(pids) == 1, "MAX_CONNS=1: one physical session"
    statements = in_thread(lambda: request(alias, prepared_item_queries))
    assert len(statements) == 1, statements
    name, executions = statements[0]
    assert name.startswith("_pg3_")
    assert executions == 8


@ONLY_PSYCOPG3
@pytest.mark.parametrize("engine", ["herokupool.db.backends.postgresql"], indirect=True)
def test_a_borrowers_prepare_is_undone_by_name_and_the_drivers_statements_stay(
    preparing: Callable[..., str],
) -> None:
    """A request's own ``PREPARE hp_x`` (through Django's cursor and through
    ``Connection.execute``) is gone in the next request on the session; psycopg's own
    prepared statement is still there and still executed by name."""
    alias = preparing()
    for _ in range(3):
        in_thread(lambda: request(alias, lambda w: orm_query(alias)))
    before = in_thread(lambda: request(alias, prepared_item_queries))

    def own(wrapper: Any) -> int:
        one(wrapper, 'PREPARE hp_x AS SELECT 1; PREPARE "Hp Y" (int) AS SELECT $1')
        raw(wrapper).execute("PREPARE hp_z AS SELECT 2")
        assert _rows(wrapper, OWN_PREPARED) == [("Hp Y",), ("hp_x",), ("hp_z",)]
        return pid_of(wrapper)

    pid1 = in_thread(lambda: request(alias, own))

    def look(wrapper: Any) -> tuple[Any, ...]:
        mine = _rows(
            wrapper, "SELECT name FROM pg_prepared_statements WHERE name NOT LIKE '\\_pg3%'"
        )
        return mine, orm_query(alias), prepared_item_queries(wrapper), pid_of(wrapper)

    mine, names, after, pid2 = in_thread(lambda: request(alias, look))
    assert mine == []
    assert sorted(names) == ["a", "c"]
    assert [name for name, _ in after] == [name for name, _ in before], "the same statement"
    assert after[0][1] == before[0][1] + 1, "executed by name once more"
    assert pid2 == pid1


@ONLY_PSYCOPG3
@pytest.mark.parametrize("engine", ["herokupool.db.backends.postgresql"], indirect=True)
@pytest.mark.parametrize(
    "forget",
    [
        "DEALLOCATE ALL",
        "DISCARD ALL",
        "DEALLOCATE {name}",
        "PREPARE hp_q AS SELECT 1; DEALLOCATE ALL",
        "DO $$BEGIN EXECUTE 'DEALLOCATE ALL'; END$$",
    ],
)
def test_a_borrowers_deallocate_does_not_break_the_next_requests_queries(
    preparing: Callable[..., str], forget: str
) -> None:
    """A request makes the server forget psycopg's prepared statements (``DEALLOCATE ALL``,
    ``DISCARD ALL``, which psycopg notices itself; ``DEALLOCATE _pg3_0`` or a ``DO`` block's,
    which it does not).  The next requests' queries work (psycopg's cache was emptied with
    the server's: no "prepared statement does not exist"), and are prepared afresh."""
    alias = preparing()
    pids = set()
    # Twice: psycopg itself notices DEALLOCATE ALL or DISCARD ALL the first time it sees
    # that statement's text, never again (nor DEALLOCATE of one of its names).
    for _ in range(2):
        for _ in range(4):
            in_thread(lambda: request(alias, lambda w: orm_query(alias)))
        ((name, _),) = in_thread(lambda: request(alias, prepared_item_queries))

        def forgets(wrapper: Any, name: str = name) -> int:
            with raw(wrapper).cursor() as cursor:
                cursor.execute(forget.format(name=name))
            return pid_of(wrapper)

        pids.add(in_thread(lambda: request(alias, forgets)))
        for _ in range(4):
            names, pid = in_thread(lambda: request(alias, lambda w: (orm_query(alias), pid_of(w))))
            assert sorted(names) == ["a", "c"]
            pids.add(pid)
        statements = in_thread(lambda: request(alias, prepared_item_queries))
        assert len(statements) == 1, "prepared afresh"
    assert len(pids) == 1, "the session was kept"


@ONLY_PSYCOPG3
@pytest.mark.parametrize("engine", ["herokupool.db.backends.postgresql"], indirect=True)
def test_a_reset_that_discards_everything_keeps_psycopgs_cache_consistent(
    preparing: Callable[..., str],
) -> None:
    """``OPTIONS["RESET"] = "DISCARD ALL"`` drops every prepared statement at each release:
    psycopg's cache is emptied with it, so no request executes a name the server forgot."""
    alias = preparing(RESET="DISCARD ALL")
    pids = set()
    for _ in range(6):
        names, pid = in_thread(lambda: request(alias, lambda w: (orm_query(alias), pid_of(w))))
        assert sorted(names) == ["a", "c"]
        pids.add(pid)
    assert len(pids) == 1


@ONLY_PSYCOPG3
@pytest.mark.parametrize("engine", ["herokupool.db.backends.postgresql"], indirect=True)
def test_a_rollback_after_a_borrowers_prepare_keeps_the_session(
    preparing: Callable[..., str],
) -> None:
    """psycopg answers a rollback with its own ``DEALLOCATE ALL`` (dropping the borrower's
    ``PREPARE`` too): the release's undo by name skips what is gone instead of failing, so
    the session is kept and the next request is clean."""
    alias = preparing()
    for _ in range(3):
        in_thread(lambda: request(alias, lambda w: orm_query(alias)))

    def prepare_then_roll_back(wrapper: Any) -> int:
        one(wrapper, "PREPARE hp_rb AS SELECT 1")

        def rolled_back() -> None:
            with transaction.atomic(using=alias):
                orm_query(alias)
                raise RuntimeError

        with pytest.raises(RuntimeError):
            rolled_back()
        return pid_of(wrapper)

    pid1 = in_thread(lambda: request(alias, prepare_then_roll_back))

    def look(wrapper: Any) -> tuple[Any, ...]:
        return (
            _rows(wrapper, "SELECT name FROM pg_prepared_statements WHERE name = 'hp_rb'"),
            sorted(orm_query(alias)),
            pid_of(wrapper),
        )

    assert in_thread(lambda: request(alias, look)) == ([], ["a", "c"], pid1)


@ONLY_PSYCOPG3
@pytest.mark.parametrize("engine", ["herokupool.db.backends.postgresql"], indirect=True)
def test_a_borrowers_deallocate_that_fails_still_leaves_its_prepare_undone(
    preparing: Callable[..., str],
) -> None:
    """A request's ``DEALLOCATE hp_f`` of its own ``PREPARE`` fails (its transaction was
    already aborted), so the server keeps ``hp_f``: the release still drops it."""
    alias = preparing()

    def deallocate_in_an_aborted_transaction(wrapper: Any) -> None:
        with transaction.atomic(using=alias):
            with contextlib.suppress(DatabaseError):
                one(wrapper, "SELECT 1/0")  # aborts the transaction
            one(wrapper, "DEALLOCATE hp_f")  # refused: "current transaction is aborted"

    def prepare_then_fail_to_deallocate(wrapper: Any) -> int:
        one(wrapper, "PREPARE hp_f AS SELECT 1")
        with pytest.raises(DatabaseError, match="aborted"):
            deallocate_in_an_aborted_transaction(wrapper)
        return pid_of(wrapper)

    pid1 = in_thread(lambda: request(alias, prepare_then_fail_to_deallocate))

    def look(wrapper: Any) -> tuple[Any, ...]:
        return _rows(wrapper, OWN_PREPARED), pid_of(wrapper)

    assert in_thread(lambda: request(alias, look)) == ([], pid1)


# ------------------------------------------------------------ the pool's errors


@pytest.mark.parametrize("engine", ["herokupool.db.backends.postgresql"], indirect=True)
def test_the_pools_timeout_is_djangos_operational_error(
    register: Callable[..., str], engine: str
) -> None:
    """Another thread holds the only connection: the borrow times out with Django's
    ``OperationalError`` (the pool's error subclasses the driver's), naming the pool."""
    alias = register(pool={"MAX_CONNS": 1, "TIMEOUT": 0.3})
    held = threading.Event()
    done = threading.Event()

    def holder() -> None:
        try:
            one(connections[alias], "SELECT 1")
            held.set()
            done.wait(10)
        finally:
            close_old_connections()

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(10)
        with pytest.raises(OperationalError, match=f"pool '{alias}': timed out after"):
            request(alias, lambda w: one(w, "SELECT 1"))
    finally:
        done.set()
        thread.join(10)


@ONLY_PSYCOPG3
def test_a_notifies_generator_left_suspended_does_not_hang_the_next_request(
    register: Callable[..., str], engine: str
) -> None:
    """``connection.connection.notifies()`` holds the connection's lock while it is
    suspended: a request that ends with one mid-iteration (a streaming view) leaves a
    session nobody else can use until the generator is collected.  The next request must
    not wait for it: herokupool closes that session (the stock engine's is closed anyway)."""
    alias = register(pool={"TIMEOUT": 5})
    channel = f"hp_{uuid.uuid4().hex[:8]}"

    def listen(wrapper: Any) -> tuple[Iterator[Any], int]:
        conn = raw(wrapper)
        conn.execute(f"LISTEN {channel}")
        conn.execute(f"NOTIFY {channel}, 'one'")
        conn.execute(f"NOTIFY {channel}, 'two'")
        pid = pid_of(wrapper)
        stream = conn.notifies()
        assert next(stream).payload == "one"  # suspended, holding the lock
        return stream, pid

    stream, pid1 = request(alias, listen)
    try:
        channels, pid2 = in_thread(
            lambda: request(
                alias,
                lambda w: (one(w, "SELECT count(*) FROM pg_listening_channels()")[0], pid_of(w)),
            ),
            timeout=15,
        )
    finally:
        with contextlib.suppress(Exception):
            stream.close()
    assert channels == 0
    if is_pooled(engine):
        assert pid2 != pid1, "a session whose lock is held is closed, not lent"
