"""``ENGINE = "herokupool.db.backends.postgresql"``: Django's PostgreSQL backend, pooled."""

from django.db.backends.postgresql import base

from herokupool.db.backends.lending import LendingMixin


class DatabaseWrapper(LendingMixin, base.DatabaseWrapper):
    pass
