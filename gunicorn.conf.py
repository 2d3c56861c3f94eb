"""gunicorn settings for the demo (the Procfile's ``web:`` passes ``--config gunicorn.conf.py``).

Read once by the gunicorn master. Sizing: each worker process has its own herokupool pool of
up to POOL_MAX_CONNS connections shared by its GUNICORN_THREADS threads, so one dyno opens at
most WEB_CONCURRENCY x POOL_MAX_CONNS connections however many threads wait.
"""

import os

# Heroku's router connects to $PORT on the dyno's interface (IPv6 as well as IPv4); off a
# dyno (make run, honcho, heroku local) listen on the loopback interface only.
_port = os.environ.get("PORT", "8000")
bind = [f"[::]:{_port}"] if "DYNO" in os.environ else [f"127.0.0.1:{_port}"]

# Processes: WEB_CONCURRENCY is set by the Python buildpack from the dyno's size (2 on
# Basic/Standard-1X) unless you set it yourself.
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))

# Threads per process: more threads than POOL_MAX_CONNS is the point of a pool. Requests
# that need the database queue for a connection; the others never take one.
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "8"))

# Import the app (settings, URLconf) once in the master, then fork: faster boots and less
# memory. Safe with herokupool: pools are created per process on first use, and a forked
# child never touches connections it inherited.
preload_app = True

# Both under Heroku's 30 s: the router answers H12 after 30 s, and a dyno gets 30 s after
# SIGTERM before SIGKILL. With gthread, `timeout` is the workers' heartbeat.
timeout = 25
graceful_timeout = 20
keepalive = 5

# Logs to stdout/stderr, where Heroku's log router collects them.
accesslog = "-"
errorlog = "-"

# gunicorn >= 25.1 opens a control socket under $HOME by default; one app's two gunicorns
# (say `make run` next to the tests) would fight over it, and nothing here uses it.
control_socket_disable = True


def when_ready(server):
    """Close any pool the master made while importing the app (a query at import time), so
    the master holds no connection that dynos x WEB_CONCURRENCY x POOL_MAX_CONNS leaves out."""
    import herokupool

    herokupool.close_pools()


def worker_exit(server, worker):
    """Close this worker's pools, so PostgreSQL sees clean disconnects, not dropped sockets."""
    import herokupool

    herokupool.close_pools()
