"""``ENGINE = "herokupool.db.backends.postgresql"``: Django's PostgreSQL backend, pooled."""

from django.db.backends.postgresql import base

from herokupool.db.backends.mixin import PooledDatabaseWrapperMixin


class DatabaseWrapper(PooledDatabaseWrapperMixin, base.DatabaseWrapper):
    pass
