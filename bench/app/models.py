from django.db import models


class Item(models.Model):
    """A row of ``bench_item``, which the coordinator creates and fills."""

    name = models.CharField(max_length=100)
    value = models.IntegerField()

    class Meta:
        app_label = "app"
        db_table = "bench_item"
        managed = False

    def __str__(self) -> str:
        return self.name
