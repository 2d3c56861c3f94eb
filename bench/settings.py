"""Django settings for every benchmark configuration.

The database alias comes from the configuration in ``BENCH_CONFIG`` (see
``bench.configs``), so the project is the same for all of them: no middleware, one app,
one view doing one primary-key lookup.  Leaving middleware out keeps the per-request
Python cost small, which makes a pool's own overhead show as much as it can.
"""

import json
import os

_config = json.loads(os.environ["BENCH_CONFIG"])

SECRET_KEY = "herokupool-bench-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
TIME_ZONE = "UTC"
INSTALLED_APPS = ["bench.app"]
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "bench.app.urls"
DATABASES = {"default": _config["database"]}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LOGGING_CONFIG = None
# Settings some peers read outside DATABASES (django-postgrespool2's DATABASE_POOL_ARGS).
globals().update(_config.get("settings", {}))
