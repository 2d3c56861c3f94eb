"""Issue 15, item 4: a request with nothing to undo sends nothing but its own statements.

Counted on the wire (``wire.StatementRecorder``, a proxy that parses the client's side
of the PostgreSQL protocol), for 100 clean requests, each ``ensure_connection()``, its
own statements and ``close_old_connections()``.  What a session may add besides the
requests' own statements is its set-up (time zone, ``assume_role``'s ``SET ROLE``, a
validation ``SELECT 1``): a bounded constant per physical session, never something per
request.  The stock engine opens a session per request and so sends its set-up each time,
which the per-session bound allows; herokupool (``MAX_CONNS=1``, one proxied connection
for all 100 requests, asserted) must send it once.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from django.db import close_old_connections, connections, transaction
from django.db.backends.postgresql.psycopg_any import IsolationLevel

from tests.conftest import Server
from tests.integration.isolation.conftest import is_pooled
from tests.integration.isolation.wire import StatementRecorder

pytestmark = pytest.mark.integration

REQUESTS = 100
SELECT = "SELECT 1 AS hp_request"
#: What one physical session may send besides its requests' own statements: its set-up.
SET_UP_BOUND = 3

#: name -> the request's statements (run through Django's cursor, in order)
KINDS: dict[str, tuple[tuple[str, ...], bool]] = {
    "plain": ((SELECT,), False),
    "set_local_in_atomic": (("SET LOCAL statement_timeout = '5s'", SELECT), True),
    "set_config_local_in_atomic": (("SELECT set_config('hp.a', 'b', true)", SELECT), True),
}

OPTIONS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "isolation_level_serializable": {"isolation_level": IsolationLevel.SERIALIZABLE},
    "assume_role": {"assume_role": "{role}"},
}


@pytest.fixture
def recorder(pg_server: Server) -> Iterator[StatementRecorder]:
    parts = urlsplit(pg_server.url)
    with StatementRecorder(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
        yield proxy


def through(proxy: StatementRecorder, url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


def is_own(sql: str, statements: tuple[str, ...], atomic: bool) -> bool:
    if sql in statements:
        return True
    # atomic(): the driver sends BEGIN (with the isolation level, if set) and Django COMMIT.
    # With an isolation level set, psycopg2 also sends SET default_transaction_isolation
    # TO DEFAULT whenever it leaves autocommit, that is at every atomic() block's start,
    # on a new connection as on a pooled one: the stock engine sends it every request too.
    return atomic and (
        sql.startswith("BEGIN")
        or sql == "COMMIT"
        or sql == "SET default_transaction_isolation TO DEFAULT"
    )


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("options", list(OPTIONS))
def test_clean_requests_send_only_their_own_statements_and_a_per_session_set_up(
    register: Callable[..., str],
    engine: str,
    dsn: str,
    recorder: StatementRecorder,
    role: str,
    options: str,
    kind: str,
) -> None:
    """Item 4: 100 clean requests (``plain``: one ``SELECT``; or ``SET LOCAL`` /
    ``set_config(..., true)`` inside ``atomic()``, which end with their transaction) send
    exactly their own statements 100 times, plus at most a bounded set-up per physical
    session: nothing at release, for herokupool's defaults, ``isolation_level`` and
    ``assume_role``, ``RESET`` unset."""
    statements, atomic = KINDS[kind]
    opts = {
        k: v.format(role=role) if isinstance(v, str) else v for k, v in OPTIONS[options].items()
    }
    alias = register(url=through(recorder, dsn), sslmode="disable", gssencmode="disable", **opts)
    for _ in range(REQUESTS):
        wrapper = connections[alias]
        wrapper.ensure_connection()
        block = transaction.atomic(using=alias) if atomic else contextlib.nullcontext()
        with block, wrapper.cursor() as cursor:
            for sql in statements:
                cursor.execute(sql)
        close_old_connections()

    recorded = list(recorder.statements)
    own = collections.Counter(sql for _, sql in recorded if is_own(sql, statements, atomic))
    for sql in statements:
        assert own[sql] == REQUESTS, f"{sql!r} went on the wire {own[sql]} times"
    other: dict[int, list[str]] = collections.defaultdict(list)
    for index, sql in recorded:
        if not is_own(sql, statements, atomic):
            other[index].append(sql)
    if is_pooled(engine):
        assert recorder.connections == 1, "MAX_CONNS=1: one physical session for all"
    worst = max(other.values(), key=len, default=[])
    assert len(worst) <= SET_UP_BOUND, (
        f"one session sent {len(worst)} statements besides its requests' own; the most "
        f"frequent: {collections.Counter(worst).most_common(4)}"
    )
