"""Values herokupool cannot honour are refused where they are read (issue 10, items 1-5).

config() and parse() refuse them with ImproperlyConfigured naming the variable; the
backend refuses the same values in OPTIONS before connecting, and the system checks
report them.  No database: the backend is refused before it would connect.
"""

from __future__ import annotations

import math
import threading
import traceback

import pytest
from django.conf import settings
from django.db import connections

from herokupool import registry
from herokupool.checks import check_databases
from herokupool.config import POSTGRESQL_ENGINE, SSL_REQUIRED_KEY, config, parse, with_ssl_hint
from herokupool.options import (
    MAX_CONNECTIONS,
    MAX_SECONDS,
    OptionError,
    parse_options,
)
from tests.unit.test_config import clean_env, error_of  # noqa: F401  (clean_env: autouse)

DURATIONS = ["TIMEOUT", "MAX_LIFETIME", "MAX_IDLE", "VALIDATE_AFTER", "LEAK_THRESHOLD"]
COUNTS = ["MAX_CONNS", "MIN_CONNS"]


def seconds_rule(name: str) -> str:
    rule = f"must be a number of seconds greater than 0 and at most {MAX_SECONDS:.0f} (one day)"
    # TIMEOUT is the one duration that cannot be turned off.
    return rule + ("." if name == "TIMEOUT" else " (or empty / none to disable).")


# --- 1: every duration and count has an upper bound ---------------------------------


def test_the_bounds_keep_libpq_and_the_clock_valid() -> None:
    # connect_timeout is derived from TIMEOUT as a whole number of seconds and libpq reads
    # it into a C int; a waiter's deadline must fit threading's (time_t based) maximum.
    assert math.ceil(MAX_SECONDS) <= 2**31 - 1
    assert MAX_SECONDS < threading.TIMEOUT_MAX
    assert MAX_SECONDS >= 24 * 3600
    assert MAX_CONNECTIONS >= 500  # Heroku's largest plans allow 500 connections


@pytest.mark.parametrize("name", DURATIONS)
@pytest.mark.parametrize("value", ["2.1e9", "9.2e9", "86401", "1e300"])
def test_a_duration_above_the_bound_is_refused_in_the_environment(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgres://u:p@db.example.com/app")
    monkeypatch.setenv(f"POOL_{name}", value)
    assert str(error_of(config)) == f'POOL_{name} ("{value}") {seconds_rule(name)}'


@pytest.mark.parametrize("name", DURATIONS)
def test_a_duration_at_the_bound_is_accepted(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgres://u:p@db.example.com/app")
    monkeypatch.setenv(f"POOL_{name}", "86400")
    assert config()["default"]["OPTIONS"][name] == 86400.0


def test_a_duration_above_the_bound_is_refused_as_a_keyword_argument() -> None:
    assert str(error_of(parse, "postgres://db.example.com/app", timeout=2.1e9)) == (
        f"The timeout argument of herokupool.parse() (2100000000.0) {seconds_rule('TIMEOUT')}"
    )
    assert "The max_idle argument of herokupool.config() (9200000000.0)" in str(
        error_of(config, default="postgres://db.example.com/app", max_idle=9.2e9)
    )


def test_an_integer_too_large_for_a_float_is_refused_not_an_overflow() -> None:
    message = str(error_of(parse, "postgres://db.example.com/app", timeout=10**400))
    assert message.startswith("The timeout argument of herokupool.parse() (1000")
    assert message.endswith(seconds_rule("TIMEOUT"))


@pytest.mark.parametrize("name", COUNTS)
def test_a_count_above_the_bound_is_refused(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgres://u:p@db.example.com/app")
    monkeypatch.setenv("POOL_MAX_CONNS", str(MAX_CONNECTIONS))
    monkeypatch.setenv(f"POOL_{name}", str(MAX_CONNECTIONS + 1))
    minimum = 1 if name == "MAX_CONNS" else 0
    assert str(error_of(config)) == (
        f'POOL_{name} ("{MAX_CONNECTIONS + 1}") must be a whole number from {minimum} to '
        f"{MAX_CONNECTIONS}."
    )
    monkeypatch.setenv(f"POOL_{name}", str(MAX_CONNECTIONS))
    assert config()["default"]["OPTIONS"][name] == MAX_CONNECTIONS


@pytest.mark.parametrize(("name", "value"), [("TIMEOUT", 2.1e9), ("MAX_LIFETIME", 9.2e9)])
def test_the_shared_rules_refuse_what_options_may_hold(name: str, value: float) -> None:
    with pytest.raises(OptionError) as info:
        parse_options({name: value})
    assert info.value.name == name


@pytest.mark.parametrize(("name", "value"), [("TIMEOUT", 2.1e9), ("MAX_LIFETIME", 9.2e9)])
def test_the_backend_refuses_an_unbounded_option_before_connecting(name: str, value: float) -> None:
    from herokupool.db.backends.postgresql.base import DatabaseWrapper

    database = {
        "ENGINE": POSTGRESQL_ENGINE,
        "NAME": "app",
        # Nothing listens on port 1: a connect attempt would fail with another error.
        "HOST": "127.0.0.1",
        "PORT": 1,
        "OPTIONS": {name: value},
    }
    alias = f"bounds-{name.lower()}"
    settings_dict = connections.configure_settings({"default": database})["default"]
    wrapper = DatabaseWrapper(settings_dict, alias)
    try:
        # connect(), not ensure_connection(), which pytest-django blocks in unit tests.
        error = error_of(wrapper.connect)
    finally:
        registry.close(alias)
    assert str(error).startswith(f"DATABASES['{alias}']['OPTIONS']['{name}'] ({value!r}) must be")
    assert "at most 86400" in str(error)


@pytest.mark.parametrize(("name", "value"), [("TIMEOUT", 2.1e9), ("MAX_IDLE", 9.2e9)])
def test_the_checks_report_an_unbounded_option(
    monkeypatch: pytest.MonkeyPatch, name: str, value: float
) -> None:
    database = {"ENGINE": POSTGRESQL_ENGINE, "NAME": "app", "OPTIONS": {name: value}}
    monkeypatch.setattr(settings, "DATABASES", {"default": database})
    [error] = check_databases()
    assert error.id == "herokupool.E002"
    assert error.msg == f"OPTIONS[{name!r}] ({value!r}) {seconds_rule(name)}"


# --- 2: pool settings in the URL's query string -------------------------------------


@pytest.mark.parametrize("key", ["max_conns", "MAX_CONNS", "Max_Conns"])
def test_a_pool_setting_in_the_url_is_refused(monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    monkeypatch.setenv("DATABASE_URL", f"postgres://u:p@db.example.com/app?{key}=2")
    assert str(error_of(config)) == (
        f"DATABASE_URL has the pool setting {key!r} in its query string, where libpq would "
        "take it for a connection parameter; set POOL_MAX_CONNS instead."
    )


def test_a_pool_setting_in_a_followers_url_names_its_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HEROKU_POSTGRESQL_PINK_URL", "postgres://u:p@db.example.com/app?timeout=5")
    message = str(error_of(config, "HEROKU_POSTGRESQL_PINK_URL", env_prefix="REPLICA_POOL_"))
    assert message.startswith("HEROKU_POSTGRESQL_PINK_URL has the pool setting 'timeout' ")
    assert message.endswith("; set REPLICA_POOL_TIMEOUT instead.")


def test_a_pool_setting_in_a_parsed_url_asks_for_the_keyword_argument() -> None:
    message = str(error_of(parse, "postgres://db.example.com/app?reset=DISCARD%20ALL"))
    assert message.startswith("The URL passed to herokupool.parse() has the pool setting 'reset' ")
    assert message.endswith("; pass reset= to herokupool.parse() instead.")


def test_libpq_parameters_in_the_url_still_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "DATABASE_URL",
        "postgres://u:p@db.example.com/app?connect_timeout=5&application_name=web"
        "&target_session_attrs=read-write&keepalives_idle=30",
    )
    monkeypatch.setenv("POOL_TIMEOUT", "5")
    assert config()["default"]["OPTIONS"] == {
        "connect_timeout": 5,
        "application_name": "web",
        "target_session_attrs": "read-write",
        "keepalives_idle": 30,
        "TIMEOUT": 5.0,
    }


@pytest.mark.parametrize("key", ["max_conns", "Max_Conns", "Timeout"])
def test_the_checks_report_a_pool_setting_in_any_other_case(
    monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    database = {"ENGINE": POSTGRESQL_ENGINE, "NAME": "app", "OPTIONS": {key: 2}}
    monkeypatch.setattr(settings, "DATABASES", {"default": database})
    [error] = check_databases()
    assert error.id == "herokupool.E005"
    assert error.hint == f"Rename it to {key.upper()!r}."


# --- 3: a URL that names no database ------------------------------------------------


@pytest.mark.parametrize(
    "url", ["postgres://", "postgresql://", "postgres://db.example.com", "postgres://u:p@h:5432/"]
)
def test_a_url_without_a_database_name_is_refused(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", url)
    assert str(error_of(config)) == (
        "DATABASE_URL names no database (its value is not shown: it may hold a password); "
        "it must look like postgres://USER:PASSWORD@HOST:PORT/NAME."
    )


@pytest.mark.parametrize("url", ["postgres:///app", "postgres://?service=app"])
def test_a_local_socket_or_a_service_needs_no_host(url: str) -> None:
    # libpq's defaults (the unix socket) and a pg_service.conf entry are fine.
    assert parse(url)["ENGINE"] == POSTGRESQL_ENGINE


# --- 4: an unencoded reserved character in the password -----------------------------

SPLIT = [
    # The "/" ends the authority: HOST "app", PORT 58213, NAME "secret@db:5432/app".
    ("postgres://app:58213/secret@db:5432/app", ["58213", "secret"]),
    # "?" and "#" do the same, the rest of the password going to the query or fragment.
    ("postgres://app:58213?secret@db:5432/app", ["58213", "secret"]),
    ("postgres://app:58213#secret@db:5432/app", ["58213", "secret"]),
    # A password with "@" then "/": HOST "Qx", NAME "Jw9@db/app".
    ("postgres://app:Zq7@Qx/Jw9@db/app", ["Zq7", "Qx", "Jw9"]),
    # ... then "?" or "#": HOST "Qx", no NAME.
    ("postgres://app:Zq7@Qx?Jw9@db/app", ["Zq7", "Qx", "Jw9"]),
    ("postgres://app:Zq7@Qx#Jw9@db/app", ["Zq7", "Qx", "Jw9"]),
    # "postgres:/" (one slash): no authority at all, the password in the path.
    ("postgres:/app:Zq7?Jw9@db:5432/app", ["Zq7", "Jw9"]),
    # Not a port: the pieces are refused all the same, with the same advice.
    ("postgres://app:Zq7/Jw9@db:5432/app", ["Zq7", "Jw9"]),
    ("postgres://app:Zq7?Jw9@db:5432/app", ["Zq7", "Jw9"]),
]


@pytest.mark.parametrize(("url", "fragments"), SPLIT)
def test_a_password_split_by_a_reserved_character_is_refused_unquoted(
    monkeypatch: pytest.MonkeyPatch, url: str, fragments: list[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", url)
    error = error_of(config)
    message = str(error)
    assert message.startswith("DATABASE_URL has an '@' after its host")
    assert "percent-encode the password" in message
    shown = "".join(traceback.format_exception(error))
    for text in (message, repr(error), repr(error.args), shown):
        for fragment in fragments:
            assert fragment not in text
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__


def test_parse_refuses_a_split_password_too() -> None:
    message = str(error_of(parse, "postgres://app:58213/secret@db:5432/app"))
    assert message.startswith("The URL passed to herokupool.parse() has an '@' after its host")


@pytest.mark.parametrize(
    ("url", "password", "name"),
    [
        ("postgres://app:58213%2Fsecret@db:5432/app", "58213/secret", "app"),
        # urllib splits the authority at its last "@": a bare "@" in a password is fine.
        ("postgres://app:pa@ss@db/app", "pa@ss", "app"),
        # An encoded "@" in NAME is deliberate.
        ("postgres://app:pw@db/a%40b", "pw", "a@b"),
        # After USER:PASSWORD@HOST/NAME an "@" in the query is a value's own.
        ("postgres://app:pw@db/app?application_name=web@dyno", "pw", "app"),
    ],
)
def test_encoded_or_unambiguous_characters_are_accepted(url: str, password: str, name: str) -> None:
    database = parse(url)
    assert (database["PASSWORD"], database["HOST"], database["NAME"]) == (password, "db", name)


# --- 5: SSL that herokupool required on a dyno --------------------------------------

NO_SSL = (
    'connection to server at "db.example.com" (10.0.0.5), port 5432 failed: '
    "server does not support SSL, but SSL was required\n"
)


class FakeDriverError(Exception):
    """Stands in for psycopg2.OperationalError (the integration test uses the real one)."""


def refuse_ssl() -> None:
    raise FakeDriverError(NO_SSL)


def test_config_marks_the_sslmode_it_adds_on_a_dyno(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYNO", "web.1")
    monkeypatch.setenv("DATABASE_URL", "postgres://u:p@db.example.com/app")
    assert config()["default"][SSL_REQUIRED_KEY] == "DATABASE_URL"
    # Chosen by the user, not by herokupool: nothing to explain.
    assert SSL_REQUIRED_KEY not in config(ssl_require=True)["default"]
    assert SSL_REQUIRED_KEY not in parse("postgres://u:p@db.example.com/app?sslmode=require")
    monkeypatch.delenv("DYNO")
    assert SSL_REQUIRED_KEY not in config()["default"]


def test_a_refused_ssl_connection_says_herokupool_required_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DYNO", "web.1")
    monkeypatch.setenv("DATABASE_URL", "postgres://u:p@db.example.com/app")
    with pytest.raises(FakeDriverError) as info:
        with_ssl_hint(refuse_ssl, config()["default"])()
    assert str(info.value) == (
        NO_SSL.rstrip()
        + "; herokupool required SSL (sslmode=require) because DYNO is set and the host is not "
        "local: if this server has no SSL, set sslmode in the query string of DATABASE_URL "
        "(?sslmode=prefer or ?sslmode=disable) or pass ssl_require=False."
    )
    assert info.value.__cause__ is not None


def test_other_connect_errors_and_user_chosen_ssl_are_left_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DYNO", "web.1")
    url = "postgres://u:p@db.example.com/app"

    def refuse_password() -> None:
        raise FakeDriverError('password authentication failed for user "u"\n')

    with pytest.raises(FakeDriverError, match=r"^password authentication failed"):
        with_ssl_hint(refuse_password, parse(url))()
    for database in (parse(url + "?sslmode=require"), parse(url, ssl_require=True)):
        with pytest.raises(FakeDriverError) as info:
            with_ssl_hint(refuse_ssl, database)()
        assert str(info.value) == NO_SSL
    # OPTIONS changed after config(): herokupool no longer chose the sslmode.
    database = parse(url)
    database["OPTIONS"]["sslmode"] = "verify-full"
    with pytest.raises(FakeDriverError) as info:
        with_ssl_hint(refuse_ssl, database)()
    assert str(info.value) == NO_SSL
