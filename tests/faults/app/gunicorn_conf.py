"""gunicorn settings shared by every fault-suite run; the command line adds bind, workers,
threads and --preload (see tests/faults/harness.py)."""

worker_class = "gthread"
preload_app = True
# No worker may be killed for slowness during a test: a restarted worker is a failure.
timeout = 60
graceful_timeout = 10
keepalive = 2
accesslog = None
errorlog = "-"
loglevel = "warning"
# gunicorn >= 25.1 opens a control socket under $HOME by default; parallel runs would share it.
control_socket_disable = True


def worker_exit(server, worker):
    """Close the worker's pools, so PostgreSQL sees clean disconnects."""
    import herokupool

    herokupool.close_pools()
