"""The gevent test app's settings: the database from DATABASE_URL and POOL_* (config())."""

import herokupool

SECRET_KEY = "herokupool-gevent-tests-only"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = ["herokupool"]
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "tests.integration.gevent_app.urls"
WSGI_APPLICATION = "tests.integration.gevent_app.wsgi.application"
DATABASES = herokupool.config()
USE_TZ = True
TIME_ZONE = "UTC"
