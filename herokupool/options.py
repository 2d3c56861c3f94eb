"""The pool's settings, stated once.

Each setting has an upper-case name (the key in a database alias's ``OPTIONS``), the
same name lower case as the :class:`~herokupool.pool.ConnectionPool` keyword, and a
``POOL_``-prefixed environment variable read by :func:`herokupool.config`.  This
module knows nothing of Django: it parses and checks values and reports problems as
:class:`OptionError`, which each caller words for its own source (an environment
variable, an ``OPTIONS`` key, a system check).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DJANGO_POOL",
    "DJANGO_POOL_CLASH",
    "DJANGO_POOL_EQUIVALENTS",
    "MAX_CONNECTIONS",
    "MAX_SECONDS",
    "OPTIONS",
    "POOL_SETTINGS",
    "OptionError",
    "PoolOption",
    "django_pool_fix",
    "parse_bool",
    "parse_options",
    "split_options",
]


#: The longest duration any setting accepts: one day.  A timeout, lifetime or threshold
#: beyond it is a mistake (the nullable ones turn off with ``none``), and the bound keeps
#: the arithmetic on them valid: ``connect_timeout``, derived from ``TIMEOUT``, is read by
#: libpq into a C int (2.1e9 s), and a waiter's timeout must stay under
#: ``threading.TIMEOUT_MAX`` (9.2e9 s; beyond it a lock wait raises OverflowError).
MAX_SECONDS = 86400.0
#: The most connections one process's pool may hold for an alias.  A PostgreSQL server's
#: ``max_connections`` is usually in the hundreds (Heroku's largest plans allow 500), so a
#: larger pool can only be a typo.
MAX_CONNECTIONS = 1000


class OptionError(ValueError):
    """A pool setting has a bad value. ``name`` is the upper-case setting name."""

    def __init__(self, name: str, value: object, rule: str) -> None:
        self.name = name
        self.value = value
        self.rule = rule
        super().__init__(f"{name} ({value!r}) {rule}")


def parse_bool(name: str, value: object) -> bool:
    """A boolean setting: a bool, or true/false, 1/0, yes/no, on/off in any case."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off", ""}:
            return False
    raise OptionError(name, value, "must be a boolean (true/false, 1/0, yes/no, on/off).")


def _int(minimum: int, maximum: int) -> Callable[[str, object], int]:
    rule = f"must be a whole number from {minimum} to {maximum}."

    def parse(name: str, value: object) -> int:
        if isinstance(value, bool):
            raise OptionError(name, value, rule)
        try:
            number = int(value.strip()) if isinstance(value, str) else int(value)  # type: ignore[call-overload]
        except (TypeError, ValueError, OverflowError):
            raise OptionError(name, value, rule) from None
        if isinstance(value, float) and value != number:
            raise OptionError(name, value, rule)
        if not minimum <= number <= maximum:
            raise OptionError(name, value, rule)
        return number

    return parse


def _int_or_none(minimum: int, maximum: int) -> Callable[[str, object], int | None]:
    parse_int = _int(minimum, maximum)

    def parse(name: str, value: object) -> int | None:
        if value is None or (isinstance(value, str) and value.strip().lower() in {"", "none"}):
            return None
        try:
            return parse_int(name, value)
        except OptionError:
            raise OptionError(
                name,
                value,
                f"must be a whole number from {minimum} to {maximum} (or empty / none to disable).",
            ) from None

    return parse


def _seconds(*, allow_none: bool) -> Callable[[str, object], float | None]:
    rule = f"must be a number of seconds greater than 0 and at most {MAX_SECONDS:.0f} (one day)" + (
        " (or empty / none to disable)." if allow_none else "."
    )

    def parse(name: str, value: object) -> float | None:
        if value is None or (isinstance(value, str) and value.strip().lower() in {"", "none"}):
            if allow_none:
                return None
            raise OptionError(name, value, rule)
        if isinstance(value, bool):
            raise OptionError(name, value, rule)
        try:
            number = float(value.strip()) if isinstance(value, str) else float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError, OverflowError):  # OverflowError: float(10**400)
            raise OptionError(name, value, rule) from None
        if not math.isfinite(number) or not 0 < number <= MAX_SECONDS:
            raise OptionError(name, value, rule)
        return number

    return parse


def _sql(name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise OptionError(name, value, "must be an SQL statement such as 'DISCARD ALL'.")
    return value.strip() or None


@dataclass(frozen=True)
class PoolOption:
    name: str
    default: Any
    parse: Callable[[str, object], Any]
    help: str
    #: False for a setting of the Django backend, not of the pool: parse_options()
    #: checks it but returns no keyword argument for it.
    pool: bool = True

    @property
    def keyword(self) -> str:
        """The :class:`~herokupool.pool.ConnectionPool` keyword argument."""
        return self.name.lower()

    @property
    def env(self) -> str:
        """The environment variable :func:`herokupool.config` reads."""
        return f"POOL_{self.name}"


#: Every pool setting, in documentation order.
OPTIONS: tuple[PoolOption, ...] = (
    PoolOption(
        "MAX_CONNS",
        4,
        _int(1, MAX_CONNECTIONS),
        "most server connections this process opens for the alias",
    ),
    PoolOption("MIN_CONNS", 0, _int(0, MAX_CONNECTIONS), "connections kept open while idle"),
    PoolOption(
        "TIMEOUT", 10.0, _seconds(allow_none=False), "seconds a borrower waits for a connection"
    ),
    PoolOption(
        "MAX_LIFETIME", 3600.0, _seconds(allow_none=True), "seconds before a connection is recycled"
    ),
    PoolOption(
        "MAX_IDLE", 600.0, _seconds(allow_none=True), "seconds an extra idle connection is kept"
    ),
    PoolOption("TEST_ON_BORROW", False, parse_bool, "run a validation query on every borrow"),
    PoolOption(
        "VALIDATE_AFTER",
        0.5,
        _seconds(allow_none=True),
        "idle seconds after which a borrow runs a validation query",
    ),
    PoolOption("RESET", None, _sql, "SQL run on every release, e.g. DISCARD ALL"),
    PoolOption(
        "LEAK_THRESHOLD",
        None,
        _seconds(allow_none=True),
        "seconds a borrow may last before a warning with the borrower's stack",
    ),
    PoolOption(
        "MAX_WAITING",
        None,
        _int_or_none(0, MAX_CONNECTIONS),
        "borrowers that may queue; one more fails at once with PoolOverloaded",
    ),
    PoolOption(
        "LOG_METRICS",
        None,
        _seconds(allow_none=True),
        "seconds between two l2met metrics lines in the log",
    ),
    PoolOption(
        "CONNECT_PER_BORROW",
        False,
        parse_bool,
        "no effect, kept for compatibility (Django's connect() runs on every borrow)",
        pool=False,
    ),
)

BY_NAME: Mapping[str, PoolOption] = {option.name: option for option in OPTIONS}
#: The upper-case names: the keys of ``OPTIONS`` that are the pool's, not libpq's.
POOL_SETTINGS: frozenset[str] = frozenset(BY_NAME)


#: Django's ``OPTIONS`` key for its own psycopg 3 pool: True, or psycopg_pool keyword arguments.
DJANGO_POOL = "pool"
#: psycopg_pool's keyword -> the herokupool setting that means the same.  The others
#: (``num_workers``, ``reconnect_timeout``, ...) have no equivalent.
DJANGO_POOL_EQUIVALENTS: Mapping[str, str] = {
    "min_size": "MIN_CONNS",
    "max_size": "MAX_CONNS",
    "timeout": "TIMEOUT",
    "max_lifetime": "MAX_LIFETIME",
    "max_idle": "MAX_IDLE",
    "max_waiting": "MAX_WAITING",
}
#: Why a true ``OPTIONS["pool"]`` is refused (completed by :func:`django_pool_fix`).
DJANGO_POOL_CLASH = (
    "asks for Django's own psycopg 3 pool, but herokupool's engine already pools this alias"
)
_SIZED_BY_DEFAULT = f"MAX_CONNS sizes herokupool's pool, {BY_NAME['MAX_CONNS'].default} by default"


def django_pool_fix(value: object) -> str:
    """What to write instead of Django's ``OPTIONS["pool"]`` value: a clause starting
    "remove it", naming the herokupool setting (and POOL_ variable) for each key.

    The keys are refused rather than mapped in silence: psycopg_pool's defaults differ
    (``min_size`` 4 held open, ``max_waiting=0`` unlimited), and Django itself acts on the
    key (its psycopg 3 pool), so it must not stay in OPTIONS.  The values are translated
    so the suggestion builds the same pool: ``max_size`` defaults to ``min_size``,
    ``max_waiting=0`` is ``MAX_WAITING`` none.
    """
    settings: dict[str, Any] = {}
    unknown: list[str] = []
    if isinstance(value, Mapping):
        for key, setting in value.items():
            name = DJANGO_POOL_EQUIVALENTS.get(key)
            if name is None:
                unknown.append(str(key))
            elif name == "MAX_WAITING" and setting == 0:
                settings[name] = None
            else:
                settings[name] = setting
        if "MIN_CONNS" in settings and "MAX_CONNS" not in settings:
            settings["MAX_CONNS"] = settings["MIN_CONNS"]
    # In psycopg_pool's order (min_size, max_size, ...), whatever the dict's.
    order = list(DJANGO_POOL_EQUIVALENTS.values())
    settings = dict(sorted(settings.items(), key=lambda item: order.index(item[0])))
    none = (
        f"{' and '.join(unknown)} {'has' if len(unknown) == 1 else 'have'} no herokupool equivalent"
    )
    if not settings:
        sized = f"{none}; {_SIZED_BY_DEFAULT}" if unknown else _SIZED_BY_DEFAULT
        return f"remove it ({sized})."
    put = ", ".join(f"{name!r}: {setting!r}" for name, setting in settings.items())
    env = " ".join(
        f"{BY_NAME[name].env}={'none' if setting is None else setting}"
        for name, setting in settings.items()
    )
    fix = f"remove it and put {put} in OPTIONS instead (with herokupool.config(): {env})"
    return f"{fix}; {none}." if unknown else f"{fix}."


def split_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a database alias's ``OPTIONS`` into (pool settings, libpq options).

    Django's ``"pool"`` key goes with the pool settings, where :func:`parse_options`
    refuses a true value: it is never a libpq parameter.
    """
    pool: dict[str, Any] = {}
    libpq: dict[str, Any] = {}
    for key, value in options.items():
        (pool if key in BY_NAME or key == DJANGO_POOL else libpq)[key] = value
    return pool, libpq


def parse_options(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Parse upper-case pool settings into ``ConnectionPool`` keyword arguments.

    Missing settings take their defaults.  Raises :class:`OptionError` for the first
    bad value, for ``MIN_CONNS`` greater than ``MAX_CONNS`` (with ``name``
    ``"MIN_CONNS"``), and for a true Django ``"pool"`` (with ``name`` ``"pool"`` and a
    rule naming the herokupool settings to use instead); a false one asks for no pool
    and is ignored, as Django ignores it.
    """
    if DJANGO_POOL in raw:
        value = raw[DJANGO_POOL]
        if value:
            raise OptionError(DJANGO_POOL, value, f"{DJANGO_POOL_CLASH}; {django_pool_fix(value)}")
        raw = {name: setting for name, setting in raw.items() if name != DJANGO_POOL}
    unknown = set(raw) - set(BY_NAME)
    if unknown:
        name = sorted(unknown)[0]
        raise OptionError(name, raw[name], "is not a herokupool setting.")
    kwargs = {
        option.keyword: option.parse(option.name, raw[option.name])
        if option.name in raw
        else option.default
        for option in OPTIONS
    }
    for option in OPTIONS:
        if not option.pool:
            del kwargs[option.keyword]
    if kwargs["min_conns"] > kwargs["max_conns"]:
        raise OptionError(
            "MIN_CONNS",
            kwargs["min_conns"],
            f"is greater than MAX_CONNS ({kwargs['max_conns']}); "
            "the minimum must not exceed the maximum.",
        )
    return kwargs
