"""System checks for herokupool's settings (no I/O: nothing here connects).

Registered by :class:`herokupool.apps.HerokupoolConfig` when ``"herokupool"`` is in
``INSTALLED_APPS``, under the ``herokupool`` tag (``manage.py check --tag herokupool``).
collectstatic runs only the staticfiles checks, so an unset DATABASE_URL during
Heroku's build is reported by ``manage.py check`` and ``migrate``, not by the build.

IDs are never reused; docs/configuration.md lists them all.  The pool enforces the
same value rules when it is created, since checks only run when the app is installed.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import dj_database_url
from django.apps import AppConfig
from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning

from herokupool._redact import scrub
from herokupool.config import DEFAULT_ENV_PREFIX, is_pooled, missing_env_error, pgbouncer_urls
from herokupool.options import (
    BY_NAME,
    DJANGO_POOL,
    DJANGO_POOL_CLASH,
    OPTIONS,
    OptionError,
    django_pool_fix,
    parse_options,
    split_options,
)
from herokupool.options import parse_bool as parse_flag

__all__ = ["TAG", "check_databases", "check_environment", "check_libraries"]

TAG = "herokupool"

_DOCS = "See docs/configuration.md"
#: django-cachalot's default CACHALOT_DATABASES: the aliases whose ENGINE is on its list.
_CACHALOT_DEFAULT = "supported_only"
#: Environment variables that mean nothing without a herokupool alias.
_POOL_VARIABLES = (
    *(option.env for option in OPTIONS),
    f"{DEFAULT_ENV_PREFIX}PGBOUNCER",
    f"{DEFAULT_ENV_PREFIX}CONNECTION_LIMIT",
)


def check_databases(
    app_configs: Sequence[AppConfig] | None = None,
    databases: Sequence[str] | None = None,
    **kwargs: Any,
) -> list[CheckMessage]:
    """Check each herokupool alias in ``DATABASES`` on its own (E001-E005, W001-W002)."""
    messages: list[CheckMessage] = []
    for alias, database in settings.DATABASES.items():
        if is_pooled(database):
            messages.extend(_check_alias(alias, database))
    return messages


def check_environment(
    app_configs: Sequence[AppConfig] | None = None,
    databases: Sequence[str] | None = None,
    **kwargs: Any,
) -> list[CheckMessage]:
    """Check the POOL_* variables against the aliases (E006, W003-W004)."""
    pooled = {alias: db for alias, db in settings.DATABASES.items() if is_pooled(db)}
    if not pooled:
        unused = [name for name in _POOL_VARIABLES if name in os.environ]
        if not unused:
            return []
        return [
            Warning(
                f"{', '.join(unused)} {'is' if len(unused) == 1 else 'are'} set, but no alias "
                "in DATABASES uses a herokupool engine, so nothing reads "
                f"{'it' if len(unused) == 1 else 'them'}.",
                hint="Use DATABASES = herokupool.config() (or ENGINE "
                "'herokupool.db.backends.postgresql'), or unset the variables.",
                id="herokupool.W003",
            )
        ]
    messages: list[CheckMessage] = []
    limit = _whole_number(f"{DEFAULT_ENV_PREFIX}CONNECTION_LIMIT", messages)
    processes = _whole_number("WEB_CONCURRENCY", messages) or 1
    if limit is not None:
        messages.extend(_check_budget(pooled, processes, limit))
    return messages


def check_libraries(
    app_configs: Sequence[AppConfig] | None = None,
    databases: Sequence[str] | None = None,
    **kwargs: Any,
) -> list[CheckMessage]:
    """Libraries that recognise backends by ENGINE name and skip herokupool's (W005).

    django-cachalot caches the aliases in ``CACHALOT_DATABASES``; its default,
    ``"supported_only"``, takes the aliases whose ENGINE is on its own list
    (``cachalot.settings.SUPPORTED_DATABASE_ENGINES``), which has Django's PostgreSQL
    engine and not herokupool's, so a herokupool alias is silently left uncached.  An
    explicit list is the user's choice and is left alone.
    """
    installed = settings.INSTALLED_APPS
    if not any(app == "cachalot" or app.startswith("cachalot.") for app in installed):
        return []
    if getattr(settings, "CACHALOT_ENABLED", True) is False:
        return []
    if getattr(settings, "CACHALOT_DATABASES", _CACHALOT_DEFAULT) != _CACHALOT_DEFAULT:
        return []
    pooled = {alias: str(db["ENGINE"]) for alias, db in settings.DATABASES.items() if is_pooled(db)}
    if not pooled:
        return []
    supported = _cachalot_engines()
    # Setting CACHALOT_DATABASES replaces "supported_only": keep what it already caches.
    keep = [
        alias
        for alias, database in settings.DATABASES.items()
        if alias in pooled or database.get("ENGINE") in supported
    ]
    skipped = " and ".join(f"DATABASES[{alias!r}]" for alias in pooled)
    return [
        Warning(
            f"django-cachalot caches no query on {skipped}: CACHALOT_DATABASES is "
            f'"{_CACHALOT_DEFAULT}" (its default), which takes only the ENGINE names on '
            "cachalot's own list, and herokupool's engines are not on it.",
            hint=f"Name the aliases cachalot is to cache: CACHALOT_DATABASES = {keep!r}, and "
            "CACHALOT_ADDITIONAL_SUPPORTED_DATABASES = "
            f"{sorted(set(pooled.values()))!r} where cachalot has it (else silence "
            "cachalot.W003); or silence herokupool.W005 to leave them uncached.",
            id="herokupool.W005",
        )
    ]


def _cachalot_engines() -> frozenset[str]:
    """cachalot's own ENGINE allow-list, or nothing when it cannot be imported."""
    try:
        module = importlib.import_module("cachalot.settings")
    except ImportError:
        return frozenset()
    return frozenset(getattr(module, "SUPPORTED_DATABASE_ENGINES", ()))


def _check_alias(alias: str, database: Mapping[str, Any]) -> list[CheckMessage]:
    obj = f"DATABASES[{alias!r}]"
    missing = missing_env_error(database)
    if missing is not None:
        return [
            Error(
                str(missing),
                hint="On Heroku, attach a Postgres add-on (heroku addons:create "
                "heroku-postgresql); locally, export the variable or pass default=.",
                obj=obj,
                id="herokupool.E001",
            )
        ]
    messages: list[CheckMessage] = []
    options = database.get("OPTIONS") or {}
    if not isinstance(options, Mapping):
        return messages  # Django reports a non-dict OPTIONS itself, on connect
    pool_settings, libpq_options = split_options(options)
    password = database.get("PASSWORD")
    messages.extend(_check_pool_settings(obj, pool_settings, password))

    django_pool = pool_settings.get(DJANGO_POOL)
    if django_pool:  # a false one asks for no pool, as Django reads it
        fix = django_pool_fix(django_pool)
        messages.append(
            Error(
                f"OPTIONS[{DJANGO_POOL!r}] ({scrub(repr(django_pool), password)}) "
                f"{DJANGO_POOL_CLASH}.",
                hint=fix[:1].upper() + fix[1:],
                obj=obj,
                id="herokupool.E004",
            )
        )
    for key in libpq_options:
        # Any case but the upper-case name (which split_options took as a pool setting).
        if isinstance(key, str) and key.upper() in BY_NAME:
            messages.append(
                Error(
                    f"OPTIONS has {key!r}, which is no libpq parameter: pool settings are "
                    "upper case, and libpq would refuse to connect.",
                    hint=f"Rename it to {key.upper()!r}.",
                    obj=obj,
                    id="herokupool.E005",
                )
            )

    conn_max_age = database.get("CONN_MAX_AGE", 0)
    if conn_max_age != 0:
        messages.append(
            Warning(
                f"CONN_MAX_AGE is {scrub(repr(conn_max_age), password)}; on a pooled alias "
                "every thread would keep its connection between requests, pinning it outside "
                "the pool.",
                hint="Set CONN_MAX_AGE to 0 (herokupool.config() does): the pool keeps "
                "connections open.",
                obj=obj,
                id="herokupool.W001",
            )
        )

    if not database.get("DISABLE_SERVER_SIDE_CURSORS") and _behind_pgbouncer(database):
        messages.append(
            Warning(
                "This alias connects through PgBouncer but DISABLE_SERVER_SIDE_CURSORS is "
                "not set; in transaction pooling mode .iterator() querysets fail with "
                "'cursor does not exist'.",
                hint="Set DISABLE_SERVER_SIDE_CURSORS to True (herokupool.config() does "
                "when it sees PgBouncer), or set POOL_PGBOUNCER=false if PgBouncer runs in "
                "session mode.",
                obj=obj,
                id="herokupool.W002",
            )
        )
    return messages


def _check_pool_settings(
    obj: str, pool_settings: Mapping[str, Any], password: object
) -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    parsed: dict[str, Any] = {}
    for name, value in pool_settings.items():
        if name == DJANGO_POOL:
            continue  # E004
        try:
            parsed[name] = BY_NAME[name].parse(name, value)
        except OptionError as error:
            messages.append(
                Error(
                    # Only the quoted value is scrubbed, so a short password cannot
                    # mask the message's own words.
                    f"OPTIONS[{name!r}] ({scrub(repr(value), password)}) {error.rule}",
                    hint=f"Fix the value, or remove it and set {BY_NAME[name].env} for "
                    "herokupool.config() to fill in.",
                    obj=obj,
                    id="herokupool.E002",
                )
            )
    if messages:
        return messages
    try:
        parse_options(parsed)  # the rules across settings: MIN_CONNS <= MAX_CONNS
    except OptionError as error:
        maximum = parsed.get("MAX_CONNS", f"{BY_NAME['MAX_CONNS'].default}, the default")
        messages.append(
            Error(
                f"OPTIONS['MIN_CONNS'] ({error.value!r}) is greater than OPTIONS['MAX_CONNS'] "
                f"({maximum}); the minimum must not exceed the maximum.",
                hint="Lower MIN_CONNS or raise MAX_CONNS.",
                obj=obj,
                id="herokupool.E003",
            )
        )
    return messages


def _behind_pgbouncer(database: Mapping[str, Any]) -> bool:
    flag = os.environ.get(f"{DEFAULT_ENV_PREFIX}PGBOUNCER")
    if flag is not None:
        try:
            return parse_flag(f"{DEFAULT_ENV_PREFIX}PGBOUNCER", flag)
        except OptionError:
            return False  # herokupool.config() refuses the value with its own message
    # Hand-written settings: compare with the PgBouncer URLs in the environment.
    here = _endpoint(database)
    for url in pgbouncer_urls():
        try:
            bouncer = dj_database_url.parse(url)
        except ValueError:
            continue  # herokupool.config() reports a malformed URL when it reads one
        if _endpoint(bouncer) == here:
            return True
    return False


def _server(database: Mapping[str, Any]) -> tuple[str, str]:
    return str(database.get("HOST") or ""), str(database.get("PORT") or "")


def _endpoint(database: Mapping[str, Any]) -> tuple[str, ...]:
    return (*_server(database), str(database.get("NAME") or ""), str(database.get("USER") or ""))


def _whole_number(name: str, messages: list[CheckMessage]) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        number = int(value.strip())
    except ValueError:
        number = 0
    if number >= 1:
        return number
    messages.append(
        Error(
            f"{name} ({json.dumps(value, ensure_ascii=False)}) must be a whole number >= 1.",
            hint=f"Fix or unset {name}. {_DOCS}, 'Sizing'.",
            id="herokupool.E006",
        )
    )
    return None


def _check_budget(
    pooled: Mapping[str, Mapping[str, Any]], processes: int, limit: int
) -> list[CheckMessage]:
    """Warn when one dyno's processes could open more connections than a server allows."""
    # Aliases on the same server (a replica under two names, say) share its limit.
    servers: dict[tuple[str, str], dict[str, int]] = {}
    for alias, database in pooled.items():
        if missing_env_error(database) is not None:
            continue
        pool_settings, _ = split_options(database.get("OPTIONS") or {})
        try:
            max_conns = parse_options(pool_settings)["max_conns"]
        except OptionError:
            continue  # reported by E002 / E003
        servers.setdefault(_server(database), {})[alias] = max_conns
    messages: list[CheckMessage] = []
    for per_alias in servers.values():
        total = processes * sum(per_alias.values())
        if total <= limit:
            continue
        terms = " + ".join(f"{n} for {alias!r}" for alias, n in per_alias.items())
        messages.append(
            Warning(
                f"WEB_CONCURRENCY ({processes}) x MAX_CONNS ({terms}) = {total} connections "
                f"from one dyno, above {DEFAULT_ENV_PREFIX}CONNECTION_LIMIT ({limit}).",
                hint="Lower POOL_MAX_CONNS or WEB_CONCURRENCY: all dynos together, plus "
                "release, one-off and worker dynos, must stay within the plan's limit. "
                f"{_DOCS}, 'Sizing'.",
                id="herokupool.W004",
            )
        )
    return messages
