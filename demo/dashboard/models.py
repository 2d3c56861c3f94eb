from django.db import models


class Visit(models.Model):
    """One request that used the database, with the pool as that request saw it.

    The page's chart plots the most recent visits of every worker process: what each
    request found in its own process's pool after borrowing a connection.
    """

    #: Rows kept; older ones are pruned every PRUNE_EVERY inserts.
    KEEP = 2000
    PRUNE_EVERY = 100

    created = models.DateTimeField(auto_now_add=True)
    path = models.CharField(max_length=100)
    worker_pid = models.PositiveIntegerField(help_text="the gunicorn worker's process id")
    backend_pid = models.PositiveIntegerField(help_text="the PostgreSQL backend that served it")
    acquire_ms = models.FloatField(help_text="time to get a connection from the pool")
    in_use = models.PositiveSmallIntegerField()
    idle = models.PositiveSmallIntegerField()
    waiting = models.PositiveSmallIntegerField()
    max_conns = models.PositiveSmallIntegerField()

    class Meta:
        ordering = ("-id",)

    def __str__(self) -> str:
        return f"{self.path} on worker {self.worker_pid} (backend {self.backend_pid})"

    @property
    def in_use_pct(self) -> float:
        return 100.0 * self.in_use / self.max_conns if self.max_conns else 0.0


class Burst(models.Model):
    """One "Run a burst" from the page: the pool of one worker, sampled while it queued."""

    #: Rows kept; older ones are deleted as new ones arrive.
    KEEP = 50

    created = models.DateTimeField(auto_now_add=True)
    worker_pid = models.PositiveIntegerField()
    threads = models.PositiveSmallIntegerField()
    rounds = models.PositiveSmallIntegerField()
    hold = models.FloatField(help_text="seconds each query held its connection")
    max_conns = models.PositiveSmallIntegerField()
    elapsed = models.FloatField()
    ok = models.PositiveIntegerField()
    timeouts = models.PositiveIntegerField()
    errors = models.PositiveIntegerField()
    peak_waiting = models.PositiveSmallIntegerField()
    #: [{"t": seconds, "in_use": n, "idle": n, "waiting": n, "connecting": n}, ...]
    timeline = models.JSONField()

    class Meta:
        ordering = ("-id",)

    def __str__(self) -> str:
        return f"{self.threads} threads on worker {self.worker_pid} ({self.elapsed:.2f} s)"
