"""DATABASE_URL + POOL_* environment variables -> a Django ``DATABASES`` dict.

:func:`config` reads the environment and calls :func:`parse`, which hands the URL to
``dj_database_url.parse(url, engine=...)`` (herokupool writes no URL parser of its
own) and then adds what a pooled alias needs: the pool settings in ``OPTIONS``,
``CONN_MAX_AGE = 0``, ``sslmode=require`` on Heroku, ``DISABLE_SERVER_SIDE_CURSORS``
behind PgBouncer.  Both take every keyword argument of ``dj_database_url.config()`` and
``parse()`` too, with the meaning it has under a pool, so that a settings file written for
dj-database-url (Heroku's Django template) needs only the function's name changed.

Every problem is an :class:`~django.core.exceptions.ImproperlyConfigured` whose one
sentence names the variable, quotes the bad value and states the rule.  A database
URL is never quoted (it carries the password) and errors are raised ``from None`` so
that no chained exception shows it either.
"""

from __future__ import annotations

import json
import math
import os
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from herokupool._redact import scrub
from herokupool.options import BY_NAME, MAX_SECONDS, OptionError, parse_options
from herokupool.options import parse_bool as parse_flag

__all__ = [
    "DEFAULT_ENV",
    "DEFAULT_ENV_PREFIX",
    "MISSING_ENV_KEY",
    "POOLED_ENGINES",
    "POSTGIS_ENGINE",
    "POSTGRESQL_ENGINE",
    "SSL_REQUIRED_KEY",
    "config",
    "is_local_host",
    "is_pooled",
    "missing_env_error",
    "parse",
    "pgbouncer_urls",
    "with_ssl_hint",
]

POSTGRESQL_ENGINE = "herokupool.db.backends.postgresql"
POSTGIS_ENGINE = "herokupool.db.backends.postgis"
POOLED_ENGINES = frozenset({POSTGRESQL_ENGINE, POSTGIS_ENGINE})
# The engine= values a PostgreSQL URL may have: Django's engines become herokupool's, which
# subclass them (herokupool.config() exists to pool; an unpooled alias is dj-database-url's).
_POOLED_EQUIVALENTS = {
    "django.db.backends.postgresql": POSTGRESQL_ENGINE,
    POSTGRESQL_ENGINE: POSTGRESQL_ENGINE,
    "django.contrib.gis.db.backends.postgis": POSTGIS_ENGINE,
    POSTGIS_ENGINE: POSTGIS_ENGINE,
}

#: The variable :func:`config` reads by default, as on Heroku.
DEFAULT_ENV = "DATABASE_URL"
#: Pool settings come from ``POOL_MAX_CONNS``, ``POOL_MIN_CONNS``, ...
DEFAULT_ENV_PREFIX = "POOL_"
#: Top-level key of an alias whose URL variable was unset; its value is the variable.
MISSING_ENV_KEY = "HEROKUPOOL_MISSING_ENV"
#: Top-level key of an alias to which herokupool added ``sslmode=require`` because
#: ``DYNO`` is set; its value names where the URL came from (see :func:`with_ssl_hint`).
SSL_REQUIRED_KEY = "HEROKUPOOL_SSL_REQUIRED"

_POSTGRES_SCHEMES = frozenset({"postgres", "postgresql", "pgsql"})
_LOCAL_HOSTS = frozenset({"", "localhost", "127.0.0.1", "::1"})
_URL_SHAPE = "postgres://USER:PASSWORD@HOST:PORT/NAME"
# libpq's words when sslmode=require meets a server that offers no SSL.
_NO_SSL = "server does not support SSL, but SSL was required"

_T = TypeVar("_T")


def config(
    env: str = DEFAULT_ENV,
    default: str | None = None,
    *,
    engine: str | None = None,
    conn_max_age: float | None = 0,
    conn_health_checks: bool = False,
    disable_server_side_cursors: bool | None = None,
    ssl_require: bool | None = None,
    test_options: Mapping[str, Any] | None = None,
    alias: str = "default",
    postgis: bool = False,
    pgbouncer: bool | None = None,
    env_prefix: str = DEFAULT_ENV_PREFIX,
    **pool_options: Any,
) -> dict[str, dict[str, Any]]:
    """Return ``{alias: settings}`` for ``DATABASES`` from the URL in ``env``.

    Use it as the whole setting (``DATABASES = herokupool.config()``) and merge more
    calls in for followers: ``config("HEROKU_POSTGRESQL_PINK_URL", alias="replica",
    env_prefix="REPLICA_POOL_")``.

    Pool settings come from ``{env_prefix}MAX_CONNS`` and friends, overridden by
    keyword arguments with the lower-case names (``max_conns=8``).  ``pgbouncer`` and
    ``ssl_require`` default to ``None``: decided from the environment (see
    :func:`parse`; ``{env_prefix}PGBOUNCER`` also turns PgBouncer handling on or off).

    ``engine``, ``conn_max_age``, ``conn_health_checks``, ``disable_server_side_cursors``,
    ``ssl_require`` and ``test_options`` are dj-database-url's; see :func:`parse` for what
    each becomes.  herokupool's own settings win where they overlap: ``max_lifetime=`` and
    ``{env_prefix}MAX_LIFETIME`` over ``conn_max_age``, ``pgbouncer=`` and
    ``{env_prefix}PGBOUNCER`` over ``disable_server_side_cursors``.

    When ``env`` is unset or empty and there is no ``default``, this does not raise
    (settings must import during Heroku's build, which runs collectstatic): the alias
    gets herokupool's engine and a marker, and the first connection (and
    ``manage.py check``) raises :func:`missing_env_error`.

    Raises ``ImproperlyConfigured`` for a bad pool setting and for a URL :func:`parse`
    refuses, and ``TypeError`` for an unknown keyword argument.
    """
    url = os.environ.get(env, "").strip()
    if url:
        source = env
    elif default:
        url, source = default, f"the default URL passed to herokupool.config() ({env} is unset)"
    else:
        source = ""

    dj = _DjArguments.checked(
        "config",
        engine,
        conn_max_age,
        conn_health_checks,
        disable_server_side_cursors,
        ssl_require,
        test_options,
    )
    settings = _env_settings(env_prefix)
    settings.update(_keyword_settings(pool_options, "config"))
    dj.fill_in_max_lifetime(settings)
    if pgbouncer is None:
        pgbouncer = _pgbouncer_from_env(
            env, url, env_prefix, _password(url), dj.disable_server_side_cursors
        )

    if not url:
        _parse_pool_settings(settings, secret=None)  # a bad POOL_* fails now, not later
        return {alias: _missing(env, dj.pooled_engine(postgis))}
    return {alias: _parse(url, source, settings, postgis, pgbouncer, ssl_require, env_prefix, dj)}


def parse(
    url: str,
    *,
    engine: str | None = None,
    conn_max_age: float | None = 0,
    conn_health_checks: bool = False,
    disable_server_side_cursors: bool | None = None,
    ssl_require: bool | None = None,
    test_options: Mapping[str, Any] | None = None,
    postgis: bool = False,
    pgbouncer: bool | None = None,
    **pool_options: Any,
) -> dict[str, Any]:
    """Return one alias's settings dict for a database URL; read no POOL_* variable.

    ``postgres://``, ``postgresql://`` and ``pgsql://`` get herokupool's PostgreSQL
    engine (PostGIS with ``postgis=True``), ``postgis://`` its PostGIS engine; other
    schemes dj-database-url knows (``sqlite://``, ``mysql://``, ...) pass through
    unpooled, exactly as ``dj_database_url.parse`` returns them given the same
    ``engine``, ``conn_max_age``, ``conn_health_checks``, ``disable_server_side_cursors``
    and ``test_options`` (not ``ssl_require``: it is PostgreSQL's ``sslmode``, which
    ``sqlite3.connect()`` would refuse).

    dj-database-url's arguments on a pooled alias:

    - ``engine``: Django's or herokupool's PostgreSQL or PostGIS engine, giving herokupool's
      (``postgis=True`` must agree); any other engine is refused;
    - ``conn_max_age`` becomes ``MAX_LIFETIME`` (0, the default, leaves it unset; ``None``
      turns recycling off) unless ``max_lifetime=`` is given: a kept connection's age limit
      is what the pool's lifetime is, while ``CONN_MAX_AGE`` itself stays 0;
    - ``conn_health_checks`` adds nothing: ``CONN_HEALTH_CHECKS`` stays False, as the pool
      validates a connection idle for ``VALIDATE_AFTER`` before lending it;
    - ``disable_server_side_cursors`` sets ``DISABLE_SERVER_SIDE_CURSORS`` unless
      ``pgbouncer=`` is given;
    - ``test_options`` becomes ``TEST``.

    On a pooled alias:

    - URL query parameters are libpq ``OPTIONS``; a pool setting there, in any case
      (``?max_conns=2``), is an error: libpq would refuse it on every connect;
    - ``CONN_MAX_AGE`` is 0: the pool keeps the connections;
    - ``OPTIONS["sslmode"]`` is set to ``require`` when the URL has no sslmode and
      either ``ssl_require`` is true, or it is ``None``, the process runs on a Heroku
      dyno (``DYNO`` is set) and the host is not local (localhost, 127.*, ::1, a unix
      socket); the alias then carries ``SSL_REQUIRED_KEY`` so that a server without
      SSL gets an error saying why (see :func:`with_ssl_hint`);
    - ``pgbouncer=True`` sets ``DISABLE_SERVER_SIDE_CURSORS``.

    Raises ``ImproperlyConfigured`` for a bad pool setting or dj-database-url argument, an
    unknown scheme, a malformed URL, a pool setting in the query string, a URL that names
    no database and a password whose unencoded ``/``, ``?`` or ``#`` split the URL;
    ``TypeError`` for an unknown keyword argument.
    """
    dj = _DjArguments.checked(
        "parse",
        engine,
        conn_max_age,
        conn_health_checks,
        disable_server_side_cursors,
        ssl_require,
        test_options,
    )
    settings = _keyword_settings(pool_options, "parse")
    dj.fill_in_max_lifetime(settings)
    if pgbouncer is None:
        pgbouncer = bool(dj.disable_server_side_cursors)
    source = "the URL passed to herokupool.parse()"
    return _parse(url, source, settings, postgis, pgbouncer, ssl_require, None, dj)


def missing_env_error(settings_dict: Mapping[str, Any]) -> ImproperlyConfigured | None:
    """The error for an alias :func:`config` built without its URL, else ``None``.

    The backend raises it on connect and the ``herokupool.E001`` check reports it.
    """
    env = settings_dict.get(MISSING_ENV_KEY)
    if not env:
        return None
    return ImproperlyConfigured(
        f"{env} is not set; set it to your database's URL ({_URL_SHAPE}) "
        "or pass default= to herokupool.config()."
    )


def is_pooled(settings_dict: Mapping[str, Any]) -> bool:
    """Whether a ``DATABASES`` entry uses one of herokupool's engines."""
    return settings_dict.get("ENGINE") in POOLED_ENGINES


def with_ssl_hint(connect: Callable[[], _T], settings_dict: Mapping[str, Any]) -> Callable[[], _T]:
    """Wrap ``connect`` so that a server refusing the SSL herokupool required says why.

    On a dyno :func:`parse` adds ``sslmode=require`` for a remote host, and libpq's
    error then reads as if the user had asked for SSL.  The backend wraps its connect
    function with this: when the alias carries ``SSL_REQUIRED_KEY`` and still has that
    sslmode, libpq's "server does not support SSL" error is raised again, as the same
    exception type, with a sentence saying that DYNO made herokupool require SSL and how
    to turn it off.  Other errors, and an sslmode the user chose, pass unchanged.
    """
    source = settings_dict.get(SSL_REQUIRED_KEY)
    options = settings_dict.get("OPTIONS") or {}
    if not source or options.get("sslmode") != "require":
        return connect

    def connect_or_explain() -> _T:
        try:
            return connect()
        except Exception as error:
            text = str(error)
            if _NO_SSL not in text:
                raise
            message = (
                f"{text.rstrip()}; herokupool required SSL (sslmode=require) because DYNO is "
                "set and the host is not local: if this server has no SSL, set sslmode in the "
                f"query string of {source} (?sslmode=prefer or ?sslmode=disable) or pass "
                "ssl_require=False."
            )
            try:
                # The same type (psycopg2.OperationalError), so Django and the pool treat
                # it as they would have treated libpq's error.
                clearer = type(error)(message)
            except Exception:
                raise error from None
            # libpq's message holds no password; the original stays as the cause.
            raise clearer from error

    return connect_or_explain


# A pool setting's raw value and the words naming where it came from (a noun phrase
# such as "POOL_MAX_CONNS" or "the max_conns argument of herokupool.config()").
_Settings = dict[str, tuple[object, str]]


def _env_settings(prefix: str) -> _Settings:
    # A variable that is set but empty counts: "POOL_MAX_LIFETIME=" disables recycling.
    return {
        name: (os.environ[prefix + name], prefix + name)
        for name in BY_NAME
        if prefix + name in os.environ
    }


def _keyword_settings(pool_options: Mapping[str, Any], function: str) -> _Settings:
    settings: _Settings = {}
    for keyword, value in pool_options.items():
        name = keyword.upper()
        if keyword != name.lower() or name not in BY_NAME:
            # The message Python gives for any function's unknown keyword argument.
            raise TypeError(f"{function}() got an unexpected keyword argument {keyword!r}")
        settings[name] = (value, f"the {keyword} argument of herokupool.{function}()")
    return settings


def _missing(env: str, engine: str) -> dict[str, Any]:
    return {
        "ENGINE": engine,
        "NAME": "",
        "USER": "",
        "PASSWORD": "",
        "HOST": "",
        "PORT": "",
        "CONN_MAX_AGE": 0,
        "OPTIONS": {},
        MISSING_ENV_KEY: env,
    }


def _parse(
    url: str,
    source: str,
    settings: _Settings,
    postgis: bool,
    pgbouncer: bool,
    ssl_require: bool | None,
    env_prefix: str | None,
    dj: _DjArguments,
) -> dict[str, Any]:
    """Settings for ``url``; ``env_prefix`` is None for :func:`parse`, which reads no
    variable."""
    secret = _password(url)
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        _malformed(source)
    scheme = parts.scheme
    engine: str | None
    if scheme == "postgis" and dj.engine is None:
        engine = POSTGIS_ENGINE
    elif scheme in _POSTGRES_SCHEMES or scheme == "postgis":
        engine = dj.pooled_engine(postgis)
    else:
        engine = None
        if dj.engine in POOLED_ENGINES:
            _fail(
                f"{_capital(dj.label('engine'))} ({_quote(dj.engine, None)}) needs a postgres:// "
                f"URL, and {source} has the scheme {_scheme_text(scheme, secret)}; leave engine "
                "out for that URL."
            )
    if engine is not None and _password_split(parts):
        _fail(
            f"{_capital(source)} has an '@' after its host (its value is not shown: it may hold "
            "a password), which is what an unencoded '/', '?' or '#' in the password leaves; "
            "percent-encode the password (urllib.parse.quote(password, safe='')), and write "
            "an '@' in the database name or a query value as %40."
        )
    parsed: dict[str, Any]
    try:
        if engine is None:
            parsed = dict(
                dj_database_url.parse(
                    url,
                    engine=dj.engine,
                    conn_max_age=dj.conn_max_age,
                    conn_health_checks=dj.conn_health_checks,
                    disable_server_side_cursors=bool(dj.disable_server_side_cursors),
                    test_options=dj.test_options,
                )
            )
        else:
            parsed = dict(
                dj_database_url.parse(
                    url,
                    engine=engine,
                    conn_max_age=0,
                    disable_server_side_cursors=pgbouncer,
                    test_options=dj.test_options,
                )
            )
    except dj_database_url.UnknownSchemeError:
        _fail(
            f"{_capital(source)} has an unknown scheme ({_scheme_text(scheme, secret)}); use "
            "postgres://, postgresql://, pgsql:// or postgis:// (or another scheme "
            "dj-database-url knows, such as sqlite:// or mysql://)."
        )
    except ValueError:
        _malformed(source)

    if engine is None:
        # Pool settings are checked all the same, so a typo fails on SQLite too.
        _parse_pool_settings(settings, secret)
        return parsed

    options: dict[str, Any] = parsed.setdefault("OPTIONS", {})
    if "pool" in options:
        _fail(
            f"{_capital(source)} has a 'pool' query parameter, which asks for Django's own "
            "psycopg 3 pool; herokupool already pools this alias's connections, so remove it."
        )
    # The pgbouncer buildpack appends this Rails setting to the URLs it writes; it is
    # no libpq parameter (psycopg2 prepares nothing), and libpq would refuse it.
    options.pop("prepared_statements", None)
    for key in options:
        # Pool settings have one home: the variables (or keyword arguments).  In the URL
        # libpq would get them (Heroku also rewrites DATABASE_URL when it rotates
        # credentials, dropping anything added to it).  Any case: "max_conns" is no more
        # a libpq parameter than "MAX_CONNS".
        option = BY_NAME.get(key.upper())
        if option is not None:
            fix = (
                f"pass {option.keyword}= to herokupool.parse()"
                if env_prefix is None
                else f"set {env_prefix}{option.name}"
            )
            _fail(
                f"{_capital(source)} has the pool setting {key!r} in its query string, where "
                f"libpq would take it for a connection parameter; {fix} instead."
            )
    if not parsed.get("NAME") and "service" not in options:
        # Django needs NAME (or a pg_service.conf entry) and would say so naming no
        # variable, on the first query.
        _fail(
            f"{_capital(source)} names no database (its value is not shown: it may hold a "
            f"password); it must look like {_URL_SHAPE}."
        )
    options.update(_parse_pool_settings(settings, secret))
    if "sslmode" not in options and _ssl_wanted(ssl_require, parsed.get("HOST", "")):
        options["sslmode"] = "require"
        if ssl_require is None:
            parsed[SSL_REQUIRED_KEY] = source
    return parsed


@dataclass(frozen=True)
class _DjArguments:
    """dj-database-url's keyword arguments to config() or parse(), checked."""

    function: str  # "config" or "parse", for messages
    engine: str | None
    conn_max_age: Any  # None or a number of seconds (dj-database-url types it int | None)
    conn_health_checks: bool
    disable_server_side_cursors: bool | None
    test_options: dict[str, Any] | None

    @classmethod
    def checked(
        cls,
        function: str,
        engine: object,
        conn_max_age: object,
        conn_health_checks: object,
        disable_server_side_cursors: object,
        ssl_require: object,
        test_options: object,
    ) -> _DjArguments:
        """Check each argument's type and range; ``ssl_require`` is herokupool's own
        (True, False or None) and only checked here."""

        def refuse(keyword: str, value: object, rule: str) -> NoReturn:
            _refuse_argument(function, keyword, value, rule)

        if engine is not None and not isinstance(engine, str):
            refuse(
                "engine",
                engine,
                f"must be a dotted module path such as {POSTGRESQL_ENGINE!r}, or None.",
            )
        if conn_max_age is not None and not (
            isinstance(conn_max_age, int | float)
            and not isinstance(conn_max_age, bool)
            and math.isfinite(conn_max_age)
            and 0 <= conn_max_age <= MAX_SECONDS
        ):
            refuse(
                "conn_max_age",
                conn_max_age,
                f"must be None, 0 or a number of seconds up to {MAX_SECONDS:.0f} (one day); "
                "under the pool it becomes MAX_LIFETIME, the age at which a connection is "
                "replaced.",
            )
        if not isinstance(conn_health_checks, bool):
            refuse("conn_health_checks", conn_health_checks, "must be True or False.")
        for name, value, decided_from in (
            ("disable_server_side_cursors", disable_server_side_cursors, "PgBouncer"),
            ("ssl_require", ssl_require, "DYNO"),
        ):
            if value is not None and not isinstance(value, bool):
                refuse(name, value, f"must be True, False or None (decided from {decided_from}).")
        if test_options is not None and not isinstance(test_options, Mapping):
            refuse(
                "test_options", test_options, "must be a dict of Django's TEST settings, or None."
            )
        return cls(
            function,
            engine,
            conn_max_age,
            conn_health_checks,
            disable_server_side_cursors,  # type: ignore[arg-type]  # checked above
            dict(test_options) if test_options else None,
        )

    def label(self, keyword: str) -> str:
        return _argument_label(self.function, keyword)

    def fill_in_max_lifetime(self, settings: _Settings) -> None:
        """Let ``conn_max_age`` set MAX_LIFETIME where herokupool's own settings did not.

        Django replaces a kept connection older than CONN_MAX_AGE; under a pool that is
        the pool's lifetime.  0 (dj-database-url's default: no connection kept) says
        nothing about it; None (kept for ever) turns recycling off.
        """
        if self.conn_max_age != 0 and "MAX_LIFETIME" not in settings:
            settings["MAX_LIFETIME"] = (self.conn_max_age, self.label("conn_max_age"))

    def pooled_engine(self, postgis: bool) -> str:
        """herokupool's engine for a PostgreSQL URL, from ``engine`` and ``postgis``."""
        if self.engine is None:
            return POSTGIS_ENGINE if postgis else POSTGRESQL_ENGINE
        pooled = _POOLED_EQUIVALENTS.get(self.engine)
        if pooled is None:
            _refuse_argument(
                self.function,
                "engine",
                self.engine,
                "is not an engine herokupool pools; pass Django's or herokupool's PostgreSQL "
                "or PostGIS engine, or leave it out and set ENGINE on the alias "
                f"herokupool.{self.function}() returns (see the README, 'Libraries that check "
                "ENGINE names').",
            )
        if postgis and pooled != POSTGIS_ENGINE:
            _refuse_argument(
                self.function,
                "engine",
                self.engine,
                "is no PostGIS engine, but postgis=True asks for one; pass one of the two.",
            )
        return pooled


def _argument_label(function: str, keyword: str) -> str:
    return f"the {keyword} argument of herokupool.{function}()"


def _refuse_argument(function: str, keyword: str, value: object, rule: str) -> NoReturn:
    _fail(f"{_capital(_argument_label(function, keyword))} ({_quote(value, None)}) {rule}")


def _password_split(parts: urllib.parse.SplitResult) -> bool:
    """Whether the URL has the shape an unencoded ``/``, ``?`` or ``#`` in its password
    leaves.

    The authority ends at the first of those, so the rest of the password and the real
    host ("...@db:5432") land in the path, the query or the fragment, and the start of
    the password may become the port.  An unencoded "@" there is the trace: a database
    name with "@" is written %40 and a fragment means nothing to a database URL.  A
    query "@" counts when there is no database name (a "?" in the password cut the URL
    before its "/NAME") or no "USER:PASSWORD@" before the host (a "postgres:/" typo puts
    the password in the path); else it may be a query value's own.
    """
    return (
        "@" in parts.path
        or "@" in parts.fragment
        or ("@" in parts.query and (parts.path in {"", "/"} or "@" not in parts.netloc))
    )


def _parse_pool_settings(settings: _Settings, secret: str | None) -> dict[str, Any]:
    """Parse each set value with options.py's rules; word errors for its source."""
    parsed: dict[str, Any] = {}
    for name, (value, label) in settings.items():
        try:
            parsed[name] = BY_NAME[name].parse(name, value)
        except OptionError as error:
            _fail(f"{_capital(label)} ({_quote(value, secret)}) {error.rule}")
    try:
        parse_options(parsed)  # the rules across settings: MIN_CONNS <= MAX_CONNS
    except OptionError as error:
        if error.name == "MIN_CONNS":
            _, min_label = settings["MIN_CONNS"]
            if "MAX_CONNS" in settings:
                maximum = f"{settings['MAX_CONNS'][1]} ({parsed['MAX_CONNS']})"
            else:
                maximum = f"MAX_CONNS ({BY_NAME['MAX_CONNS'].default}, the default)"
            _fail(
                f"{_capital(min_label)} ({parsed['MIN_CONNS']}) is greater than {maximum}; "
                "the minimum must not exceed the maximum."
            )
        label = settings[error.name][1] if error.name in settings else error.name
        _fail(f"{_capital(label)} ({_quote(error.value, secret)}) {error.rule}")
    return parsed


def _pgbouncer_from_env(
    env: str, url: str, prefix: str, secret: str | None, disable_server_side_cursors: bool | None
) -> bool:
    flag = os.environ.get(prefix + "PGBOUNCER")
    if flag is not None:
        try:
            return parse_flag(prefix + "PGBOUNCER", flag)
        except OptionError as error:
            _fail(f"{prefix}PGBOUNCER ({_quote(flag, secret)}) {error.rule}")
    if disable_server_side_cursors is not None:
        # dj-database-url's argument: below herokupool's own settings, above a guess.
        return disable_server_side_cursors
    if _is_pgbouncer_env(env):
        return True
    # DATABASE_URL set to a copy of one of those variables' values.
    return bool(url) and url in pgbouncer_urls()


def _is_pgbouncer_env(name: str) -> bool:
    # Heroku's connection pooling attaches as DATABASE_CONNECTION_POOL_URL (or
    # <NAME>_CONNECTION_POOL_URL with --as); the pgbouncer buildpack writes
    # DATABASE_URL_PGBOUNCER for each of its PGBOUNCER_URLS.
    return name.endswith(("CONNECTION_POOL_URL", "_URL_PGBOUNCER"))


def pgbouncer_urls() -> list[str]:
    """The URLs of PgBouncers in the environment (Heroku connection pooling, buildpack)."""
    return [value for name, value in os.environ.items() if _is_pgbouncer_env(name) and value]


def _ssl_wanted(ssl_require: bool | None, host: str) -> bool:
    if ssl_require is not None:
        return ssl_require
    return "DYNO" in os.environ and not is_local_host(host)


def is_local_host(host: str) -> bool:
    """Whether libpq reaches ``host`` without leaving the machine (no TLS there)."""
    # "/..." is a unix-socket directory, "@..." an abstract unix socket (libpq >= 14).
    return host in _LOCAL_HOSTS or host.startswith(("/", "@", "127."))


def _password(url: str) -> str | None:
    """The URL's password if it can be found, to scrub from any message."""
    try:
        password = urllib.parse.urlsplit(url).password
    except ValueError:
        return None
    return urllib.parse.unquote(password) if password else None


def _malformed(source: str) -> NoReturn:
    _fail(
        f"{_capital(source)} is not a valid database URL (its value is not shown: it may hold a "
        f"password); it must look like {_URL_SHAPE}, with special characters in USER and "
        "PASSWORD percent-encoded."
    )


def _fail(message: str) -> NoReturn:
    # "from None": the exception being handled may carry the URL.
    raise ImproperlyConfigured(message) from None


def _quote(value: object, secret: str | None) -> str:
    """A value for a message, with the URL's password masked should it be in there.

    Only the quoted values are scrubbed: a short password ("pass") must not mask the
    words of the message around them.
    """
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, str) else repr(value)
    return scrub(text, secret)


def _scheme_text(scheme: str, secret: str | None) -> str:
    return scrub(f"'{scheme}://'", secret) if scheme else "none given"


def _capital(phrase: str) -> str:
    return phrase[:1].upper() + phrase[1:]
