"""Django's own ``OPTIONS["pool"]`` on a herokupool alias (issue 17, item 3).

A user of Django's native pool who switches ENGINE to herokupool's and leaves the key
behind gets an error naming each psycopg_pool key's herokupool equivalent, never a
second pool.  The rule lives in options.py, so the backend (which parses OPTIONS with
split_options and parse_options) and the checks (E004) say the same.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connections

from herokupool import registry
from herokupool.config import POSTGRESQL_ENGINE
from herokupool.options import BY_NAME, OptionError, parse_options, split_options
from tests.unit.test_config import error_of

CLASH = "asks for Django's own psycopg 3 pool, but herokupool's engine already pools this alias"


def test_split_options_never_hands_djangos_pool_key_to_libpq() -> None:
    pool, libpq = split_options({"pool": {"max_size": 8}, "MAX_CONNS": 2, "sslmode": "require"})
    assert pool == {"pool": {"max_size": 8}, "MAX_CONNS": 2}
    assert libpq == {"sslmode": "require"}


@pytest.mark.parametrize(
    ("value", "fix"),
    [
        (True, "remove it (MAX_CONNS sizes herokupool's pool, 4 by default)."),
        ("yes", "remove it (MAX_CONNS sizes herokupool's pool, 4 by default)."),
        (
            {"min_size": 2, "max_size": 8, "timeout": 5, "max_lifetime": 1800, "max_idle": 300},
            "remove it and put 'MIN_CONNS': 2, 'MAX_CONNS': 8, 'TIMEOUT': 5, "
            "'MAX_LIFETIME': 1800, 'MAX_IDLE': 300 in OPTIONS instead (with herokupool.config(): "
            "POOL_MIN_CONNS=2 POOL_MAX_CONNS=8 POOL_TIMEOUT=5 POOL_MAX_LIFETIME=1800 "
            "POOL_MAX_IDLE=300).",
        ),
        # psycopg_pool's max_size defaults to min_size: the same pool needs both.
        (
            {"min_size": 8},
            "remove it and put 'MIN_CONNS': 8, 'MAX_CONNS': 8 in OPTIONS instead (with "
            "herokupool.config(): POOL_MIN_CONNS=8 POOL_MAX_CONNS=8).",
        ),
        # psycopg_pool's max_waiting=0 means no limit; herokupool's 0 means never queue.
        (
            {"max_waiting": 0},
            "remove it and put 'MAX_WAITING': None in OPTIONS instead (with herokupool.config(): "
            "POOL_MAX_WAITING=none).",
        ),
        (
            {"max_size": 8, "num_workers": 2, "reconnect_timeout": 60},
            "remove it and put 'MAX_CONNS': 8 in OPTIONS instead (with herokupool.config(): "
            "POOL_MAX_CONNS=8); num_workers and reconnect_timeout have no herokupool equivalent.",
        ),
        (
            {"num_workers": 2},
            "remove it (num_workers has no herokupool equivalent; MAX_CONNS sizes herokupool's "
            "pool, 4 by default).",
        ),
    ],
)
def test_djangos_pool_is_refused_with_each_keys_equivalent(value: Any, fix: str) -> None:
    with pytest.raises(OptionError) as info:
        parse_options({"pool": value, "MAX_CONNS": 4})
    assert info.value.name == "pool"
    assert info.value.value == value
    assert info.value.rule == f"{CLASH}; {fix}"


def test_every_suggested_setting_is_a_herokupool_setting_with_a_valid_value() -> None:
    value = {"min_size": 2, "max_size": 8, "timeout": 5, "max_lifetime": 1800, "max_idle": 300}
    with pytest.raises(OptionError) as info:
        parse_options({"pool": {**value, "max_waiting": 0}})
    suggested = {"MIN_CONNS": 2, "MAX_CONNS": 8, "TIMEOUT": 5, "MAX_LIFETIME": 1800}
    suggested |= {"MAX_IDLE": 300, "MAX_WAITING": None}
    for name, setting in suggested.items():
        assert f"{name!r}: {setting!r}" in info.value.rule
        assert name in BY_NAME
    parse_options(suggested)  # the suggestion itself is accepted


@pytest.mark.parametrize("value", [False, None, {}])
def test_a_falsy_pool_asks_for_no_pool_and_is_ignored(value: Any) -> None:
    # As Django does: only a true value makes a psycopg_pool.
    assert parse_options({"pool": value, "MAX_CONNS": 2})["max_conns"] == 2


def backend_connect_error(options: dict[str, Any]) -> str:
    from herokupool.db.backends.postgresql.base import DatabaseWrapper

    database = {
        "ENGINE": POSTGRESQL_ENGINE,
        "NAME": "app",
        # Nothing listens on port 1: a connect attempt would fail with another error.
        "HOST": "127.0.0.1",
        "PORT": 1,
        "OPTIONS": options,
    }
    alias = "django-pool"
    settings_dict = connections.configure_settings({"default": database})["default"]
    wrapper = DatabaseWrapper(settings_dict, alias)
    try:
        # connect(), not ensure_connection(), which pytest-django blocks in unit tests.
        return str(error_of(wrapper.connect))
    finally:
        registry.close(alias)


def test_the_backend_says_which_settings_replace_djangos_pool() -> None:
    message = backend_connect_error({"pool": {"max_size": 8}})
    assert message == (
        f"DATABASES['django-pool']['OPTIONS']['pool'] ({{'max_size': 8}}) {CLASH}; remove it "
        "and put 'MAX_CONNS': 8 in OPTIONS instead (with herokupool.config(): POOL_MAX_CONNS=8)."
    )
