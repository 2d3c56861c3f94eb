"""What psycopg 3 cursors record of their statements (``herokupool.tracked_psycopg._record``),
read through its cache of statement texts.  No database: the connection is a recorder."""

from __future__ import annotations

from typing import Any

import pytest

from herokupool import session

pytestmark = pytest.mark.psycopg3_only


class _Recorder:
    def __init__(self) -> None:
        self.noted: list[tuple[int, str]] = []

    def note(self, flags: int, query: str) -> None:
        self.noted.append((flags, query))


class _Cursor:
    def __init__(self) -> None:
        self._conn = _Recorder()


@pytest.fixture
def tracked() -> Any:
    from herokupool import tracked_psycopg

    tracked_psycopg._flags_of.clear()
    yield tracked_psycopg
    tracked_psycopg._flags_of.clear()


def test_a_statement_read_from_the_cache_is_noted_as_the_first_time(tracked: Any) -> None:
    cursor = _Cursor()
    for _ in range(3):
        tracked._record(cursor, "SET search_path TO other")
        tracked._record(cursor, "SELECT 1")
    flags = session.changes_and_forgets("SET search_path TO other")
    assert flags
    assert cursor._conn.noted == [(flags, "SET search_path TO other")] * 3


def test_str_subclasses_bytes_and_long_texts_are_read_each_time(tracked: Any) -> None:
    from django.utils.safestring import SafeString

    cursor = _Cursor()
    long_text = "SET search_path TO other /*" + "x" * tracked._FLAGS_LONGEST + "*/"
    for query in (SafeString("SET ROLE nobody"), b"SET work_mem TO '1MB'", long_text):
        tracked._record(cursor, query)
    assert [flags for flags, _ in cursor._conn.noted] == [
        session.changes_and_forgets(text)
        for text in ("SET ROLE nobody", "SET work_mem TO '1MB'", long_text)
    ]
    assert long_text not in tracked._flags_of
    assert "SET ROLE nobody" not in tracked._flags_of


def test_the_cache_never_holds_more_than_its_bound(tracked: Any) -> None:
    cursor = _Cursor()
    for n in range(3 * tracked._FLAGS_KEPT):
        tracked._record(cursor, f"SELECT {n}")
    assert 0 < len(tracked._flags_of) <= tracked._FLAGS_KEPT
    tracked._record(cursor, "DISCARD ALL")
    assert cursor._conn.noted == [(session.changes_and_forgets("DISCARD ALL"), "DISCARD ALL")]
