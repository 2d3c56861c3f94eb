"""``ENGINE = "bench.lending"``: herokupool's backend with the lending prototype
(``herokupool.db.backends.lending``), measured next to the released behaviour."""

from django.db.backends.postgresql import base

from herokupool.db.backends.lending import LendingMixin


class DatabaseWrapper(LendingMixin, base.DatabaseWrapper):
    pass
