"""Django settings for herokupool's own tests.

The database is filled in by ``conftest.py`` (``django_db_modify_db_settings``) from
the ``pg_server`` fixture: HEROKUPOOL_TEST_DSN when set, otherwise an embedded
PostgreSQL started for the session.  Nothing here connects at import time.
"""

SECRET_KEY = "herokupool-tests-only"
USE_TZ = True
TIME_ZONE = "UTC"
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "herokupool",
    "tests.testapp",
]
DATABASES = {
    "default": {
        "ENGINE": "herokupool.db.backends.postgresql",
        "NAME": "herokupool_django",
        "HOST": "placeholder.invalid",
        "CONN_MAX_AGE": 0,
        "OPTIONS": {"MAX_CONNS": 4, "TIMEOUT": 5},
    },
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
ROOT_URLCONF = "tests.testapp.urls"
LOGGING_CONFIG = None
