"""Django settings of the Celery worker test (``test_celery.py``), read from the environment
the test gives the worker: the database URL and the application_name its sessions carry."""

import os

import dj_database_url

SECRET_KEY = "herokupool-tests-only"
USE_TZ = True
INSTALLED_APPS = ["herokupool"]
DATABASES = {
    "default": {
        **dj_database_url.parse(
            os.environ["HEROKUPOOL_CELERY_DSN"], engine="herokupool.db.backends.postgresql"
        ),
        "OPTIONS": {
            "MAX_CONNS": 1,
            "TIMEOUT": 2,
            "application_name": os.environ["HEROKUPOOL_CELERY_APP_NAME"],
        },
    }
}
LOGGING_CONFIG = None
