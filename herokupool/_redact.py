"""The one place that decides what a password looks like in text we emit."""

from __future__ import annotations

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
