"""``ENGINE = "bench.txmode"``: a per-statement (transaction-mode) prototype, measured
only (issue 12, item 2): not part of herokupool.

Outside ``atomic()`` in autocommit, the physical connection goes back to the pool as
soon as a statement's ``execute()`` returns (psycopg2's client-side cursors hold their
rows by then), in the same GIL hold; inside ``atomic()`` it is held until the
outermost block ends.  Server-side cursors are not handled (the bench uses none).
"""

from typing import Any

from django.db.backends.postgresql import base
from django.db.backends.utils import CursorWrapper

from herokupool.db.backends.lending import LendingMixin


class StatementCursorWrapper(CursorWrapper):
    def _execute(self, *args: Any) -> Any:
        try:
            return super()._execute(*args)
        finally:
            self.db.statement_done()

    def _executemany(self, *args: Any) -> Any:
        try:
            return super()._executemany(*args)
        finally:
            self.db.statement_done()


class DatabaseWrapper(LendingMixin, base.DatabaseWrapper):
    def make_cursor(self, cursor: Any) -> Any:
        return StatementCursorWrapper(cursor, self)

    def statement_done(self) -> None:
        if self.autocommit and not self.in_atomic_block and self._herokupool_pool is not None:
            self._close()

    def set_autocommit(self, autocommit: bool, *args: Any, **kwargs: Any) -> None:
        super().set_autocommit(autocommit, *args, **kwargs)
        if autocommit:
            self.statement_done()  # the outermost atomic() block ended
