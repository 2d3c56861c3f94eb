"""Heroku's Django template, with the function renamed, on a real server (issue 17, item 2).

The test server has no SSL, so ``ssl_require`` is left to its default (off the dyno:
nothing forced); the unit tests cover what ``ssl_require=True`` adds.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connections

import herokupool
from herokupool import registry
from tests.integration.conftest import backend_pid, pids_of

pytestmark = pytest.mark.integration


@pytest.fixture
def template_alias(
    monkeypatch: pytest.MonkeyPatch, dsn: str, alias: str, app_name: str
) -> Iterator[Any]:
    from herokupool.db.backends.postgresql.base import DatabaseWrapper

    monkeypatch.delenv("DYNO", raising=False)
    monkeypatch.setenv("DATABASE_URL", f"{dsn}?application_name={app_name}")
    settings = herokupool.config(env="DATABASE_URL", conn_max_age=600, conn_health_checks=True)
    wrapper = DatabaseWrapper(
        connections.configure_settings({"default": settings["default"]})["default"], alias
    )
    yield wrapper
    wrapper.close()
    registry.close(alias)


def test_the_template_alias_reuses_one_pooled_connection_across_requests(
    template_alias: Any, admin: Any, app_name: str
) -> None:
    first = backend_pid(template_alias)
    template_alias.close()  # the end of a request: CONN_MAX_AGE is 0
    second = backend_pid(template_alias)
    template_alias.close()
    assert second == first  # the pool kept it
    assert pids_of(admin, app_name) == {first}  # and opened no other
