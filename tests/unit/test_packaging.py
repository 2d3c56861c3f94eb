"""The package's metadata states what the test matrix runs."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

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
