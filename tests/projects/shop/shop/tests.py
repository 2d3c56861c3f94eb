"""Run by tests/integration/test_test_runner.py through ``python -m django test``.

Each test checks that it runs on the test database through herokupool's backend and
that the pool behaves as a pool: one server session per test in a TestCase, the same
session again after ``connection.close()`` in a TransactionTestCase.
"""

# Django TestCases run by Django's own runner: unittest's assertions are the idiom.
# ruff: noqa: PT009, PT027

import threading
from decimal import Decimal

from django.conf import settings
from django.db import IntegrityError, connection, connections, transaction
from django.test import TestCase, TransactionTestCase

from shop.models import Product


def backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return int(cursor.fetchone()[0])


def current_database() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_database()")
        return str(cursor.fetchone()[0])


class OnThePooledTestDatabase:
    def assert_pooled_test_database(self) -> None:
        assert type(connections["default"]).__module__ == "herokupool.db.backends.postgresql.base"
        name = current_database()
        assert name == connection.settings_dict["NAME"], name
        # The test database, or under --parallel one of its clones (NAME_1, NAME_2).
        assert name.startswith(settings.DATABASES["default"]["TEST"]["NAME"]), name


class ProductTests(OnThePooledTestDatabase, TestCase):
    @classmethod
    def setUpTestData(cls) -> None:
        Product.objects.create(name="seed", price=Decimal("1.00"))

    def test_one_server_session_for_the_whole_test(self) -> None:
        self.assert_pooled_test_database()
        pid = backend_pid()
        Product.objects.create(name="lamp", price=Decimal("20.50"))
        self.assertEqual(Product.objects.count(), 2)
        self.assertEqual(backend_pid(), pid)

    def test_a_failed_savepoint_leaves_the_test_transaction_usable(self) -> None:
        pid = backend_pid()
        with self.assertRaises(IntegrityError), transaction.atomic():
            Product.objects.create(name="seed", price=Decimal("2.00"))
        self.assertEqual(list(Product.objects.values_list("name", flat=True)), ["seed"])
        self.assertEqual(backend_pid(), pid)


class ProductTransactionTests(OnThePooledTestDatabase, TransactionTestCase):
    def test_close_returns_the_connection_and_the_next_query_reuses_it(self) -> None:
        self.assert_pooled_test_database()
        Product.objects.create(name="chair", price=Decimal("35.00"))
        pid = backend_pid()
        connection.close()
        self.assertIsNone(connection.connection)
        self.assertEqual(backend_pid(), pid, "the same server session, from the pool")
        self.assertEqual(Product.objects.get(name="chair").price, Decimal("35.00"))

    def test_threads_leave_idle_pooled_sessions_on_the_test_database(self) -> None:
        # Three threads hold a connection at once, then release them as request_finished
        # would: the pool keeps the sessions open and idle, and dropping the test
        # database afterwards must not trip over them.
        connection.close()  # leave all MAX_CONNS (3) to the threads
        together = threading.Barrier(3, timeout=10)
        errors: list[BaseException] = []

        def request(n: int) -> None:
            try:
                Product.objects.create(name=f"thread-{n}", price=Decimal(n))
                together.wait()
            except BaseException as error:
                errors.append(error)
            finally:
                connection.close()

        threads = [threading.Thread(target=request, args=(n,)) for n in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(errors, [])
        self.assertEqual(Product.objects.filter(name__startswith="thread-").count(), 3)
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = %s "
                "AND pid <> pg_backend_pid()",
                [connection.settings_dict["OPTIONS"]["application_name"]],
            )
            idle_sessions = cursor.fetchone()[0]
        self.assertEqual(idle_sessions, 2, "the threads' other two sessions wait in the pool")
