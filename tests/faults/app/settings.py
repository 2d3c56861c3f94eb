"""Settings of the fault suite's app: everything about the database comes from the environment,
through ``herokupool.config()`` (DATABASE_URL, POOL_MAX_CONNS, POOL_TIMEOUT, ...)."""

import herokupool

SECRET_KEY = "herokupool-faults-only"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = ["herokupool", "tests.faults.app"]
# No CSRF middleware: the load generator POSTs without a token.
MIDDLEWARE = ["tests.faults.app.views.DatabaseUnavailableMiddleware"]
ROOT_URLCONF = "tests.faults.app.urls"
WSGI_APPLICATION = "tests.faults.app.wsgi.application"
DATABASES = herokupool.config()
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"


def _not_expected(record):
    """Keep django.request's log for real errors only: the error view's exception is the point
    of the view, and 503s are logged by the middleware in one line."""
    exc_info = getattr(record, "exc_info", None)
    if exc_info and exc_info[0] is not None and exc_info[0].__name__ == "Boom":
        return False
    return getattr(record, "status_code", None) != 503


LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        "not_expected": {"()": "django.utils.log.CallbackFilter", "callback": _not_expected},
    },
    "handlers": {
        "stderr": {"class": "logging.StreamHandler", "filters": ["not_expected"]},
    },
    "loggers": {
        "django.request": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
        # Discards, retirements and failed connects are warnings: the log shows the faults.
        "herokupool": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
        "tests.faults": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
    },
}
