"""The package's metadata states what the test matrix runs."""

from __future__ import annotations

import configparser
import re
import tomllib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

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


def expand(text: str) -> list[str]:
    """tox's brace expansion: ``py312-django{52,60}`` -> py312-django52, py312-django60."""
    match = re.search(r"\{([^{}]*)\}", text)
    if match is None:
        return [text]
    head, tail = text[: match.start()], text[match.end() :]
    return [name for part in match[1].split(",") for name in expand(head + part.strip() + tail)]


def tox_ini() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(ROOT / "tox.ini", encoding="utf-8")
    return parser


def cells() -> list[str]:
    return [cell for line in tox_ini()["tox"]["env_list"].split() for cell in expand(line)]


def for_cell(key: str, cell: str) -> list[str]:
    """The lines of [testenv] ``key`` that apply to ``cell``: those without a factor condition
    and those whose condition it meets (``a,b:`` either, ``a-b:`` both, ``!a:`` not a)."""
    factors = set(cell.split("-"))

    def meets(conjunction: str) -> bool:
        return all(
            factor[1:] not in factors if factor.startswith("!") else factor in factors
            for factor in conjunction.split("-")
        )

    found = []
    for line in tox_ini()["testenv"][key].splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        condition = re.match(r"([\w!,{}-]+):\s*(.*)$", line)
        if condition is None:
            found.append(line)
            continue
        alternatives = [
            conjunction
            for group in re.split(r",(?![^{]*\})", condition[1])
            for conjunction in expand(group)
        ]
        if any(meets(conjunction) for conjunction in alternatives):
            found.append(condition[2])
    return found


def test_the_tox_factor_conditions_are_read_as_tox_reads_them() -> None:
    assert "py313-django61-pg3-full" in cells()
    assert "py312-django60" in cells()
    assert "psycopg" in for_cell("extras", "py313-django61-pg3-full")
    assert "psycopg" not in for_cell("extras", "py312-django61")
    assert for_cell("deps", "py312-django60") == ["Django>=6.0,<6.1"]


def django_series(cell: str) -> str:
    named = re.search(r"(?:^|-)django(\d)(\d+)(?:-|$)", cell)
    assert named, f"the tox environment {cell} names no Django version"
    return f"{named[1]}.{named[2]}"


def admits(specifier: SpecifierSet, series: str) -> bool:
    """Whether ``specifier`` allows some release of the ``series`` (e.g. "6.1")."""
    return any(
        specifier.contains(Version(f"{series}{patch}"), prereleases=True)
        for patch in ("", ".1", ".99")
    )


def django_requirements(
    name: str, extras: frozenset[str] = frozenset()
) -> Iterator[tuple[str, Requirement]]:
    """(the chain of packages, its requirement on Django) for every requirement on Django that
    the installed package ``name`` (with ``extras``) and what it requires declare. Packages
    that are not installed in this environment are not read."""
    seen: set[str] = set()
    todo = [(name, extras, name)]
    while todo:
        current, wanted, chain = todo.pop()
        key = f"{canonicalize_name(current)}{sorted(wanted)}"
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = metadata.requires(current) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker is not None and not any(
                requirement.marker.evaluate({"extra": extra}) for extra in (wanted or {""})
            ):
                continue
            if canonicalize_name(requirement.name) == "django":
                yield chain, requirement
            else:
                below = f"{chain} -> {requirement.name}"
                todo.append((requirement.name, frozenset(requirement.extras), below))


def test_the_extras_every_tox_cell_installs_leave_out_django_prometheus() -> None:
    """django-prometheus 2.5.0 declares Django<6.1: in an extra every cell installs, pip
    resolved the Django 6.1 cells to Django 6.0."""
    every_cell = set.intersection(*(set(for_cell("extras", cell)) for cell in cells()))
    assert "test" in every_cell
    for extra in every_cell:
        names = {canonicalize_name(Requirement(line).name) for line in extras()[extra]}
        assert "django-prometheus" not in names, extra


def test_every_tox_cell_would_install_the_django_its_name_says() -> None:
    """Each cell pins its Django series, and nothing it installs (its extras, its other deps
    and, where they are installed here, what those require) excludes that series. Read from
    this environment's metadata: a package installed here is checked for every cell."""
    for cell in cells():
        series = django_series(cell)
        pins = [
            Requirement(line)
            for line in for_cell("deps", cell)
            if canonicalize_name(Requirement(line).name) == "django"
        ]
        assert len(pins) == 1, (cell, pins)
        assert admits(pins[0].specifier, series), (cell, str(pins[0]))
        others = {django_series(other) for other in cells()} - {series}
        assert not [other for other in others if admits(pins[0].specifier, other)], cell
        requirements = [*project()["dependencies"], *for_cell("deps", cell)]
        for extra in for_cell("extras", cell):
            requirements += extras()[extra]
        for line in requirements:
            requirement = Requirement(line)
            if canonicalize_name(requirement.name) == "django":
                assert admits(requirement.specifier, series), (cell, line)
                continue
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            for chain, on_django in django_requirements(
                requirement.name, frozenset(requirement.extras)
            ):
                assert admits(on_django.specifier, series), (
                    f"tox's {cell} installs {chain}, which requires {on_django}: pip would not "
                    f"install Django {series} there"
                )


def test_django_prometheus_is_installed_by_the_cells_of_the_django_versions_it_supports() -> None:
    """The /metrics tests through django-prometheus run wherever it can be installed: in the
    Django 5.2 and 6.0 cells (tests/conftest.py refuses those without it), not in 6.1's."""
    for cell in cells():
        installed = "django-prometheus" in for_cell("extras", cell)
        assert installed == (django_series(cell) in ("5.2", "6.0")), cell
