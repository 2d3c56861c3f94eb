"""The shop project, touching the real database before the test database exists: an
app queries it in ``AppConfig.ready()`` and the test runner holds a connection to it
while the test database is created."""

from shopproj.settings import *  # noqa: F403

INSTALLED_APPS = [*INSTALLED_APPS, "early"]  # noqa: F405
TEST_RUNNER = "shopproj.runner.TouchingRunner"
