"""DATABASE_URL + POOL_* environment variables -> a Django DATABASES dict (being written)."""

from __future__ import annotations

from typing import Any


def config(*args: Any, **kwargs: Any) -> dict[str, dict[str, Any]]:
    raise NotImplementedError
