"""A minimal GeoDjango project on herokupool's PostGIS backend; the database comes from
the environment (see ../README.md).  The PostGIS extension is created in the test
database by Django's backend when it migrates."""

import os

import dj_database_url

SECRET_KEY = "herokupool-test-project-geo"
USE_TZ = True
TIME_ZONE = "UTC"
INSTALLED_APPS = ["django.contrib.gis", "places"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

DATABASES = {
    "default": {
        **dj_database_url.parse(
            os.environ["PROJECT_DATABASE_URL"], engine="herokupool.db.backends.postgis"
        ),
        "CONN_MAX_AGE": 0,
        "OPTIONS": {
            "MAX_CONNS": 2,
            "TIMEOUT": 10,
            "application_name": os.environ["PROJECT_APP_NAME"],
        },
        "TEST": {"NAME": os.environ["PROJECT_TEST_DB"]},
    }
}

# Debian 12's GDAL (3.6) cannot block file and network access from spatial references;
# the test data here is our own, so the warning says nothing about herokupool.
SILENCED_SYSTEM_CHECKS = ["gis.W001"]
