"""The package's metadata states what the test matrix runs."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parents[2]


def classifiers() -> list[str]:
    with (ROOT / "pyproject.toml").open("rb") as file:
        return list(tomllib.load(file)["project"]["classifiers"])


def test_every_django_version_tox_tests_has_a_classifier() -> None:
    tested = re.findall(r"^\s*django\d+: Django>=(\d+\.\d+),", (ROOT / "tox.ini").read_text(), re.M)
    assert tested, "tox.ini names no Django versions"
    stated = {
        c.rsplit(" :: ", 1)[1] for c in classifiers() if c.startswith("Framework :: Django :: ")
    }
    assert stated == set(tested)


def test_every_python_version_tox_tests_has_a_classifier() -> None:
    tested = {
        f"3.{minor}" for minor in re.findall(r"^\s*py3(\d+)-", (ROOT / "tox.ini").read_text(), re.M)
    }
    stated = {
        c.rsplit(" :: ", 1)[1]
        for c in classifiers()
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    }
    assert stated == tested


def project() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as file:
        return dict(tomllib.load(file)["project"])


def extras() -> dict[str, list[str]]:
    return dict(project()["optional-dependencies"])


def test_psycopg2_stays_the_default_driver() -> None:
    dependencies = project()["dependencies"]
    assert "psycopg2>=2.9.9" in dependencies
    assert not [d for d in dependencies if re.match(r"psycopg(?!2)\b", d)], dependencies


def test_the_psycopg_extra_installs_psycopg_3_with_its_binary_wheel_and_no_pool() -> None:
    """herokupool is the pool: psycopg-pool (Django's own pool's) is not needed to run it."""
    assert extras()["psycopg"] == ["psycopg[binary]>=3.2"]
    runtime = [*project()["dependencies"], *extras()["psycopg"]]
    assert not [d for d in runtime if d.startswith("psycopg-pool")]


def test_the_tox_cells_of_each_driver_install_what_they_claim() -> None:
    """A "pg3" cell installs the psycopg extra and expects psycopg 3; every other cell expects
    psycopg2 (tests/conftest.py refuses a run whose Django loaded another driver)."""
    tox = (ROOT / "tox.ini").read_text()
    assert re.search(r"^\s*pg3: psycopg$", tox, re.M)
    assert re.search(r"^\s*pg3: HEROKUPOOL_TEST_DRIVER = psycopg3$", tox, re.M)
    assert re.search(r"^\s*!pg3: HEROKUPOOL_TEST_DRIVER = psycopg2$", tox, re.M)
    cells = re.findall(r"^\s*(py3\d+-django[\w{},-]+)$", tox, re.M)
    assert any("pg3" in c and "full" in c for c in cells), cells
    assert any("pg3" not in c and "full" in c for c in cells), cells
