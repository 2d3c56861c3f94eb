"""A minimal project on herokupool's PostgreSQL backend; the database comes from the
environment (see ../README.md)."""

import os

import dj_database_url

SECRET_KEY = "herokupool-test-project-shop"
USE_TZ = True
TIME_ZONE = "UTC"
INSTALLED_APPS = ["shop"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

DATABASES = {
    "default": {
        **dj_database_url.parse(
            os.environ["PROJECT_DATABASE_URL"], engine="herokupool.db.backends.postgresql"
        ),
        "CONN_MAX_AGE": 0,
        "OPTIONS": {
            "MAX_CONNS": 3,
            "TIMEOUT": 10,
            "application_name": os.environ["PROJECT_APP_NAME"],
        },
        "TEST": {"NAME": os.environ["PROJECT_TEST_DB"]},
    }
}
