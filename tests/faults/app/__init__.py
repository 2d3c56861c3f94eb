"""The fault suite's own Django project: the smallest app that reads, writes, runs a transaction,
raises inside one and sleeps on the database, served by gunicorn as on a Heroku dyno.

Nothing here is imported by the test process: gunicorn imports it with
``DJANGO_SETTINGS_MODULE=tests.faults.app.settings`` and DATABASE_URL / POOL_* in its environment.
"""
