"""dj-database-url's keyword arguments on herokupool.config() and parse() (issue 17, item 2).

Migrating from Heroku's Django template is renaming the function: every argument of
``dj_database_url.config()`` / ``parse()`` is accepted and means what it should under a pool.
No database: these only build settings dicts.
"""

from __future__ import annotations

import inspect
from typing import Any

import dj_database_url
import pytest

from herokupool.config import POSTGIS_ENGINE, POSTGRESQL_ENGINE, config, parse
from tests.unit.test_config import clean_env, error_of  # noqa: F401  (clean_env: autouse)

PG = POSTGRESQL_ENGINE
GIS = POSTGIS_ENGINE
REMOTE = "postgres://u:p@db.example.com:5432/app"
SQLITE = "sqlite:///db.sqlite3"
# What Heroku's getting-started app passes to dj_database_url.config().
TEMPLATE: dict[str, Any] = {
    "env": "DATABASE_URL",
    "conn_max_age": 600,
    "conn_health_checks": True,
    "ssl_require": True,
}


@pytest.mark.parametrize(
    ("ours", "theirs", "skip"),
    [(config, dj_database_url.config, set()), (parse, dj_database_url.parse, {"url"})],
)
def test_every_dj_database_url_argument_is_accepted(ours: Any, theirs: Any, skip: set[str]) -> None:
    # Whatever the installed dj-database-url offers, so a new argument there fails here.
    theirs_names = set(inspect.signature(theirs).parameters) - skip
    assert theirs_names <= set(inspect.signature(ours).parameters)


def test_herokus_template_call_gives_a_pooled_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", REMOTE)
    alias = config(**TEMPLATE)["default"]
    assert alias["ENGINE"] == PG
    # The pool keeps the connections; Django must hand each back at the request's end.
    assert alias["CONN_MAX_AGE"] == 0
    # The pool validates what it lends (VALIDATE_AFTER): no SELECT 1 per request.
    assert alias["CONN_HEALTH_CHECKS"] is False
    assert alias["OPTIONS"] == {"sslmode": "require", "MAX_LIFETIME": 600.0}


def test_herokus_template_call_keeps_a_local_sqlite_fallback() -> None:
    # DATABASE_URL unset: the template's local SQLite, unpooled, as dj-database-url gives it
    # (ssl_require is PostgreSQL's sslmode: sqlite3.connect() would refuse it).
    databases = config(default=SQLITE, **TEMPLATE)
    assert databases == {
        "default": dj_database_url.parse(SQLITE, conn_max_age=600, conn_health_checks=True)
    }
    assert databases["default"]["CONN_MAX_AGE"] == 600
    assert "OPTIONS" not in databases["default"]


def test_a_non_postgresql_url_gets_every_argument_as_dj_database_url_reads_it() -> None:
    url = "mysql://u:p@mysql.example.com/app"
    arguments: dict[str, Any] = {
        "engine": "django.db.backends.mysql",
        "conn_max_age": None,
        "conn_health_checks": True,
        "disable_server_side_cursors": True,
        "test_options": {"NAME": "test_app"},
    }
    assert parse(url, **arguments) == dj_database_url.parse(url, **arguments)
    assert config(default=url, **arguments) == {"default": dj_database_url.parse(url, **arguments)}


# --- conn_max_age -> MAX_LIFETIME -------------------------------------------------------


@pytest.mark.parametrize(
    ("conn_max_age", "options"),
    [
        (600, {"MAX_LIFETIME": 600.0}),
        (60.5, {"MAX_LIFETIME": 60.5}),
        (None, {"MAX_LIFETIME": None}),  # Django's "persistent for ever": never recycled
        (0, {}),  # dj-database-url's default: the pool's default lifetime
    ],
)
def test_conn_max_age_becomes_the_pools_max_lifetime(
    conn_max_age: float | None, options: dict[str, Any]
) -> None:
    alias = parse(REMOTE, conn_max_age=conn_max_age, ssl_require=False)
    assert alias["CONN_MAX_AGE"] == 0
    assert alias["OPTIONS"] == options
    alias = config(default=REMOTE, conn_max_age=conn_max_age, ssl_require=False)["default"]
    assert alias["CONN_MAX_AGE"] == 0
    assert alias["OPTIONS"] == options


def test_herokupools_own_max_lifetime_beats_conn_max_age(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", REMOTE)
    monkeypatch.setenv("POOL_MAX_LIFETIME", "1800")
    assert config(conn_max_age=600)["default"]["OPTIONS"]["MAX_LIFETIME"] == 1800.0
    assert config(conn_max_age=600, max_lifetime=900)["default"]["OPTIONS"]["MAX_LIFETIME"] == 900.0
    assert parse(REMOTE, conn_max_age=600, max_lifetime=None)["OPTIONS"]["MAX_LIFETIME"] is None


@pytest.mark.parametrize(
    ("value", "shown"),
    [(-1, "-1"), (86401, "86401"), (True, "True"), ("600", '"600"'), (float("inf"), "inf")],
)
def test_a_bad_conn_max_age_is_refused(value: object, shown: str) -> None:
    rule = (
        "must be None, 0 or a number of seconds up to 86400 (one day); under the pool it "
        "becomes MAX_LIFETIME, the age at which a connection is replaced."
    )
    assert str(error_of(config, default=REMOTE, conn_max_age=value)) == (
        f"The conn_max_age argument of herokupool.config() ({shown}) {rule}"
    )
    # Refused on the SQLite fallback too, so the mistake shows before the deploy.
    assert str(error_of(parse, SQLITE, conn_max_age=value)) == (
        f"The conn_max_age argument of herokupool.parse() ({shown}) {rule}"
    )


# --- conn_health_checks, test_options, ssl_require ---------------------------------------


def test_conn_health_checks_leaves_validation_to_the_pool() -> None:
    alias = parse(REMOTE, conn_health_checks=True, ssl_require=False)
    assert alias["CONN_HEALTH_CHECKS"] is False
    assert alias["OPTIONS"] == {}  # VALIDATE_AFTER's default (0.5 s) already validates


def test_test_options_become_test() -> None:
    assert parse(REMOTE, test_options={"NAME": "test_app"})["TEST"] == {"NAME": "test_app"}
    assert "TEST" not in parse(REMOTE)


@pytest.mark.parametrize(
    ("keyword", "value", "said"),
    [
        ("conn_health_checks", "yes", '("yes") must be True or False.'),
        ("ssl_require", "yes", '("yes") must be True, False or None (decided from DYNO).'),
        (
            "disable_server_side_cursors",
            1,
            "(1) must be True, False or None (decided from PgBouncer).",
        ),
        ("test_options", ["NAME"], "(['NAME']) must be a dict of Django's TEST settings, or None."),
    ],
)
def test_a_bad_flag_or_test_options_is_refused(keyword: str, value: object, said: str) -> None:
    assert str(error_of(config, default=REMOTE, **{keyword: value})) == (
        f"The {keyword} argument of herokupool.config() {said}"
    )
    assert str(error_of(parse, REMOTE, **{keyword: value})) == (
        f"The {keyword} argument of herokupool.parse() {said}"
    )


# --- engine ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("engine", "expected"),
    [
        ("django.db.backends.postgresql", PG),
        ("django.contrib.gis.db.backends.postgis", GIS),
        (PG, PG),
        (GIS, GIS),
    ],
)
def test_a_postgresql_engine_becomes_herokupools_pooled_one(engine: str, expected: str) -> None:
    assert parse(REMOTE, engine=engine)["ENGINE"] == expected
    assert config(default=REMOTE, engine=engine)["default"]["ENGINE"] == expected
    assert config(engine=engine)["default"]["ENGINE"] == expected  # DATABASE_URL unset


def test_an_engine_herokupool_cannot_pool_is_refused() -> None:
    engine = "django_tenants.postgresql_backend"
    assert str(error_of(config, default=REMOTE, engine=engine)) == (
        'The engine argument of herokupool.config() ("django_tenants.postgresql_backend") is '
        "not an engine herokupool pools; pass Django's or herokupool's PostgreSQL or PostGIS "
        "engine, or leave it out and set ENGINE on the alias herokupool.config() returns "
        "(see the README, 'Libraries that check ENGINE names')."
    )


def test_herokupools_engine_needs_a_postgresql_url() -> None:
    assert str(error_of(parse, SQLITE, engine=PG)) == (
        'The engine argument of herokupool.parse() ("herokupool.db.backends.postgresql") '
        "needs a postgres:// URL, and the URL passed to herokupool.parse() has the scheme "
        "'sqlite://'; leave engine out for that URL."
    )


def test_engine_and_postgis_must_agree() -> None:
    assert str(error_of(parse, REMOTE, engine="django.db.backends.postgresql", postgis=True)) == (
        'The engine argument of herokupool.parse() ("django.db.backends.postgresql") is no '
        "PostGIS engine, but postgis=True asks for one; pass one of the two."
    )


# --- disable_server_side_cursors ---------------------------------------------------------


def test_disable_server_side_cursors_fills_in_what_pgbouncer_leaves_unset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert parse(REMOTE, disable_server_side_cursors=True)["DISABLE_SERVER_SIDE_CURSORS"] is True
    monkeypatch.setenv("DATABASE_URL", REMOTE)
    assert config(disable_server_side_cursors=True)["default"]["DISABLE_SERVER_SIDE_CURSORS"]
    # herokupool's own settings win: the keyword, then POOL_PGBOUNCER.
    alias = config(disable_server_side_cursors=True, pgbouncer=False)["default"]
    assert alias["DISABLE_SERVER_SIDE_CURSORS"] is False
    monkeypatch.setenv("POOL_PGBOUNCER", "false")
    alias = config(disable_server_side_cursors=True)["default"]
    assert alias["DISABLE_SERVER_SIDE_CURSORS"] is False
    # An explicit False beats what the variable's name suggests.
    monkeypatch.delenv("POOL_PGBOUNCER")
    monkeypatch.setenv("DATABASE_CONNECTION_POOL_URL", REMOTE)
    alias = config("DATABASE_CONNECTION_POOL_URL", disable_server_side_cursors=False)["default"]
    assert alias["DISABLE_SERVER_SIDE_CURSORS"] is False
    assert config("DATABASE_CONNECTION_POOL_URL")["default"]["DISABLE_SERVER_SIDE_CURSORS"]
