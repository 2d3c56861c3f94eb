"""A test runner that uses the real database around the test database's life."""

from typing import Any

from django.conf import settings
from django.db import connection
from django.test.runner import DiscoverRunner


def current_database() -> tuple[str, int]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_database(), pg_backend_pid()")
        name, pid = cursor.fetchone()
    return name, pid


class TouchingRunner(DiscoverRunner):
    def setup_databases(self, **kwargs: Any) -> Any:
        real_name = settings.DATABASES["default"]["NAME"]
        # Borrowed, and deliberately not closed: create_test_db() closes it itself, so
        # a pool for the real database has a connection when CREATE DATABASE runs.
        name, _ = current_database()
        assert name == real_name, (name, real_name)
        old_config = super().setup_databases(**kwargs)
        name, _ = current_database()
        assert name == settings.DATABASES["default"]["TEST"]["NAME"], name
        return old_config

    def teardown_databases(self, old_config: Any, **kwargs: Any) -> None:
        real_name = old_config[0][1]
        super().teardown_databases(old_config, **kwargs)
        # Back on the real database, through a new pool (close_pool() closed the old).
        name, _ = current_database()
        assert name == real_name, (name, real_name)
        connection.close()
