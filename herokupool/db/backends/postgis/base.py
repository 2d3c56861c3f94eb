"""``ENGINE = "herokupool.db.backends.postgis"``: Django's PostGIS backend, pooled."""

from typing import Any

from django.contrib.gis.db.backends.postgis import base
from django.db.backends.postgresql.psycopg_any import is_psycopg3

from herokupool.db.backends.mixin import PooledDatabaseWrapperMixin


class DatabaseWrapper(PooledDatabaseWrapperMixin, base.DatabaseWrapper):
    def get_new_connection(self, conn_params: Any) -> Any:
        connection = super().get_new_connection(conn_params)  # the mixin's: borrowed
        if is_psycopg3 and self._pooled:
            # On psycopg 3 PostGIS's own get_new_connection() registers its geometry
            # adapters on each new connection (on each borrow from Django's own pool too),
            # after the connect the mixin replaces: do it here, as part of the borrow's
            # set-up, not as a change of the loan's.
            self.register_geometry_adapters(connection)
            connection.keep_adapters()
        return connection
