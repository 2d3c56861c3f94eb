"""config() over generated URLs, POOL_* values and keyword arguments.

Whatever the input, config() either returns a DATABASES dict the backend can use or
raises ImproperlyConfigured naming the variable (or argument) at fault: never another
exception type, and never a message, repr or args holding the password.  A URL it
accepts has the password in PASSWORD, whole, and nowhere else.
"""

from __future__ import annotations

import math
import os
import string
import threading
from typing import Any
from urllib.parse import quote

import pytest
from django.core.exceptions import ImproperlyConfigured
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from herokupool.config import MISSING_ENV_KEY, POOLED_ENGINES, config
from herokupool.options import MAX_CONNECTIONS, MAX_SECONDS, OPTIONS, parse_options, split_options

# Every generated password starts with "Zq7"; nothing else generated contains "Z", so a
# message can only hold the password by leaking it.
MARK = "Zq7"
NO_Z = st.characters(exclude_categories=("Cs",), exclude_characters="\x00Zz")
PLAIN = st.text(NO_Z, max_size=12)

passwords = st.builds(
    lambda tail: MARK + tail,
    st.text(
        string.ascii_letters.replace("Z", "") + string.digits + "-_.~!$&'()*+,;=:@/?#[]% ",
        min_size=1,
        max_size=16,
    ),
)
# Half the URLs are pooled ones, the rest pass through or are refused.
schemes = st.one_of(
    st.sampled_from(["postgres", "postgresql", "pgsql", "postgis", "POSTGRES"]),
    st.sampled_from(["sqlite", "mysql", "redshift", "foo", "http", "postgres+psycopg2", ""]),
)
hosts = st.one_of(
    st.sampled_from(
        [
            "db.example.com",
            "localhost",
            "127.0.0.1",
            "[::1]",
            "[2001:db8::1]",
            "%2Fvar%2Frun%2Fpostgresql",
            "[::1",
            "",
            "@abstract",
        ]
    ),
    st.text(string.ascii_lowercase + string.digits + ".-%[]:", max_size=20),
)
ports = st.one_of(
    st.just(""),
    st.integers(-1, 70000).map(lambda n: f":{n}"),
    PLAIN.map(lambda text: f":{text}"),
)
query_keys = st.one_of(
    st.sampled_from(
        [
            "sslmode",
            "application_name",
            "connect_timeout",
            "currentSchema",
            "pool",
            "prepared_statements",
            *(option.name for option in OPTIONS),
        ]
    ),
    st.text(string.ascii_letters.replace("Z", "").replace("z", "") + "_", min_size=1, max_size=8),
)
query_values = st.one_of(
    st.sampled_from(["", "0", "1", "4", "-1", "2.5", "true", "false", "none", "require", "abc"]),
    PLAIN.map(lambda text: quote(text, safe="")),
)
queries = st.lists(st.tuples(query_keys, query_values), max_size=4).map(
    lambda pairs: ("?" + "&".join(f"{k}={v}" for k, v in pairs)) if pairs else ""
)


@st.composite
def urls(draw: st.DrawFn) -> tuple[str, str, bool]:
    """(url, password, only): URL-shaped text, sometimes broken, the password raw or
    encoded; ``only`` when the password is the URL's only source of "@" characters."""
    password = draw(passwords)
    encoded = quote(password, safe="") if draw(st.booleans()) else password
    user = draw(st.text(string.ascii_lowercase + string.digits + "_", max_size=8))
    separator = draw(st.one_of(st.just("://"), st.sampled_from([":/", ":", "//", ""])))
    host, port = draw(hosts), draw(ports)
    url = (
        f"{draw(schemes)}{separator}{user}:{encoded}@{host}{port}"
        f"/{draw(PLAIN.map(lambda text: quote(text, safe='/')))}{draw(queries)}"
    )
    # An "@" in the host or port ("@abstract", ":@") moves the end of the password on
    # purpose: URL syntax cannot tell it from an "@" in the password.
    return url, password, "@" not in host + port


env_values = st.one_of(
    st.sampled_from(
        [
            "",
            " ",
            "0",
            "1",
            "2",
            "4",
            "8",
            "-1",
            "2.5",
            "1e3",
            "86400",
            "86401",
            "1000",
            "1001",
            "2.1e9",
            "9.2e9",
            "nan",
            "inf",
            "none",
            "true",
            "off",
            "DISCARD ALL",
            "abc",
        ]
    ),
    PLAIN,
)
pool_env = st.dictionaries(
    st.sampled_from([option.env for option in OPTIONS]), env_values, max_size=4
)
pgbouncer_env = st.one_of(
    st.none(), st.sampled_from(["true", "off", "1", "", "maybe"]) | env_values
)
keyword_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 50),
    st.integers(),
    st.floats(),
    PLAIN,
    st.lists(st.integers(), max_size=2),
)
pool_kwargs = st.dictionaries(
    st.sampled_from([option.keyword for option in OPTIONS]), keyword_values, max_size=2
)


def clean_environ(patch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if (
            name in {"DATABASE_URL", "DYNO"}
            or name.startswith("POOL_")
            or name.endswith(("CONNECTION_POOL_URL", "_URL_PGBOUNCER"))
        ):
            patch.delenv(name)


DURATIONS = ["timeout", "max_lifetime", "max_idle", "validate_after", "leak_threshold"]
NAMES = {option.name for option in OPTIONS}


def check_result(databases: dict[str, dict[str, Any]], password: str | None = None) -> None:
    assert list(databases) == ["default"]
    database = databases["default"]
    assert isinstance(database["ENGINE"], str)
    if database["ENGINE"] not in POOLED_ENGINES:
        return
    assert database["CONN_MAX_AGE"] == 0
    options = database["OPTIONS"]
    assert isinstance(options, dict)
    assert "pool" not in options
    assert "prepared_statements" not in options
    # What the backend will do with the pool settings must succeed...
    kwargs = parse_options(split_options(options)[0])
    # ...and stay in bounds: libpq reads connect_timeout (derived from the timeout) into
    # a C int, and a waiter's deadline must be a valid threading timeout.
    assert math.ceil(kwargs["timeout"]) <= 2**31 - 1
    for keyword in DURATIONS:
        assert kwargs[keyword] is None or 0 < kwargs[keyword] <= MAX_SECONDS
        assert kwargs[keyword] is None or kwargs[keyword] < threading.TIMEOUT_MAX
    assert 0 <= kwargs["min_conns"] <= kwargs["max_conns"] <= MAX_CONNECTIONS
    # No pool setting in another case reaches libpq.
    assert not any(key.upper() in NAMES for key in options if key not in NAMES)
    if MISSING_ENV_KEY in database:
        return
    assert isinstance(database["DISABLE_SERVER_SIDE_CURSORS"], bool)
    assert database["NAME"] or "service" in options
    if password is not None:
        # Accepted means understood: the password is whole in PASSWORD, no piece of it
        # in HOST, PORT, NAME or OPTIONS.  (A raw "%" is read as an escape: no way to tell.)
        assert database["PASSWORD"] == password or "%" in password
        others = repr({k: v for k, v in database.items() if k != "PASSWORD"})
        assert MARK not in others


def check_error(error: ImproperlyConfigured, password: str, names: set[str]) -> None:
    message = str(error)
    assert any(name in message for name in names), message
    for text in (message, repr(error), repr(error.args)):
        assert password not in text
        assert quote(password, safe="") not in text
        assert MARK not in text
    assert error.__cause__ is None
    assert error.__suppress_context__


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    url=urls(),
    env=pool_env,
    kwargs=pool_kwargs,
    dyno=st.booleans(),
    postgis=st.booleans(),
    pgbouncer=st.sampled_from([None, True, False]),
    pgbouncer_flag=pgbouncer_env,
)
def test_config_returns_settings_or_names_the_variable(
    url: tuple[str, str, bool],
    env: dict[str, str],
    kwargs: dict[str, Any],
    dyno: bool,
    postgis: bool,
    pgbouncer: bool | None,
    pgbouncer_flag: str | None,
) -> None:
    value, password, only = url
    if pgbouncer_flag is not None:
        env = {**env, "POOL_PGBOUNCER": pgbouncer_flag}
    with pytest.MonkeyPatch.context() as patch:
        clean_environ(patch)
        patch.setenv("DATABASE_URL", value)
        if dyno:
            patch.setenv("DYNO", "web.1")
        for name, setting in env.items():
            patch.setenv(name, setting)
        try:
            databases = config(postgis=postgis, pgbouncer=pgbouncer, **kwargs)
        except ImproperlyConfigured as error:
            names = {"DATABASE_URL", *env, *(f"{keyword} argument" for keyword in kwargs)}
            check_error(error, password, names)
        else:
            check_result(databases, password if only else None)


@settings(max_examples=300, deadline=None)
@given(
    before=st.text(NO_Z, max_size=30),
    password=passwords,
    after=st.text(NO_Z, max_size=30),
    use_default=st.booleans(),
)
def test_any_text_as_the_url(before: str, password: str, after: str, use_default: bool) -> None:
    value = f"{before}:{password}@{after}"
    with pytest.MonkeyPatch.context() as patch:
        clean_environ(patch)
        if not use_default:
            patch.setenv("DATABASE_URL", value)
        try:
            databases = config(default=value)
        except ImproperlyConfigured as error:
            check_error(error, password, {"DATABASE_URL"})
        else:
            check_result(databases)
