"""herokupool.config() and herokupool.parse(): DATABASE_URL + POOL_* -> DATABASES.

No database: these only build settings dicts.  URL handling is checked for parity
against dj_database_url.parse, which herokupool relies on instead of a parser of its own.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import quote

import dj_database_url
import pytest
from django.core.exceptions import ImproperlyConfigured

import herokupool
from herokupool.config import (
    MISSING_ENV_KEY,
    POSTGIS_ENGINE,
    POSTGRESQL_ENGINE,
    config,
    is_local_host,
    missing_env_error,
    parse,
)
from herokupool.options import OPTIONS

PG = POSTGRESQL_ENGINE
GIS = POSTGIS_ENGINE


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start every test from an environment with none of the variables config() reads."""
    for name in list(os.environ):
        if (
            name in {"DATABASE_URL", "DYNO", "WEB_CONCURRENCY"}
            or name.startswith(("POOL_", "REPLICA_POOL_", "HEROKU_POSTGRESQL_"))
            or name.endswith(("CONNECTION_POOL_URL", "_URL_PGBOUNCER"))
        ):
            monkeypatch.delenv(name)


def error_of(call: Any, *args: Any, **kwargs: Any) -> ImproperlyConfigured:
    with pytest.raises(ImproperlyConfigured) as info:
        call(*args, **kwargs)
    return info.value


# --- URL shapes: parity with dj_database_url.parse ----------------------------------

POOLED_URLS = [
    # (url, engine herokupool picks)
    ("postgres://user:pass@db.example.com:5432/app", PG),
    ("postgresql://user:pass@db.example.com:5432/app", PG),
    ("pgsql://user:pass@db.example.com:5432/app", PG),
    ("postgis://user:pass@db.example.com:5432/geo", GIS),
    ("POSTGRES://user:pass@db.example.com/app", PG),
    ("postgres://db.example.com/app", PG),
    ("postgres://user@db.example.com/app", PG),
    ("postgres://user:p%40ss%2Fw%3Ard%23@db.example.com/app", PG),
    ("postgres://user:pass@[2001:db8::1]:6543/app", PG),
    ("postgres://%2Fvar%2Frun%2Fpostgresql/app", PG),
    ("postgres://user@%2Fvar%2Frun%2Fpostgresql/app", PG),
    ("postgres://user:pass@%2Ftmp/app", PG),
    ("postgres://localhost/app", PG),
    ("postgres:///app", PG),
    ("postgres://?service=app", PG),
    (
        "postgres://u:p@db.example.com/app?sslmode=verify-full&connect_timeout=5"
        "&application_name=web&sslrootcert=/etc/ssl/certs/root.crt",
        PG,
    ),
    ("postgres://u:p@db.example.com/app?target_session_attrs=read-write", PG),
    ("postgres://u:p@db.example.com/app?currentSchema=tenant", PG),
    ("postgres://u:p@db.example.com/app?options=-c%20statement_timeout%3D5000", PG),
    ("postgres://u:p@db.example.com/app?keepalives=1&keepalives_idle=30", PG),
]


@pytest.mark.parametrize(("url", "engine"), POOLED_URLS)
def test_pooled_url_matches_dj_database_url(url: str, engine: str) -> None:
    expected = dict(dj_database_url.parse(url, engine=engine))
    expected.setdefault("OPTIONS", {})
    assert parse(url) == expected


@pytest.mark.parametrize(("url", "engine"), POOLED_URLS)
def test_config_reads_the_same_url_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, url: str, engine: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", url)
    assert config() == {"default": parse(url)}
    assert config()["default"]["ENGINE"] == engine


def test_unix_socket_host_is_unquoted() -> None:
    settings = parse("postgres://%2Fvar%2Frun%2Fpostgresql/app")
    assert settings["HOST"] == "/var/run/postgresql"
    assert settings["NAME"] == "app"


def test_query_parameters_become_libpq_options() -> None:
    settings = parse(
        "postgres://u:p@db.example.com/app?sslmode=verify-full&connect_timeout=5"
        "&application_name=web&sslrootcert=/etc/ssl/certs/root.crt"
    )
    assert settings["OPTIONS"] == {
        "sslmode": "verify-full",
        "connect_timeout": 5,
        "application_name": "web",
        "sslrootcert": "/etc/ssl/certs/root.crt",
    }


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///db.sqlite3",
        "sqlite:////tmp/db.sqlite3",
        "sqlite://",
        "sqlite://:memory:",
        "mysql://user:pass@mysql.example.com:3306/app",
        "mysql://user:pass@mysql.example.com/app?ssl-ca=/etc/ssl/ca.pem",
        "redshift://user:pass@redshift.example.com:5439/warehouse",
        "spatialite:///geo.sqlite3",
    ],
)
def test_other_schemes_pass_through_unpooled(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("DYNO", "web.1")
    monkeypatch.setenv("POOL_MAX_CONNS", "8")
    assert parse(url) == dj_database_url.parse(url)
    assert parse(url, postgis=True, pgbouncer=True, ssl_require=True) == dj_database_url.parse(url)
    monkeypatch.setenv("DATABASE_URL", url)
    assert config(max_conns=2) == {"default": dj_database_url.parse(url)}


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("foo://user:pass@host/db", "'foo://'"),
        ("http://user:pass@host/db", "'http://'"),
        ("postgres+psycopg2://user:pass@host/db", "'postgres+psycopg2://'"),
        ("localhost/db", "none given"),
        ("//user:pass@host/db", "none given"),
    ],
)
def test_unknown_scheme_is_an_error(monkeypatch: pytest.MonkeyPatch, url: str, shown: str) -> None:
    with pytest.raises(ValueError, match="unknown"):
        dj_database_url.parse(url)
    monkeypatch.setenv("DATABASE_URL", url)
    assert str(error_of(config)) == (
        f"DATABASE_URL has an unknown scheme ({shown}); use postgres://, postgresql://, "
        "pgsql:// or postgis:// (or another scheme dj-database-url knows, such as sqlite:// "
        "or mysql://)."
    )


MALFORMED_URLS = [
    "postgres://user:pass@host:port/db",
    "postgres://user:pass@host:99999/db",
    "postgres://user:pass@host:-1/db",
    "postgres://user:pass@[::1/db",
    "postgres://user:pass@host/db?x=\N{SUPERSCRIPT TWO}",
]


@pytest.mark.parametrize("url", MALFORMED_URLS)
def test_malformed_url_is_an_error(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    with pytest.raises(ValueError):  # dj-database-url's ParseError, or urlsplit's own
        dj_database_url.parse(url)
    monkeypatch.setenv("DATABASE_URL", url)
    assert str(error_of(config)) == (
        "DATABASE_URL is not a valid database URL (its value is not shown: it may hold a "
        "password); it must look like postgres://USER:PASSWORD@HOST:PORT/NAME, with special "
        "characters in USER and PASSWORD percent-encoded."
    )


def test_errors_name_where_the_url_came_from(monkeypatch: pytest.MonkeyPatch) -> None:
    assert str(error_of(config, default="foo://x")).startswith(
        "The default URL passed to herokupool.config() (DATABASE_URL is unset) has an unknown"
    )
    assert str(error_of(parse, "foo://x")).startswith(
        "The URL passed to herokupool.parse() has an unknown scheme"
    )
    monkeypatch.setenv("HEROKU_POSTGRESQL_PINK_URL", "postgres://h:bad/db")
    assert str(error_of(config, "HEROKU_POSTGRESQL_PINK_URL")).startswith(
        "HEROKU_POSTGRESQL_PINK_URL is not a valid database URL"
    )


def test_djangos_pool_option_in_the_url_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgres://u:p@h/db?pool=true")
    assert str(error_of(config)) == (
        "DATABASE_URL has a 'pool' query parameter, which asks for Django's own psycopg 3 "
        "pool; herokupool already pools this alias's connections, so remove it."
    )


def test_the_pgbouncer_buildpacks_prepared_statements_parameter_is_dropped() -> None:
    url = "postgres://u:p@127.0.0.1:6000/db1?prepared_statements=false"
    assert parse(url)["OPTIONS"] == {}


# --- engines, CONN_MAX_AGE ----------------------------------------------------------


def test_returns_the_default_alias_with_conn_max_age_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgres://u:p@h/db")
    databases = config()
    assert list(databases) == ["default"]
    assert databases["default"]["CONN_MAX_AGE"] == 0
    assert databases["default"]["ENGINE"] == PG


@pytest.mark.parametrize(
    ("url", "postgis", "engine"),
    [
        ("postgres://u:p@h/db", False, PG),
        ("postgres://u:p@h/db", True, GIS),
        ("postgresql://u:p@h/db", True, GIS),
        ("pgsql://u:p@h/db", True, GIS),
        ("postgis://u:p@h/db", False, GIS),
        ("postgis://u:p@h/db", True, GIS),
    ],
)
def test_postgis_flag_selects_the_postgis_engine(
    monkeypatch: pytest.MonkeyPatch, url: str, postgis: bool, engine: str
) -> None:
    assert parse(url, postgis=postgis)["ENGINE"] == engine
    monkeypatch.setenv("DATABASE_URL", url)
    assert config(postgis=postgis)["default"]["ENGINE"] == engine


def test_package_exports_config_and_parse() -> None:
    assert herokupool.config is config
    assert herokupool.parse is parse
    assert {"config", "parse"} <= set(herokupool.__all__)


# --- POOL_* variables and keyword arguments ------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "key", "parsed"),
    [
        ("POOL_MAX_CONNS", "8", "MAX_CONNS", 8),
        ("POOL_MAX_CONNS", " 12 ", "MAX_CONNS", 12),
        ("POOL_MIN_CONNS", "0", "MIN_CONNS", 0),
        ("POOL_MIN_CONNS", "3", "MIN_CONNS", 3),
        ("POOL_TIMEOUT", "2.5", "TIMEOUT", 2.5),
        ("POOL_TIMEOUT", "30", "TIMEOUT", 30.0),
        ("POOL_MAX_LIFETIME", "1800", "MAX_LIFETIME", 1800.0),
        ("POOL_MAX_LIFETIME", "none", "MAX_LIFETIME", None),
        ("POOL_MAX_IDLE", "", "MAX_IDLE", None),
        ("POOL_MAX_IDLE", "60", "MAX_IDLE", 60.0),
        ("POOL_TEST_ON_BORROW", "yes", "TEST_ON_BORROW", True),
        ("POOL_TEST_ON_BORROW", "0", "TEST_ON_BORROW", False),
        ("POOL_VALIDATE_AFTER", "1", "VALIDATE_AFTER", 1.0),
        ("POOL_RESET", "DISCARD ALL", "RESET", "DISCARD ALL"),
        ("POOL_LEAK_THRESHOLD", "30", "LEAK_THRESHOLD", 30.0),
    ],
)
def test_pool_variable_fills_options(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, key: str, parsed: object
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgres://u:p@h/db")
    monkeypatch.setenv(variable, value)
    assert config()["default"]["OPTIONS"] == {key: parsed}


def test_every_pool_option_has_a_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgres://u:p@h/db")
    for option in OPTIONS:
        monkeypatch.setenv(option.env, "1" if option.name != "RESET" else "DISCARD ALL")
    assert set(config()["default"]["OPTIONS"]) == {option.name for option in OPTIONS}


def test_only_set_variables_are_written(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgres://u:p@h/db")
    assert config()["default"]["OPTIONS"] == {}
    monkeypatch.setenv("POOL_MAX_CONNS", "6")
    assert config()["default"]["OPTIONS"] == {"MAX_CONNS": 6}


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("POOL_MAX_CONNS", "abc", 'POOL_MAX_CONNS ("abc") must be a whole number from 1 to 1000.'),
        ("POOL_MAX_CONNS", "0", 'POOL_MAX_CONNS ("0") must be a whole number from 1 to 1000.'),
        ("POOL_MAX_CONNS", "-1", 'POOL_MAX_CONNS ("-1") must be a whole number from 1 to 1000.'),
        ("POOL_MAX_CONNS", "2.5", 'POOL_MAX_CONNS ("2.5") must be a whole number from 1 to 1000.'),
        ("POOL_MAX_CONNS", "", 'POOL_MAX_CONNS ("") must be a whole number from 1 to 1000.'),
        ("POOL_MIN_CONNS", "-1", 'POOL_MIN_CONNS ("-1") must be a whole number from 0 to 1000.'),
        ("POOL_MIN_CONNS", "few", 'POOL_MIN_CONNS ("few") must be a whole number from 0 to 1000.'),
        (
            "POOL_TIMEOUT",
            "0",
            'POOL_TIMEOUT ("0") must be a number of seconds greater than 0 '
            "and at most 86400 (one day).",
        ),
        (
            "POOL_TIMEOUT",
            "-5",
            'POOL_TIMEOUT ("-5") must be a number of seconds greater than 0 '
            "and at most 86400 (one day).",
        ),
        (
            "POOL_TIMEOUT",
            "none",
            'POOL_TIMEOUT ("none") must be a number of seconds greater than 0 '
            "and at most 86400 (one day).",
        ),
        (
            "POOL_TIMEOUT",
            "inf",
            'POOL_TIMEOUT ("inf") must be a number of seconds greater than 0 '
            "and at most 86400 (one day).",
        ),
        (
            "POOL_MAX_LIFETIME",
            "0",
            'POOL_MAX_LIFETIME ("0") must be a number of seconds greater than 0 and at most '
            "86400 (one day) (or empty / none to disable).",
        ),
        (
            "POOL_MAX_LIFETIME",
            "-1",
            'POOL_MAX_LIFETIME ("-1") must be a number of seconds greater than 0 and at most '
            "86400 (one day) (or empty / none to disable).",
        ),
        (
            "POOL_MAX_IDLE",
            "0",
            'POOL_MAX_IDLE ("0") must be a number of seconds greater than 0 and at most '
            "86400 (one day) (or empty / none to disable).",
        ),
        (
            "POOL_MAX_IDLE",
            "ten",
            'POOL_MAX_IDLE ("ten") must be a number of seconds greater than 0 and at most '
            "86400 (one day) (or empty / none to disable).",
        ),
        (
            "POOL_TEST_ON_BORROW",
            "maybe",
            'POOL_TEST_ON_BORROW ("maybe") must be a boolean (true/false, 1/0, yes/no, on/off).',
        ),
        (
            "POOL_PGBOUNCER",
            "sometimes",
            'POOL_PGBOUNCER ("sometimes") must be a boolean (true/false, 1/0, yes/no, on/off).',
        ),
    ],
)
def test_bad_pool_variable_is_an_error(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgres://u:p@h/db")
    monkeypatch.setenv(variable, value)
    error = error_of(config)
    assert str(error) == message
    assert error.__cause__ is None
    assert error.__suppress_context__


def test_quoted_value_is_escaped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POOL_MAX_CONNS", 'x"\ny')
    assert (
        str(error_of(config))
        == 'POOL_MAX_CONNS ("x\\"\\ny") must be a whole number from 1 to 1000.'
    )


@pytest.mark.parametrize(
    ("env", "kwargs", "message"),
    [
        (
            {"POOL_MIN_CONNS": "5", "POOL_MAX_CONNS": "2"},
            {},
            "POOL_MIN_CONNS (5) is greater than POOL_MAX_CONNS (2); "
            "the minimum must not exceed the maximum.",
        ),
        (
            {"POOL_MIN_CONNS": "5"},
            {},
            "POOL_MIN_CONNS (5) is greater than MAX_CONNS (4, the default); "
            "the minimum must not exceed the maximum.",
        ),
        (
            {"POOL_MIN_CONNS": "3"},
            {"max_conns": 2},
            "POOL_MIN_CONNS (3) is greater than the max_conns argument of "
            "herokupool.config() (2); the minimum must not exceed the maximum.",
        ),
        (
            {"POOL_MAX_CONNS": "2"},
            {"min_conns": 3},
            "The min_conns argument of herokupool.config() (3) is greater than "
            "POOL_MAX_CONNS (2); the minimum must not exceed the maximum.",
        ),
    ],
)
def test_min_above_max_names_both(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], kwargs: dict[str, Any], message: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgres://u:p@h/db")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert str(error_of(config, **kwargs)) == message


def test_keyword_arguments_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgres://u:p@h/db")
    monkeypatch.setenv("POOL_MAX_CONNS", "2")
    monkeypatch.setenv("POOL_TIMEOUT", "abc")  # overridden, so never parsed
    options = config(max_conns=8, timeout=3, max_idle=None)["default"]["OPTIONS"]
    assert options == {"MAX_CONNS": 8, "TIMEOUT": 3.0, "MAX_IDLE": None}


def test_bad_keyword_argument_value_is_an_error() -> None:
    assert str(error_of(config, max_conns=0)) == (
        "The max_conns argument of herokupool.config() (0) must be a whole number from 1 to 1000."
    )
    assert str(error_of(parse, "postgres://h/db", timeout="soon")) == (
        'The timeout argument of herokupool.parse() ("soon") must be a number of seconds '
        "greater than 0 and at most 86400 (one day)."
    )


@pytest.mark.parametrize("keyword", ["max_con", "MAX_CONNS", "CONN_MAX_AGE", "pool"])
def test_unknown_keyword_argument_is_a_type_error(keyword: str) -> None:
    with pytest.raises(
        TypeError, match=f"config\\(\\) got an unexpected keyword argument '{keyword}'"
    ):
        config(**{keyword: 1})
    with pytest.raises(
        TypeError, match=f"parse\\(\\) got an unexpected keyword argument '{keyword}'"
    ):
        parse("postgres://h/db", **{keyword: 1})


def test_bad_pool_variable_fails_with_a_pass_through_url_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "sqlite:///db.sqlite3")
    monkeypatch.setenv("POOL_MAX_CONNS", "0")
    assert str(error_of(config)) == 'POOL_MAX_CONNS ("0") must be a whole number from 1 to 1000.'


# --- SSL ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dyno", "url", "ssl_require", "sslmode"),
    [
        # On a dyno, a remote host gets sslmode=require...
        (True, "postgres://u:p@ec2-1-2-3-4.compute-1.amazonaws.com:5432/d", None, "require"),
        (True, "postgres://u:p@db.example.com/d", None, "require"),
        # ...unless the URL chose (Heroku's enhanced certificates use verify-full).
        (True, "postgres://u:p@db.example.com/d?sslmode=verify-full", None, "verify-full"),
        (True, "postgres://u:p@db.example.com/d?sslmode=disable", None, "disable"),
        (True, "postgres://u:p@db.example.com/d?sslmode=prefer", True, "prefer"),
        # Local hosts never get SSL forced: the pgbouncer buildpack listens there.
        (True, "postgres://u:p@127.0.0.1:6000/db1", None, None),
        (True, "postgres://u:p@localhost/d", None, None),
        (True, "postgres://u:p@[::1]/d", None, None),
        (True, "postgres://%2Fvar%2Frun%2Fpostgresql/d", None, None),
        (True, "postgres:///d", None, None),
        # Off a dyno nothing is forced (docker-compose hosts such as "db" have no TLS).
        (False, "postgres://u:p@db.example.com/d", None, None),
        (False, "postgres://u:p@db/d", None, None),
        # An explicit choice wins over the default.
        (False, "postgres://u:p@db.example.com/d", True, "require"),
        (False, "postgres://u:p@localhost/d", True, "require"),
        (True, "postgres://u:p@db.example.com/d", False, None),
    ],
)
def test_sslmode_default(
    monkeypatch: pytest.MonkeyPatch, dyno: bool, url: str, ssl_require: bool | None, sslmode: str
) -> None:
    if dyno:
        monkeypatch.setenv("DYNO", "web.1")
    monkeypatch.setenv("DATABASE_URL", url)
    assert config(ssl_require=ssl_require)["default"]["OPTIONS"].get("sslmode") == sslmode
    assert parse(url, ssl_require=ssl_require)["OPTIONS"].get("sslmode") == sslmode


@pytest.mark.parametrize(
    ("host", "local"),
    [
        ("", True),
        ("localhost", True),
        ("127.0.0.1", True),
        ("127.0.1.1", True),
        ("::1", True),
        ("/var/run/postgresql", True),
        ("@abstract", True),
        ("db.example.com", False),
        ("10.0.0.5", False),
        ("localhost.example.com", False),
    ],
)
def test_is_local_host(host: str, local: bool) -> None:
    assert is_local_host(host) is local


# --- PgBouncer ---------------------------------------------------------------------

REMOTE = "postgres://u:p@db.example.com:5432/app"
BOUNCER = "postgres://u:p@pooler.example.com:5433/app"


def test_pgbouncer_flag_disables_server_side_cursors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", REMOTE)
    assert config()["default"]["DISABLE_SERVER_SIDE_CURSORS"] is False
    assert config(pgbouncer=True)["default"]["DISABLE_SERVER_SIDE_CURSORS"] is True
    assert parse(REMOTE, pgbouncer=True)["DISABLE_SERVER_SIDE_CURSORS"] is True
    assert parse(REMOTE)["DISABLE_SERVER_SIDE_CURSORS"] is False


@pytest.mark.parametrize(
    ("env", "read", "expected"),
    [
        ({"DATABASE_URL": REMOTE, "POOL_PGBOUNCER": "true"}, "DATABASE_URL", True),
        ({"DATABASE_URL": REMOTE, "POOL_PGBOUNCER": "0"}, "DATABASE_URL", False),
        # Heroku's server-side connection pooling.
        ({"DATABASE_CONNECTION_POOL_URL": BOUNCER}, "DATABASE_CONNECTION_POOL_URL", True),
        ({"REPORTS_CONNECTION_POOL_URL": BOUNCER}, "REPORTS_CONNECTION_POOL_URL", True),
        # ...copied into DATABASE_URL.
        ({"DATABASE_URL": BOUNCER, "DATABASE_CONNECTION_POOL_URL": BOUNCER}, "DATABASE_URL", True),
        ({"DATABASE_URL": REMOTE, "DATABASE_CONNECTION_POOL_URL": BOUNCER}, "DATABASE_URL", False),
        # The pgbouncer buildpack's DATABASE_URL_PGBOUNCER.
        (
            {"DATABASE_URL_PGBOUNCER": "postgres://u:p@127.0.0.1:6000/db1"},
            "DATABASE_URL_PGBOUNCER",
            True,
        ),
        # An explicit "no" beats what the names suggest.
        (
            {"DATABASE_CONNECTION_POOL_URL": BOUNCER, "POOL_PGBOUNCER": "off"},
            "DATABASE_CONNECTION_POOL_URL",
            False,
        ),
    ],
)
def test_pgbouncer_is_detected_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], read: str, expected: bool
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert config(read)["default"]["DISABLE_SERVER_SIDE_CURSORS"] is expected


def test_pgbouncer_argument_beats_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_CONNECTION_POOL_URL", BOUNCER)
    monkeypatch.setenv("POOL_PGBOUNCER", "yes")
    databases = config("DATABASE_CONNECTION_POOL_URL", pgbouncer=False)
    assert databases["default"]["DISABLE_SERVER_SIDE_CURSORS"] is False


# --- DATABASE_URL unset ------------------------------------------------------------


def test_unset_url_does_not_raise_and_marks_the_alias() -> None:
    assert config() == {
        "default": {
            "ENGINE": PG,
            "NAME": "",
            "USER": "",
            "PASSWORD": "",
            "HOST": "",
            "PORT": "",
            "CONN_MAX_AGE": 0,
            "OPTIONS": {},
            MISSING_ENV_KEY: "DATABASE_URL",
        }
    }


@pytest.mark.parametrize("value", ["", "   "])
def test_empty_url_counts_as_unset(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("DATABASE_URL", value)
    assert config()["default"][MISSING_ENV_KEY] == "DATABASE_URL"
    assert config(default="postgres://u:p@h/db")["default"]["NAME"] == "db"


def test_unset_url_keeps_the_postgis_engine() -> None:
    assert config(postgis=True)["default"]["ENGINE"] == GIS


def test_missing_env_error_names_the_variable() -> None:
    error = missing_env_error(config("HEROKU_POSTGRESQL_PINK_URL")["default"])
    assert isinstance(error, ImproperlyConfigured)
    assert str(error) == (
        "HEROKU_POSTGRESQL_PINK_URL is not set; set it to your database's URL "
        "(postgres://USER:PASSWORD@HOST:PORT/NAME) or pass default= to herokupool.config()."
    )


def test_missing_env_error_is_none_for_a_configured_alias() -> None:
    assert missing_env_error(parse("postgres://u:p@h/db")) is None
    assert missing_env_error({"ENGINE": PG, "NAME": "db"}) is None


def test_default_is_used_when_the_variable_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    assert config(default="postgres://u:p@h/local")["default"]["NAME"] == "local"
    assert config(default="sqlite:///db.sqlite3")["default"]["ENGINE"] == (
        "django.db.backends.sqlite3"
    )
    monkeypatch.setenv("DATABASE_URL", "postgres://u:p@h/from_env")
    assert config(default="postgres://u:p@h/local")["default"]["NAME"] == "from_env"


def test_bad_pool_variable_fails_even_while_the_url_is_unset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("POOL_MAX_CONNS", "lots")
    assert str(error_of(config)) == 'POOL_MAX_CONNS ("lots") must be a whole number from 1 to 1000.'


# --- followers / more aliases -------------------------------------------------------


def test_followers_get_their_own_alias_and_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgres://u:p@primary.example.com/app")
    monkeypatch.setenv("HEROKU_POSTGRESQL_PINK_URL", "postgres://u:p@follower.example.com/app")
    monkeypatch.setenv("POOL_MAX_CONNS", "8")
    monkeypatch.setenv("REPLICA_POOL_MAX_CONNS", "2")
    databases = {
        **config(),
        **config("HEROKU_POSTGRESQL_PINK_URL", alias="replica", env_prefix="REPLICA_POOL_"),
    }
    assert databases["default"]["HOST"] == "primary.example.com"
    assert databases["default"]["OPTIONS"] == {"MAX_CONNS": 8}
    assert databases["replica"]["HOST"] == "follower.example.com"
    assert databases["replica"]["OPTIONS"] == {"MAX_CONNS": 2}


def test_follower_from_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POOL_MAX_CONNS", "8")  # parse() reads no POOL_* variable
    settings = parse("postgres://u:p@follower.example.com/app", max_conns=3)
    assert settings["OPTIONS"] == {"MAX_CONNS": 3}


def test_follower_variable_unset_marks_only_that_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgres://u:p@primary.example.com/app")
    replica = config("HEROKU_POSTGRESQL_PINK_URL", alias="replica")["replica"]
    assert replica[MISSING_ENV_KEY] == "HEROKU_POSTGRESQL_PINK_URL"
    assert MISSING_ENV_KEY not in config()["default"]


def test_follower_bad_variable_names_its_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPLICA_POOL_MIN_CONNS", "x")
    assert str(error_of(config, "HEROKU_POSTGRESQL_PINK_URL", env_prefix="REPLICA_POOL_")) == (
        'REPLICA_POOL_MIN_CONNS ("x") must be a whole number from 0 to 1000.'
    )


# --- the password never shows -------------------------------------------------------

PASSWORD = "Zq7-hunter2-SECRET"
QUOTED = quote(PASSWORD, safe="")


@pytest.mark.parametrize(
    ("env", "kwargs"),
    [
        ({"DATABASE_URL": f"foo://user:{QUOTED}@host/db"}, {}),
        ({"DATABASE_URL": f"postgres://user:{QUOTED}@host:port/db"}, {}),
        ({"DATABASE_URL": f"postgres://user:{QUOTED}@host:70000/db"}, {}),
        ({"DATABASE_URL": f"postgres://user:{QUOTED}@[::1/db"}, {}),
        # An unencoded "/" or "#" splits the password into host and port.
        ({"DATABASE_URL": f"postgres://user:{PASSWORD}/x@host/db"}, {}),
        ({"DATABASE_URL": f"postgres://user:{PASSWORD}#x@host/db"}, {}),
        ({"DATABASE_URL": f"postgres://user:{QUOTED}@host/db?pool=1"}, {}),
        ({"DATABASE_URL": f"postgres://user:{QUOTED}@host/db?max_conns=2"}, {}),
        ({"DATABASE_URL": f"postgres://user:{QUOTED}@host/db", "POOL_MIN_CONNS": "9"}, {}),
        ({"DATABASE_URL": f"postgres://user:{QUOTED}@host"}, {}),
        # An unencoded "/", "?" or "#" splits the password.
        ({"DATABASE_URL": f"postgres://user:58213/{PASSWORD}@host/db"}, {}),
        ({"DATABASE_URL": f"postgres://user:58213?{PASSWORD}@host/db"}, {}),
        ({"DATABASE_URL": f"postgres://user:{QUOTED}@host/db", "POOL_MAX_CONNS": "0"}, {}),
        ({"DATABASE_URL": f"postgres://user:{QUOTED}@host/db", "POOL_PGBOUNCER": "?"}, {}),
        ({"DATABASE_URL": f"postgres://user:{QUOTED}@host/db"}, {"timeout": -1}),
        ({"DATABASE_URL": f"postgres://user:{QUOTED}@host/db"}, {"min_conns": 99}),
        # The value of a POOL_* variable is quoted, but a password there is still masked.
        (
            {"DATABASE_URL": f"postgres://user:{QUOTED}@host/db", "POOL_RESET": "x"},
            {"max_conns": PASSWORD},
        ),
        ({}, {"default": f"postgres://user:{QUOTED}@host:x/db"}),
    ],
)
def test_password_never_appears_in_errors(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], kwargs: dict[str, Any]
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    error = error_of(config, **kwargs)
    for text in (str(error), repr(error), repr(error.args)):
        assert PASSWORD not in text
        assert QUOTED not in text
    # Raised "from None": no chained exception carries the URL.
    assert error.__cause__ is None
    assert error.__suppress_context__
