"""The development environment's requirements with psycopg2 swapped for psycopg2-binary.

psycopg2 compiles from source: it needs a C compiler and ``pg_config`` (Debian's libpq-dev).
The published package (and so Heroku's build from requirements.txt) keeps depending on
psycopg2; on a machine without ``pg_config``, ``make venv`` installs what this prints instead
(``pip install -r``, then the project itself with ``--no-deps``), so that ``make run`` and
``make test`` work there too. The binary wheel bundles its own libpq, which is fine for
development and tests; the psycopg2 docs advise against it in production.

    python devtools/requirements.py test dev demo   # the extras of .[test,dev,demo]

Run with the virtualenv's Python (3.11+: tomllib). Imports nothing outside the standard library.
"""

from __future__ import annotations

import re
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
# "psycopg2", then the end of the name: a version specifier, extras, a marker or nothing.
_PSYCOPG2 = re.compile(r"^psycopg2(?=[\s<>=!~;\[(]|$)", re.IGNORECASE)


def requirements(extras: Sequence[str], pyproject: Path = PYPROJECT) -> list[str]:
    """The project's dependencies and those of ``extras``, psycopg2 replaced by
    psycopg2-binary with the same version specifier. Raises KeyError for an unknown extra."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    optional = project.get("optional-dependencies", {})
    found = list(project.get("dependencies", []))
    for extra in extras:
        if extra not in optional:
            raise KeyError(f"pyproject.toml has no extra {extra!r}; it has {sorted(optional)}.")
        found.extend(optional[extra])
    return [_PSYCOPG2.sub("psycopg2-binary", line) for line in found]


def main(argv: Sequence[str] | None = None) -> int:
    extras = list(sys.argv[1:] if argv is None else argv)
    try:
        lines = requirements(extras)
    except KeyError as exc:
        print(f"devtools/requirements.py: {exc.args[0]}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
