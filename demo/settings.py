"""Settings of the demo app: the repository root deployed by the Heroku button.

Everything comes from the environment, the Heroku way. On a dyno (``DYNO`` is set) the
settings are production ones: SECRET_KEY is required, HTTPS is enforced behind Heroku's
router, and ``manage.py check --deploy`` is clean. Off a dyno (``make run``, ``honcho start
web``, ``heroku local``, the buildpack's collectstatic) they work with nothing set: nothing
here connects to the database, so collectstatic and check pass without DATABASE_URL.
"""

from __future__ import annotations

import os
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

import herokupool

BASE_DIR = Path(__file__).resolve().parent.parent

# Heroku sets DYNO ("web.1", "release.4", "run.2156") on every dyno, and only there.
ON_HEROKU = "DYNO" in os.environ


def _flag(name: str) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ImproperlyConfigured(
        f"{name} ({value!r}) must be 1, true, yes or on (or 0, false, no, off, or unset)."
    )


DEBUG = _flag("DEBUG")

SECRET_KEY = os.environ.get("SECRET_KEY", "")
if not SECRET_KEY:
    if ON_HEROKU:
        # The Deploy button generates one (app.json); `git push` deployers set it themselves.
        raise ImproperlyConfigured(
            "SECRET_KEY is not set; the app needs one on a dyno: `heroku config:set "
            "SECRET_KEY=$(python -c 'import secrets; print(secrets.token_urlsafe(50))')`."
        )
    SECRET_KEY = "django-insecure-herokupool-demo-for-local-use-only"

# Heroku's router only forwards requests for the app's own domains; *.herokuapp.com covers
# the Deploy button's app, custom domains go in ALLOWED_HOSTS (comma-separated).
ALLOWED_HOSTS = [host.strip() for host in os.environ.get("ALLOWED_HOSTS", "").split(",") if host]
if ON_HEROKU:
    ALLOWED_HOSTS.append(".herokuapp.com")
else:
    ALLOWED_HOSTS += ["localhost", "127.0.0.1", "[::1]"]

INSTALLED_APPS = [
    # Before staticfiles, so `runserver` serves static files through WhiteNoise too.
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    # herokupool's system checks (herokupool.E001 ... W004), run by check and migrate.
    "herokupool",
    "demo.dashboard",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "demo.urls"
WSGI_APPLICATION = "demo.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {"context_processors": ["django.template.context_processors.request"]},
    },
]

# DATABASE_URL (set by the heroku-postgresql add-on) plus the POOL_* variables. Off a dyno
# an unset DATABASE_URL means the local server's "herokupool" database, over the default
# unix socket, so that settings are complete (and `manage.py check` passes) with nothing set.
DATABASES = herokupool.config(default=None if ON_HEROKU else "postgres:///herokupool")

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

USE_TZ = True
TIME_ZONE = "UTC"
LANGUAGE_CODE = "en-us"
USE_I18N = False

STATIC_URL = "static/"
# Where the buildpack's `collectstatic --noinput` puts the files (git-ignored).
STATIC_ROOT = BASE_DIR / "staticfiles"
STORAGES = {
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}
if not ON_HEROKU:
    # Off a dyno, `honcho start web` and `heroku local` must work without a build step:
    # serve from the apps' static folders and fall back to unhashed names.
    WHITENOISE_USE_FINDERS = True
    WHITENOISE_MANIFEST_STRICT = False

if ON_HEROKU:
    # The router terminates TLS and says which scheme the client used.
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = True
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    # One hour to start with; raise it once HTTPS is known to work on every domain.
    SECURE_HSTS_SECONDS = 3600
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True

SILENCED_SYSTEM_CHECKS = [
    # HSTS preloading is an opt-in submission for a registrable domain; an app on a
    # herokuapp.com subdomain cannot be submitted, so the header would promise nothing.
    "security.W021",
]

# Heroku collects stdout/stderr: log there, with herokupool's pool lifecycle at INFO.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        "herokupool": {"level": "INFO"},
        "django": {"level": "INFO" if DEBUG else "WARNING"},
    },
}
