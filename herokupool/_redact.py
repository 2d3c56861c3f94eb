"""The one place that decides what a password looks like in text we emit."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

MASK = "********"

#: libpq keywords (and Django settings keys) whose values are secrets.
SECRET_KEYS = frozenset({"password", "PASSWORD", "passfile", "sslpassword"})


def mask_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of connection parameters with every secret value masked."""
    return {key: (MASK if key in SECRET_KEYS and value else value) for key, value in params.items()}


def scrub(text: str, *secrets: object) -> str:
    """Replace every occurrence of each non-empty secret in ``text`` with the mask."""
    for secret in secrets:
        if isinstance(secret, str) and secret:
            text = text.replace(secret, MASK)
    return text


# libpq's messages about a connection string it could not parse quote a piece of it, which
# may be (part of) the password; both drivers pass them on as they are, psycopg2 after
# "invalid dsn: ".  And a URL or conninfo echoed back would carry the password itself.
_QUOTED_PIECE = re.compile(
    r'(invalid percent-encoded token: |missing "=" after |invalid URI query parameter: )"[^"]*"'
)
_CONNINFO_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s']+)", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]*@", re.IGNORECASE)


def mask_driver_text(text: str) -> str:
    """``text`` (a driver's error message) with whatever may be a password masked: the piece
    of a connection string libpq quotes when it cannot parse it, and a password given as a
    conninfo ``password=`` value or in a URL.  The same on psycopg2's and psycopg 3's
    texts."""
    text = _QUOTED_PIECE.sub(rf'\1"{MASK}"', text)
    text = _CONNINFO_PASSWORD.sub(rf"\1{MASK}", text)
    return _URL_PASSWORD.sub(rf"\1{MASK}@", text)
