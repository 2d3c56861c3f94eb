"""herokupool's system checks: settings and environment only, no database."""

from __future__ import annotations

import inspect
import os
import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.checks import CheckMessage, Tags, registry
from django.core.management import call_command
from django.core.management.base import SystemCheckError

import herokupool.checks
from herokupool.checks import TAG, check_databases, check_environment, check_libraries
from herokupool.config import MISSING_ENV_KEY, POSTGIS_ENGINE, POSTGRESQL_ENGINE, config

PASSWORD = "Zq7-hunter2-SECRET"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if (
            name in {"DATABASE_URL", "DYNO", "WEB_CONCURRENCY"}
            or name.startswith(("POOL_", "HEROKU_POSTGRESQL_"))
            or name.endswith(("CONNECTION_POOL_URL", "_URL_PGBOUNCER"))
        ):
            monkeypatch.delenv(name)


def use(monkeypatch: pytest.MonkeyPatch, **databases: dict[str, Any]) -> None:
    # Patched directly rather than with override_settings, whose DATABASES warning
    # ("can lead to unexpected behavior") is an error here: the checks only read it.
    monkeypatch.setattr(settings, "DATABASES", databases)


def pooled(**extra: Any) -> dict[str, Any]:
    return {
        "ENGINE": POSTGRESQL_ENGINE,
        "NAME": "app",
        "USER": "app",
        "PASSWORD": PASSWORD,
        "HOST": "db.example.com",
        "PORT": 5432,
        "CONN_MAX_AGE": 0,
        "OPTIONS": {},
        **extra,
    }


def run() -> list[CheckMessage]:
    return (
        check_databases(app_configs=None)
        + check_environment(app_configs=None)
        + check_libraries(app_configs=None)
    )


def ids(messages: list[CheckMessage]) -> list[str]:
    return [message.id or "" for message in messages]


def test_checks_are_registered_under_their_own_tag() -> None:
    checks = registry.registry.get_checks()
    assert check_databases in checks
    assert check_environment in checks
    assert check_libraries in checks
    assert TAG in registry.registry.tags_available()
    assert tuple(check_databases.tags) == (TAG,)  # type: ignore[attr-defined]


def test_settings_from_config_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", f"postgres://app:{PASSWORD}@db.example.com/app")
    monkeypatch.setenv("POOL_MAX_CONNS", "8")
    monkeypatch.setenv("POOL_MIN_CONNS", "2")
    use(monkeypatch, **config())
    assert run() == []


def test_non_herokupool_aliases_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    use(
        monkeypatch,
        default={
            "ENGINE": "django.db.backends.postgresql",
            "NAME": "app",
            "CONN_MAX_AGE": 600,
            "OPTIONS": {"pool": True, "MAX_CONNS": 0},
        },
    )
    assert run() == []


# --- E001: the URL variable is unset --------------------------------------------------


def test_e001_unset_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    use(monkeypatch, **config())
    [message] = run()
    assert message.id == "herokupool.E001"
    assert message.msg == (
        "DATABASE_URL is not set; set it to your database's URL "
        "(postgres://USER:PASSWORD@HOST:PORT/NAME) or pass default= to herokupool.config()."
    )
    assert message.obj == "DATABASES['default']"
    assert message.is_serious()


def test_e001_names_a_followers_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgres://u:p@h/app")
    use(monkeypatch, **config(), **config("HEROKU_POSTGRESQL_PINK_URL", alias="replica"))
    [message] = run()
    assert message.id == "herokupool.E001"
    assert message.msg.startswith("HEROKU_POSTGRESQL_PINK_URL is not set")
    assert message.obj == "DATABASES['replica']"


def test_manage_py_check_reports_an_unset_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    use(monkeypatch, **config())
    with pytest.raises(SystemCheckError, match=r"herokupool\.E001.*DATABASE_URL is not set"):
        call_command("check")


def test_collectstatics_checks_leave_an_unset_url_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    # Heroku runs collectstatic during the build, where DATABASE_URL is unset;
    # collectstatic runs only the checks tagged staticfiles.
    use(monkeypatch, **config())
    assert registry.run_checks(tags=[Tags.staticfiles]) == []
    assert ids(registry.run_checks(tags=[TAG])) == ["herokupool.E001"]


# --- E002-E005: hand-written OPTIONS ------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"MAX_CONNS": 0}, "OPTIONS['MAX_CONNS'] (0) must be a whole number from 1 to 1000."),
        (
            {"MAX_CONNS": "abc"},
            "OPTIONS['MAX_CONNS'] ('abc') must be a whole number from 1 to 1000.",
        ),
        ({"MIN_CONNS": -1}, "OPTIONS['MIN_CONNS'] (-1) must be a whole number from 0 to 1000."),
        (
            {"TIMEOUT": 0},
            "OPTIONS['TIMEOUT'] (0) must be a number of seconds greater than 0 and at most "
            "86400 (one day).",
        ),
        (
            {"MAX_IDLE": -5},
            "OPTIONS['MAX_IDLE'] (-5) must be a number of seconds greater than 0 and at most "
            "86400 (one day) (or empty / none to disable).",
        ),
        (
            {"TEST_ON_BORROW": "sometimes"},
            "OPTIONS['TEST_ON_BORROW'] ('sometimes') must be a boolean "
            "(true/false, 1/0, yes/no, on/off).",
        ),
    ],
)
def test_e002_invalid_pool_setting(
    monkeypatch: pytest.MonkeyPatch, options: dict[str, Any], message: str
) -> None:
    use(monkeypatch, default=pooled(OPTIONS=options))
    [error] = run()
    assert error.id == "herokupool.E002"
    assert error.msg == message


def test_e002_reports_every_invalid_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    use(monkeypatch, default=pooled(OPTIONS={"MAX_CONNS": 0, "TIMEOUT": -1, "MIN_CONNS": 9}))
    assert ids(run()) == ["herokupool.E002", "herokupool.E002"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"MIN_CONNS": 5, "MAX_CONNS": 2},
            "OPTIONS['MIN_CONNS'] (5) is greater than OPTIONS['MAX_CONNS'] (2); "
            "the minimum must not exceed the maximum.",
        ),
        (
            {"MIN_CONNS": 5},
            "OPTIONS['MIN_CONNS'] (5) is greater than OPTIONS['MAX_CONNS'] (4, the default); "
            "the minimum must not exceed the maximum.",
        ),
    ],
)
def test_e003_min_above_max(
    monkeypatch: pytest.MonkeyPatch, options: dict[str, Any], message: str
) -> None:
    use(monkeypatch, default=pooled(OPTIONS=options))
    [error] = run()
    assert error.id == "herokupool.E003"
    assert error.msg == message


def test_e004_djangos_pool_key(monkeypatch: pytest.MonkeyPatch) -> None:
    use(monkeypatch, default=pooled(OPTIONS={"pool": {"max_size": 4}}))
    assert ids(run()) == ["herokupool.E004"]


def test_e004_names_the_herokupool_setting_for_each_key(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = {"min_size": 2, "max_size": 8, "num_workers": 2}
    use(monkeypatch, default=pooled(OPTIONS={"pool": pool, "sslmode": "require"}))
    [error] = run()
    assert error.id == "herokupool.E004"
    assert error.msg == (
        "OPTIONS['pool'] ({'min_size': 2, 'max_size': 8, 'num_workers': 2}) asks for Django's "
        "own psycopg 3 pool, but herokupool's engine already pools this alias."
    )
    assert error.hint == (
        "Remove it and put 'MIN_CONNS': 2, 'MAX_CONNS': 8 in OPTIONS instead (with "
        "herokupool.config(): POOL_MIN_CONNS=2 POOL_MAX_CONNS=8); num_workers has no herokupool "
        "equivalent."
    )
    assert error.obj == "DATABASES['default']"


def test_e004_pool_true(monkeypatch: pytest.MonkeyPatch) -> None:
    use(monkeypatch, default=pooled(OPTIONS={"pool": True, "MAX_CONNS": 8}))
    [error] = run()
    assert error.id == "herokupool.E004"
    assert error.hint == "Remove it (MAX_CONNS sizes herokupool's pool, 4 by default)."


@pytest.mark.parametrize("value", [False, None, {}])
def test_a_false_pool_asks_for_no_pool(monkeypatch: pytest.MonkeyPatch, value: Any) -> None:
    use(monkeypatch, default=pooled(OPTIONS={"pool": value}))
    assert run() == []


@pytest.mark.parametrize("key", ["max_conns", "min_conns", "timeout", "reset"])
def test_e005_lower_case_pool_setting(monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    use(monkeypatch, default=pooled(OPTIONS={key: 1}))
    [error] = run()
    assert error.id == "herokupool.E005"
    assert error.hint == f"Rename it to {key.upper()!r}."


def test_libpq_options_are_fine(monkeypatch: pytest.MonkeyPatch) -> None:
    options = {"sslmode": "require", "connect_timeout": 5, "application_name": "web"}
    use(monkeypatch, default=pooled(OPTIONS=options))
    assert run() == []


# --- W001, W002 -------------------------------------------------------------------


@pytest.mark.parametrize("conn_max_age", [600, None])
def test_w001_conn_max_age(monkeypatch: pytest.MonkeyPatch, conn_max_age: int | None) -> None:
    use(monkeypatch, default=pooled(CONN_MAX_AGE=conn_max_age))
    [warning] = run()
    assert warning.id == "herokupool.W001"
    assert warning.msg.startswith(f"CONN_MAX_AGE is {conn_max_age!r};")
    assert not warning.is_serious()


def test_conn_max_age_unset_is_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    database = pooled()
    del database["CONN_MAX_AGE"]
    use(monkeypatch, default=database)
    assert run() == []


def test_w002_pgbouncer_flag_without_disable_server_side_cursors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("POOL_PGBOUNCER", "true")
    use(monkeypatch, default=pooled())
    assert ids(run()) == ["herokupool.W002"]
    use(monkeypatch, default=pooled(DISABLE_SERVER_SIDE_CURSORS=True))
    assert run() == []


@pytest.mark.parametrize(
    ("variable", "url"),
    [
        ("DATABASE_CONNECTION_POOL_URL", f"postgres://app:{PASSWORD}@db.example.com:5432/app"),
        ("DATABASE_URL_PGBOUNCER", f"postgres://app:{PASSWORD}@db.example.com:5432/app"),
    ],
)
def test_w002_alias_matches_a_pgbouncer_url(
    monkeypatch: pytest.MonkeyPatch, variable: str, url: str
) -> None:
    monkeypatch.setenv(variable, url)
    use(monkeypatch, default=pooled())
    assert ids(run()) == ["herokupool.W002"]


def test_w002_not_for_a_direct_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_CONNECTION_POOL_URL", "postgres://app:x@db.example.com:5433/app")
    use(monkeypatch, default=pooled())
    assert run() == []


def test_w002_silenced_by_pool_pgbouncer_false(monkeypatch: pytest.MonkeyPatch) -> None:
    url = "postgres://app:x@db.example.com:5432/app"
    monkeypatch.setenv("DATABASE_CONNECTION_POOL_URL", url)
    monkeypatch.setenv("POOL_PGBOUNCER", "false")  # PgBouncer in session mode
    use(monkeypatch, default=pooled())
    assert run() == []


def test_config_behind_pgbouncer_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_CONNECTION_POOL_URL", "postgres://u:p@pooler.example.com/app")
    use(monkeypatch, **config("DATABASE_CONNECTION_POOL_URL"))
    assert run() == []


# --- W003, W004, E006: the environment -------------------------------------------------


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        (
            ["POOL_MAX_CONNS"],
            "POOL_MAX_CONNS is set, but no alias in DATABASES uses a herokupool engine, so "
            "nothing reads it.",
        ),
        (
            ["POOL_MAX_CONNS", "POOL_CONNECTION_LIMIT"],
            "POOL_MAX_CONNS, POOL_CONNECTION_LIMIT are set, but no alias in DATABASES uses a "
            "herokupool engine, so nothing reads them.",
        ),
    ],
)
def test_w003_pool_variables_without_a_herokupool_alias(
    monkeypatch: pytest.MonkeyPatch, variables: list[str], message: str
) -> None:
    for name in variables:
        monkeypatch.setenv(name, "8")
    use(monkeypatch, default={"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"})
    [warning] = run()
    assert warning.id == "herokupool.W003"
    assert warning.msg == message


def test_no_w003_without_pool_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    use(monkeypatch, default={"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"})
    assert run() == []


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("POOL_CONNECTION_LIMIT", "abc"),
        ("POOL_CONNECTION_LIMIT", "0"),
        ("WEB_CONCURRENCY", "-2"),
        ("WEB_CONCURRENCY", "2.5"),
    ],
)
def test_e006_bad_sizing_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    use(monkeypatch, default=pooled())
    [error] = run()
    assert error.id == "herokupool.E006"
    assert error.msg == f'{variable} ("{value}") must be a whole number >= 1.'


@pytest.mark.parametrize(
    ("web_concurrency", "limit", "options", "warned"),
    [
        ("3", "20", {"MAX_CONNS": 8}, True),  # 24 > 20
        ("2", "20", {"MAX_CONNS": 8}, False),  # 16
        (None, "3", {}, True),  # 1 x 4 (the default) > 3
        (None, "4", {}, False),
        ("5", "20", {"MAX_CONNS": 4}, False),  # exactly at the limit
    ],
)
def test_w004_connection_budget(
    monkeypatch: pytest.MonkeyPatch,
    web_concurrency: str | None,
    limit: str,
    options: dict[str, Any],
    warned: bool,
) -> None:
    if web_concurrency is not None:
        monkeypatch.setenv("WEB_CONCURRENCY", web_concurrency)
    monkeypatch.setenv("POOL_CONNECTION_LIMIT", limit)
    use(monkeypatch, default=pooled(OPTIONS=options))
    assert ids(run()) == (["herokupool.W004"] if warned else [])


def test_w004_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEB_CONCURRENCY", "3")
    monkeypatch.setenv("POOL_CONNECTION_LIMIT", "20")
    use(monkeypatch, default=pooled(OPTIONS={"MAX_CONNS": 8}))
    [warning] = run()
    assert warning.msg == (
        "WEB_CONCURRENCY (3) x MAX_CONNS (8 for 'default') = 24 connections from one dyno, "
        "above POOL_CONNECTION_LIMIT (20)."
    )


def test_w004_adds_up_aliases_on_one_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEB_CONCURRENCY", "2")
    monkeypatch.setenv("POOL_CONNECTION_LIMIT", "20")
    use(
        monkeypatch,
        default=pooled(OPTIONS={"MAX_CONNS": 6}),
        reporting=pooled(OPTIONS={"MAX_CONNS": 6}),
        replica=pooled(HOST="follower.example.com", OPTIONS={"MAX_CONNS": 6}),
    )
    [warning] = run()
    assert warning.id == "herokupool.W004"
    assert "MAX_CONNS (6 for 'default' + 6 for 'reporting') = 24" in warning.msg


def test_w004_skips_aliases_reported_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POOL_CONNECTION_LIMIT", "1")
    use(monkeypatch, default=pooled(OPTIONS={"MAX_CONNS": 0}), other=config()["default"])
    assert ids(run()) == ["herokupool.E002", "herokupool.E001"]


# --- every message --------------------------------------------------------------------

SCENARIOS: list[tuple[dict[str, str], dict[str, dict[str, Any]]]] = [
    ({}, {"default": pooled(**{MISSING_ENV_KEY: "DATABASE_URL"})}),
    ({}, {"default": pooled(OPTIONS={"MAX_CONNS": PASSWORD})}),
    ({}, {"default": pooled(OPTIONS={"MIN_CONNS": 9})}),
    ({}, {"default": pooled(OPTIONS={"pool": True, "max_conns": 2})}),
    ({}, {"default": pooled(CONN_MAX_AGE=60)}),
    ({}, {"default": pooled(CONN_MAX_AGE=PASSWORD)}),
    ({"POOL_PGBOUNCER": "1"}, {"default": pooled()}),
    ({"POOL_MAX_CONNS": "2"}, {"default": {"ENGINE": "django.db.backends.sqlite3"}}),
    ({"POOL_CONNECTION_LIMIT": "x", "WEB_CONCURRENCY": "0"}, {"default": pooled()}),
    ({"POOL_CONNECTION_LIMIT": "2"}, {"default": pooled()}),
]


@pytest.mark.parametrize(("env", "databases"), SCENARIOS)
def test_every_message_is_namespaced_with_a_hint_and_no_password(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], databases: dict[str, dict[str, Any]]
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    use(monkeypatch, **databases)
    messages = run()
    assert messages
    for message in messages:
        assert (message.id or "").startswith("herokupool.")
        assert message.hint
        assert message.msg.endswith(".")
        assert PASSWORD not in str(message)
        assert PASSWORD not in repr(message)


def test_every_check_id_is_documented() -> None:
    source = inspect.getsource(herokupool.checks)
    used = set(re.findall(r'"(herokupool\.[EW]\d{3})"', source))
    assert used == {
        *(f"herokupool.E00{n}" for n in range(1, 7)),
        *(f"herokupool.W00{n}" for n in range(1, 6)),
    }
    docs = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text(encoding="utf-8")
    for check_id in sorted(used):
        assert f"| `{check_id}` |" in docs


# --- W005: django-cachalot skips herokupool's engines -----------------------------------

SQLITE = {"ENGINE": "django.db.backends.sqlite3", "NAME": "legacy.sqlite3"}


@pytest.fixture
def cachalot(monkeypatch: pytest.MonkeyPatch) -> None:
    """cachalot in INSTALLED_APPS with its settings unset (the checks read settings only)."""
    monkeypatch.setattr(settings, "INSTALLED_APPS", [*settings.INSTALLED_APPS, "cachalot"])
    for name in ("CACHALOT_DATABASES", "CACHALOT_ENABLED"):
        monkeypatch.delattr(settings, name, raising=False)


@pytest.mark.usefixtures("cachalot")
@pytest.mark.parametrize("explicit", [False, True])
def test_w005_cachalots_default_skips_herokupool_aliases(
    monkeypatch: pytest.MonkeyPatch, explicit: bool
) -> None:
    if explicit:
        monkeypatch.setattr(settings, "CACHALOT_DATABASES", "supported_only", raising=False)
    # As where cachalot's own list cannot be imported (the test extra installs cachalot).
    monkeypatch.setitem(sys.modules, "cachalot.settings", None)
    use(monkeypatch, default=pooled(), geo=pooled(ENGINE=POSTGIS_ENGINE), legacy=SQLITE)
    [warning] = run()
    assert warning.id == "herokupool.W005"
    assert warning.msg == (
        "django-cachalot caches no query on DATABASES['default'] and DATABASES['geo']: "
        'CACHALOT_DATABASES is "supported_only" (its default), which takes only the ENGINE '
        "names on cachalot's own list, and herokupool's engines are not on it."
    )
    # cachalot's list is not importable here: the hint names the herokupool aliases.
    assert warning.hint == (
        "Name the aliases cachalot is to cache: CACHALOT_DATABASES = ['default', 'geo'], and "
        "CACHALOT_ADDITIONAL_SUPPORTED_DATABASES = ['herokupool.db.backends.postgis', "
        "'herokupool.db.backends.postgresql'] where cachalot has it (else silence "
        "cachalot.W003); or silence herokupool.W005 to leave them uncached."
    )
    assert not warning.is_serious()


@pytest.mark.usefixtures("cachalot")
def test_w005_hint_keeps_the_aliases_cachalot_already_caches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = types.ModuleType("cachalot.settings")
    fake.SUPPORTED_DATABASE_ENGINES = {"django.db.backends.sqlite3"}  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cachalot.settings", fake)
    use(monkeypatch, default=pooled(), legacy=SQLITE)
    [warning] = run()
    assert "CACHALOT_DATABASES = ['default', 'legacy']," in (warning.hint or "")


@pytest.mark.usefixtures("cachalot")
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CACHALOT_DATABASES", ["default"]),
        # An explicit list is the user's choice, whatever it leaves out.
        ("CACHALOT_DATABASES", ("legacy",)),
        ("CACHALOT_DATABASES", frozenset()),
        ("CACHALOT_ENABLED", False),
    ],
)
def test_w005_not_when_cachalot_is_told(
    monkeypatch: pytest.MonkeyPatch, name: str, value: object
) -> None:
    monkeypatch.setattr(settings, name, value, raising=False)
    use(monkeypatch, default=pooled(), legacy=SQLITE)
    assert run() == []


def test_w005_not_without_cachalot(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(settings, "CACHALOT_DATABASES", raising=False)
    use(monkeypatch, default=pooled())
    assert run() == []


@pytest.mark.usefixtures("cachalot")
def test_w005_not_without_a_herokupool_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    use(monkeypatch, default=SQLITE)
    assert run() == []


def test_w005_sees_cachalots_app_config_path(monkeypatch: pytest.MonkeyPatch) -> None:
    apps = [*settings.INSTALLED_APPS, "cachalot.apps.CachalotConfig"]
    monkeypatch.setattr(settings, "INSTALLED_APPS", apps)
    monkeypatch.delattr(settings, "CACHALOT_DATABASES", raising=False)
    use(monkeypatch, default=pooled())
    assert ids(run()) == ["herokupool.W005"]
