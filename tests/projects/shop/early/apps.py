from django.apps import AppConfig
from django.db import connection


class EarlyConfig(AppConfig):
    """An app that reads the database while Django starts (a warm-up, a flag read).

    Django warns against it (RuntimeWarning), but apps do it; the pool for the real
    database then exists, holding an idle connection, before the test database does.
    """

    name = "early"

    def ready(self) -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        connection.close()
