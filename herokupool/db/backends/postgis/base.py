"""``ENGINE = "herokupool.db.backends.postgis"``: Django's PostGIS backend, pooled."""

from django.contrib.gis.db.backends.postgis import base

from herokupool.db.backends.mixin import PooledDatabaseWrapperMixin


class DatabaseWrapper(PooledDatabaseWrapperMixin, base.DatabaseWrapper):
    pass
