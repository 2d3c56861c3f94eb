"""A Django project served by ``gunicorn -k gevent`` with psycogreen (see test_gevent.py).

Nothing here is imported by the test process: gunicorn imports it in its worker, with
DATABASE_URL and POOL_* in the environment.
"""
