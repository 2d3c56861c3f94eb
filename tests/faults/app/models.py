from django.db import models


class Item(models.Model):
    """One row per committed write; two per committed transaction; none for the error view."""

    token = models.CharField(max_length=40, db_index=True)  # the request that wrote it
    kind = models.CharField(max_length=10)  # "write", "txn" or "error"
    worker = models.IntegerField()  # the gunicorn worker's pid
    created = models.DateTimeField(auto_now_add=True)


class Counter(models.Model):
    """Incremented in the same transaction as the "txn" rows: value == committed transactions."""

    name = models.CharField(max_length=20, primary_key=True)
    value = models.BigIntegerField(default=0)
