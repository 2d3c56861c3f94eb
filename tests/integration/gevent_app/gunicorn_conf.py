"""gunicorn's gevent worker with psycogreen, as psycopg2 apps on Heroku run it.

The gevent worker monkey-patches the standard library when it starts; psycogreen makes
psycopg2 wait for the server through gevent instead of blocking the whole worker.  Both
must happen in the worker, after fork: post_fork is the hook that runs there first.
psycopg 3 needs no such patch: it waits through gevent when it finds the standard library
patched as it is imported, which is after this hook (gunicorn's gevent worker patches after
post_fork): nothing here may import it, or Django's backend (which imports it).  The patch
itself only touches psycopg2, harmless when psycopg 3 is the driver.
"""

worker_class = "gevent"
workers = 1
worker_connections = 100
timeout = 60
graceful_timeout = 5
accesslog = None
errorlog = "-"
loglevel = "warning"
# gunicorn >= 25.1 opens a control socket under $HOME by default; parallel runs would share it.
control_socket_disable = True


def post_fork(server, worker):
    from psycogreen.gevent import patch_psycopg

    patch_psycopg()


def worker_exit(server, worker):
    import herokupool

    herokupool.close_pools()
