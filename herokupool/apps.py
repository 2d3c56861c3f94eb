"""The optional ``herokupool`` app: add it to INSTALLED_APPS for the system checks."""

from __future__ import annotations

from django.apps import AppConfig
from django.core import checks

from herokupool.checks import TAG, check_databases, check_environment, check_libraries


class HerokupoolConfig(AppConfig):
    name = "herokupool"
    verbose_name = "herokupool"

    def ready(self) -> None:
        # Under a tag of its own, so collectstatic (which runs only the staticfiles
        # checks) passes during Heroku's build while DATABASE_URL is unset there.
        checks.register(check_databases, TAG)
        checks.register(check_environment, TAG)
        checks.register(check_libraries, TAG)
