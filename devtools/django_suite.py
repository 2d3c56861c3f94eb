"""Drop-in proof: run part of Django's own test suite on Django's engines and on herokupool's.

The installed Django's sdist ships its test suite (``tests/runtests.py`` and one package per
test module). This tool downloads that sdist once into a cache directory, extracts ``tests/``,
and runs the same test modules twice against the same PostgreSQL server: once with Django's
stock ``django.db.backends.postgresql`` / ``django.contrib.gis.db.backends.postgis`` engines and
once with ``herokupool.db.backends.postgresql`` / ``herokupool.db.backends.postgis``. The two
settings modules differ only in ``ENGINE`` and herokupool's pool settings in ``OPTIONS``.

The rule: no test may fail (or error, or succeed unexpectedly) under herokupool unless it also
does under the stock engine, or is listed in :data:`KNOWN_DIFFERENCES` with the reason it
legitimately depends on the stock engine. Tests that run or are skipped under the stock engine
must run or be skipped the same way under herokupool. Anything else makes the tool exit 1 and
print the offending test ids.

Outcomes are recorded by a test runner of our own (:class:`RecordingRunner`, set as
``TEST_RUNNER`` in the generated settings) rather than parsed from the console: it writes every
test id it started and every failure, error, skip and unexpected success to a JSON file, and
notes separately whether the test databases were torn down (``DROP DATABASE`` fails while a
pool keeps connections to them open).

Command line::

    python -m devtools.django_suite [--dsn URL] [--modules backends gis_tests ...]
                                    [--output results.json] [--docs PATH | --no-docs]

``--dsn`` defaults to HEROKUPOOL_TEST_DSN, then DATABASE_URL, then the local server at
127.0.0.1:5432; only its host, port, user and password are used (the databases are this tool's
own: ``test_django_suite_<engine>[_gis][_other]``), and it is passed to the test processes in the
environment, never written to disk. The summary is printed as markdown and written to
``docs/django-suite.md`` (``docs/django-suite-psycopg3.md`` on psycopg 3); the full console
output of each run is kept in the cache directory
(``.cache/django-suite/django-<version>/logs/<driver>/``).

The driver is the one Django loads in this virtualenv (psycopg 3 when ``psycopg`` is importable,
else psycopg2), for both engines alike: ``make test-psycopg3`` runs the comparison on psycopg 3
(.venv-pg3), ``make test-psycopg2`` on psycopg2 (.venv). .venv-pg3 has no psycopg-pool (herokupool
does not need it), so Django's own pool tests error under the stock engine too.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
import unittest
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.test.runner import DiscoverRunner

__all__ = [
    "DEFAULT_MODULES",
    "ENGINES",
    "GIS_MODULES",
    "KNOWN_DIFFERENCES",
    "POOL_OPTIONS",
    "RecordingRunner",
    "Report",
    "main",
    "run_comparison",
    "suite_databases",
]

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO / ".cache" / "django-suite"
DEFAULT_DOCS = REPO / "docs" / "django-suite.md"
#: Where the psycopg 3 runs' summary goes.
DEFAULT_DOCS_PSYCOPG3 = REPO / "docs" / "django-suite-psycopg3.md"
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
#: This module's import name, also when run as ``python -m`` (where ``__name__`` is __main__).
MODULE = "devtools.django_suite"

#: Run with the postgresql engines. The issue's list (backends, transactions, basic, queries,
#: select_for_update, postgres_tests), then cheap modules that exercise connection handling:
#: connection state per borrow (timezones), threads and live servers sharing a database
#: (servers, async), the test framework's own connection juggling (test_utils, db_utils), DDL
#: (schema, introspection), and a few ORM modules that take seconds (model_fields, expressions,
#: bulk_create, fixtures). All of ``queries`` runs: about 500 tests in a few seconds.
DEFAULT_MODULES: tuple[str, ...] = (
    "async",
    "backends",
    "basic",
    "bulk_create",
    "db_utils",
    "expressions",
    "fixtures",
    "introspection",
    "model_fields",
    "postgres_tests",
    "queries",
    "schema",
    "select_for_update",
    "servers",
    "test_utils",
    "timezones",
    "transaction_hooks",
    "transactions",
)
#: Run with the PostGIS engines (Django's runtests.py only finds them with a GIS backend).
GIS_MODULES: tuple[str, ...] = ("gis_tests",)

#: runtests.py --parallel. One process: without tblib (not a herokupool dependency) any failure
#: in a parallel worker aborts the whole run ("cannot pickle 'traceback' object"), and Django's
#: replay of the workers' events into the main result attributes some skips to the wrong test
#: ids, which would break a comparison by test id. The whole comparison takes about 3 minutes.
PARALLEL = 1

#: ENGINE per (engine, flavour): the two settings modules differ only in these and in OPTIONS.
ENGINES: Mapping[str, Mapping[str, str]] = {
    "stock": {
        "postgresql": "django.db.backends.postgresql",
        "postgis": "django.contrib.gis.db.backends.postgis",
    },
    "herokupool": {
        "postgresql": "herokupool.db.backends.postgresql",
        "postgis": "herokupool.db.backends.postgis",
    },
}
#: herokupool's OPTIONS in the herokupool runs. A small pool, so that a test holding more
#: connections than a real deployment would shows up as a wait, and TIMEOUT short enough that
#: such a wait cannot stall the run.
POOL_OPTIONS: Mapping[str, object] = {"MAX_CONNS": 4, "TIMEOUT": 5}

#: Tests allowed to fail or be skipped under herokupool although they pass under the stock
#: engine, each with the reason it legitimately depends on the stock engine's exact identity or
#: behaviour. They still run; only the comparison tolerates them. A test id, never a pattern.
KNOWN_DIFFERENCES: Mapping[str, str] = {
    "gis_tests.inspectapp.tests.OGRInspectTest.test_time_field": (
        "skipped: the test maps `connections.settings['default']['ENGINE']` to a GDAL driver "
        "through a dict keyed by Django's own engine paths, so any other ENGINE (herokupool's "
        "postgis engine included) makes it skip itself with 'Unable to setup an OGR connection'"
    ),
    "backends.postgresql.tests.Tests.test_connect_pool_setting_ignored_for_psycopg2": (
        "fails by design: the test expects Django's own refusal of OPTIONS['pool'] on psycopg2 "
        "('Database pooling requires psycopg >= 3'), which points at the wrong fix on "
        "herokupool's engine; herokupool refuses it first, still with ImproperlyConfigured, "
        "naming the herokupool setting for each key (check herokupool.E004 says the same)"
    ),
    "backends.postgresql.tests.Tests.test_pooling_not_support_persistent_connections": (
        "fails by design (psycopg 3 only): the test expects reading Django's `pool` property to "
        "refuse OPTIONS['pool'] with CONN_MAX_AGE ('Pooling doesn't support persistent "
        "connections'); on herokupool's engine Django's own pool is never built (`pool` is None) "
        "and a true OPTIONS['pool'] is refused with ImproperlyConfigured when the backend parses "
        "OPTIONS and by check herokupool.E004, naming the herokupool setting for each key"
    ),
}

#: Environment variables read by the generated settings and by RecordingRunner.
DSN_ENV = "HEROKUPOOL_DJANGO_SUITE_DSN"
RESULTS_ENV = "HEROKUPOOL_DJANGO_SUITE_RESULTS"

# Variables of the calling process that would change how the Django suite behaves (pytest
# exports DJANGO_SETTINGS_MODULE; `make test` may run in dev mode): both engines get the same
# clean environment.
_DROPPED_ENV = ("DJANGO_SETTINGS_MODULE", "PYTHONDEVMODE", "PYTHONWARNINGS", "PYTHONPATH")
_FAILED_TEST_PREFIX = "unittest.loader._FailedTest."
_HOLDER_ID = re.compile(r"\w+ \((?P<inner>[\w.]+)\)\Z")  # "setUpClass (module.Class)"


# ------------------------------------------------------------------ inside the test process


def suite_databases(engine: str, flavour: str) -> dict[str, dict[str, Any]]:
    """DATABASES for the generated settings module of ``engine`` ("stock" or "herokupool")
    and ``flavour`` ("postgresql" or "postgis"), from the DSN in the environment."""
    import dj_database_url

    base = dj_database_url.parse(os.environ[DSN_ENV], engine=ENGINES[engine][flavour])
    options = dict(base.get("OPTIONS") or {})
    if engine == "herokupool":
        options.update(POOL_OPTIONS)
    name = f"django_suite_{engine}" + ("_gis" if flavour == "postgis" else "")
    return {
        alias: {**base, "NAME": name + suffix, "OPTIONS": dict(options)}
        for alias, suffix in (("default", ""), ("other", "_other"))
    }


def _test_id(test: Any) -> str:
    case = getattr(test, "test_case", None)  # a subTest: count its test once
    return str(case.id() if case is not None else test.id())


def module_of(test_id: str) -> str:
    """The top-level Django test module of a test id ("backends.tests.X.test_y" -> "backends")."""
    holder = _HOLDER_ID.match(test_id)
    if holder:
        test_id = holder["inner"]
    test_id = test_id.removeprefix(_FAILED_TEST_PREFIX)
    return test_id.split(".", 1)[0]


class _RecordingResult(unittest.TextTestResult):
    """Remembers the id of every test started."""

    started: list[str]

    def startTest(self, test: unittest.TestCase) -> None:
        if not hasattr(self, "started"):
            self.started = []
        self.started.append(_test_id(test))
        super().startTest(test)


class RecordingRunner(DiscoverRunner):
    """Django's DiscoverRunner, writing every outcome to the JSON file named in the environment.

    The outcomes are written as soon as the suite has run, with ``"teardown": false``; the file is
    rewritten with ``"teardown": true`` once the test databases have been dropped.
    """

    _recorded: dict[str, Any] | None = None

    def get_resultclass(self) -> Any:
        base = super().get_resultclass() or unittest.TextTestResult
        return type("RecordingResult", (_RecordingResult, base), {})

    def run_suite(self, suite: Any, **kwargs: Any) -> Any:
        result = super().run_suite(suite, **kwargs)
        self._recorded = _outcomes(result)
        self._write()
        return result

    def suite_result(self, suite: Any, result: Any, **kwargs: Any) -> Any:
        if self._recorded is not None:
            self._recorded["teardown"] = True
            self._write()
        return super().suite_result(suite, result, **kwargs)

    def _write(self) -> None:
        path = os.environ.get(RESULTS_ENV)
        if path and self._recorded is not None:
            Path(path).write_text(json.dumps(self._recorded, indent=1, sort_keys=True))


def _outcomes(result: Any) -> dict[str, Any]:
    def entries(pairs: Iterable[tuple[Any, str]]) -> dict[str, str]:
        found: dict[str, str] = {}
        for test, text in pairs:
            # A test with several failing subTests keeps every traceback.
            key = _test_id(test)
            found[key] = (found[key] + "\n" if key in found else "") + text
        return found

    return {
        "started": list(getattr(result, "started", [])),
        "tests_run": result.testsRun,
        "failures": entries(result.failures),
        "errors": entries(result.errors),
        "unexpected_successes": {
            _test_id(test): "unexpected success" for test in result.unexpectedSuccesses
        },
        "expected_failures": sorted({_test_id(t) for t, _ in result.expectedFailures}),
        "skipped": {_test_id(t): reason for t, reason in result.skipped},
        "teardown": False,
    }


# ------------------------------------------------------------------------- the sdist


def django_version() -> str:
    import django

    return django.__version__


def fetch_tests(version: str, cache: Path) -> Path:
    """Return the ``tests`` directory of Django ``version``'s sdist, downloading it once."""
    tests = cache / f"django-{version}" / "tests"
    if (tests / "runtests.py").is_file() and (cache / f"django-{version}.extracted").is_file():
        return tests
    cache.mkdir(parents=True, exist_ok=True)
    archive = _find_sdist(cache, version)
    if archive is None:
        print(f"downloading the sdist of Django {version} into {cache}", flush=True)
        subprocess.run(
            [
                *(sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:"),
                *("--no-deps", f"django=={version}", "--dest", str(cache)),
            ],
            check=True,
        )
        archive = _find_sdist(cache, version)
        if archive is None:
            raise RuntimeError(f"pip download left no sdist of Django {version} in {cache}")
    shutil.rmtree(cache / f"django-{version}", ignore_errors=True)
    with tarfile.open(archive) as tar:
        top = tar.getnames()[0].split("/", 1)[0]
        members = [m for m in tar.getmembers() if m.name.startswith(f"{top}/tests/")]
        destination = cache / "extract"
        shutil.rmtree(destination, ignore_errors=True)
        tar.extractall(destination, members=members, filter="data")
    (cache / f"django-{version}").mkdir()
    (destination / top / "tests").rename(tests)
    shutil.rmtree(destination)
    (cache / f"django-{version}.extracted").touch()
    return tests


def _find_sdist(cache: Path, version: str) -> Path | None:
    for name in (f"django-{version}.tar.gz", f"Django-{version}.tar.gz"):
        if (cache / name).is_file():
            return cache / name
    return None


def write_settings(directory: Path, tests: Path) -> None:
    """Write one settings module per engine and flavour into ``directory``.

    Everything but DATABASES comes from the sdist's own ``tests/test_sqlite.py`` (the settings
    Django's CI uses), with DEFAULT_AUTO_FIELD made explicit from Django's defaults.
    """
    import runpy

    from django.conf import global_settings

    stock = runpy.run_path(str(tests / "test_sqlite.py"))
    extra = {key: value for key, value in stock.items() if key.isupper() and key != "DATABASES"}
    extra.setdefault("DEFAULT_AUTO_FIELD", global_settings.DEFAULT_AUTO_FIELD)
    extra["TEST_RUNNER"] = f"{MODULE}.RecordingRunner"
    directory.mkdir(parents=True, exist_ok=True)
    for engine in ENGINES:
        for flavour in ENGINES[engine]:
            lines = [
                f'"""Django\'s own test suite, {engine} {flavour} engine (by {MODULE})."""',
                "",
                f"from {MODULE} import suite_databases",
                "",
                f"DATABASES = suite_databases({engine!r}, {flavour!r})",
                *(f"{key} = {value!r}" for key, value in sorted(extra.items())),
            ]
            module = directory / f"{_settings_name(engine, flavour)}.py"
            module.write_text("\n".join(lines) + "\n")


def _settings_name(engine: str, flavour: str) -> str:
    return f"suite_{engine}_{flavour}"


# ------------------------------------------------------------------------------ running


@dataclass
class Run:
    """One runtests.py process: an engine, a flavour, its modules and what it recorded."""

    engine: str
    flavour: str
    modules: tuple[str, ...]
    seconds: float = 0.0
    returncode: int | None = None
    log: Path | None = None
    outcomes: dict[str, Any] | None = None

    @property
    def crashed(self) -> bool:
        return self.outcomes is None

    def problem(self) -> str | None:
        if self.outcomes is None:
            how = "timed out" if self.returncode is None else f"exited {self.returncode}"
            return (
                f"{self.engine}/{self.flavour}: runtests.py {how} without recording results "
                f"(see {self.log})"
            )
        if not self.outcomes["teardown"]:
            return (
                f"{self.engine}/{self.flavour}: the test databases could not be torn down "
                f"(see {self.log})"
            )
        return None


def run_suite(
    engine: str,
    flavour: str,
    modules: Sequence[str],
    *,
    dsn: str,
    tests: Path,
    settings_dir: Path,
    work: Path,
    timeout: float,
) -> Run:
    """Run Django's runtests.py on ``modules`` with one engine and flavour."""
    run = Run(engine, flavour, tuple(modules))
    work.mkdir(parents=True, exist_ok=True)
    results = work / f"{engine}-{flavour}.json"
    results.unlink(missing_ok=True)
    run.log = work / f"{engine}-{flavour}.log"
    env = {key: value for key, value in os.environ.items() if key not in _DROPPED_ENV}
    env.update(
        {
            "PYTHONPATH": os.pathsep.join([str(settings_dir), str(REPO)]),
            DSN_ENV: dsn,
            RESULTS_ENV: str(results),
        }
    )
    command = [sys.executable, "runtests.py", "--settings", _settings_name(engine, flavour)]
    command += ["--parallel", str(PARALLEL), "--noinput", "--verbosity", "1", *modules]
    print(f"running {engine}/{flavour}: {' '.join(modules)}", flush=True)
    started = time.monotonic()
    with run.log.open("w") as log:
        try:
            process = subprocess.run(
                command,
                cwd=tests,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
            run.returncode = process.returncode
        except subprocess.TimeoutExpired:
            log.write(f"\n*** killed by {MODULE} after {timeout:.0f} s\n")
    run.seconds = time.monotonic() - started
    if results.is_file():
        run.outcomes = json.loads(results.read_text())
    return run


# ---------------------------------------------------------------------------- comparing


@dataclass
class ModuleCounts:
    ran: int = 0
    failures: int = 0
    errors: int = 0
    skipped: int = 0
    expected_failures: int = 0
    unexpected_successes: int = 0
    failing: list[str] = field(default_factory=list)


def module_counts(run: Run) -> dict[str, ModuleCounts]:
    """Counts per top-level test module (every module asked for appears, even if empty)."""
    counts = {module_of(module): ModuleCounts() for module in run.modules}
    if run.outcomes is None:
        return counts
    outcomes = run.outcomes

    def bump(test_id: str, name: str) -> None:
        module = counts.setdefault(module_of(test_id), ModuleCounts())
        setattr(module, name, getattr(module, name) + 1)

    for test_id in outcomes["started"]:
        bump(test_id, "ran")
    for name in ("failures", "errors", "skipped", "expected_failures", "unexpected_successes"):
        for test_id in outcomes[name]:
            bump(test_id, name)
    for test_id in _failing(outcomes):
        counts[module_of(test_id)].failing.append(test_id)
    return counts


def _failing(outcomes: Mapping[str, Any]) -> dict[str, str]:
    """{test id: traceback} of every failure, error and unexpected success."""
    found: dict[str, str] = {}
    for name in ("failures", "errors", "unexpected_successes"):
        for test_id, text in outcomes[name].items():
            found[test_id] = (found[test_id] + "\n" if test_id in found else "") + text
    return dict(sorted(found.items()))


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


@dataclass
class Report:
    """Both engines' runs and their comparison. ``ok`` is the tool's verdict."""

    runs: dict[str, list[Run]]
    versions: dict[str, str]
    date: str
    new_failures: dict[str, str] = field(default_factory=dict)  # id -> traceback
    not_run: list[str] = field(default_factory=list)
    skipped_only_under_herokupool: list[str] = field(default_factory=list)
    known: dict[str, str] = field(default_factory=dict)  # id -> herokupool outcome
    run_problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (
            self.new_failures
            or self.not_run
            or self.skipped_only_under_herokupool
            or self.run_problems
        )

    def counts(self, engine: str) -> dict[str, ModuleCounts]:
        merged: dict[str, ModuleCounts] = {}
        for run in self.runs[engine]:
            merged.update(module_counts(run))
        return merged

    def seconds(self, engine: str) -> float:
        return sum(run.seconds for run in self.runs[engine])

    def problems(self) -> list[str]:
        """One line per reason the herokupool run is not as good as the stock run."""
        lines = list(self.run_problems)
        lines += [f"fails only under herokupool: {test_id}" for test_id in self.new_failures]
        lines += [f"ran under stock, not under herokupool: {test_id}" for test_id in self.not_run]
        lines += [
            f"skipped only under herokupool: {test_id}"
            for test_id in self.skipped_only_under_herokupool
        ]
        return lines

    def to_json(self) -> dict[str, Any]:
        return {
            "date": self.date,
            "versions": self.versions,
            "parallel": PARALLEL,
            "pool_options": dict(POOL_OPTIONS),
            "ok": self.ok,
            "problems": self.problems(),
            "known_differences": {
                test_id: {"reason": KNOWN_DIFFERENCES[test_id], "herokupool": outcome}
                for test_id, outcome in self.known.items()
            },
            "engines": {
                engine: {
                    "seconds": round(self.seconds(engine), 1),
                    "runs": [
                        {
                            "flavour": run.flavour,
                            "engine": ENGINES[engine][run.flavour],
                            "modules": list(run.modules),
                            "seconds": round(run.seconds, 1),
                            "returncode": run.returncode,
                            "teardown": bool(run.outcomes and run.outcomes["teardown"]),
                            "log": str(run.log),
                        }
                        for run in runs
                    ],
                    "modules": {
                        module: {
                            "ran": c.ran,
                            "failures": c.failures,
                            "errors": c.errors,
                            "skipped": c.skipped,
                            "expected_failures": c.expected_failures,
                            "unexpected_successes": c.unexpected_successes,
                            "failing": c.failing,
                        }
                        for module, c in sorted(self.counts(engine).items())
                    },
                }
                for engine, runs in self.runs.items()
            },
        }

    def markdown(self) -> str:
        """The page written to docs/django-suite.md."""
        return _markdown(self)

    def summary(self) -> str:
        """The counts table and the verdict (for an assertion message)."""
        return "\n".join([*_table(self), *_verdict(self)])


def compare(runs: dict[str, list[Run]], report: Report) -> None:
    """Fill in ``report``'s verdict from the stock and herokupool runs."""
    for engine_runs in runs.values():
        report.run_problems += [p for p in (run.problem() for run in engine_runs) if p]

    def merged(engine: str, key: str) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for run in runs[engine]:
            if run.outcomes is not None:
                if key == "failing":
                    found.update(_failing(run.outcomes))
                elif key == "started":
                    found.update(dict.fromkeys(run.outcomes["started"], ""))
                else:
                    found.update(run.outcomes[key])
        return found

    stock_failing, pooled_failing = merged("stock", "failing"), merged("herokupool", "failing")
    for test_id, text in pooled_failing.items():
        if test_id in stock_failing:
            continue
        if test_id in KNOWN_DIFFERENCES:
            report.known[test_id] = _last_line(text)
        else:
            report.new_failures[test_id] = text
    if any(run.crashed for run in runs["herokupool"]):
        return  # the crash is the problem; a list of every test id would hide it
    report.not_run = sorted(set(merged("stock", "started")) - set(merged("herokupool", "started")))
    pooled_skipped, stock_skipped = merged("herokupool", "skipped"), merged("stock", "skipped")
    for test_id, reason in pooled_skipped.items():
        if test_id in stock_skipped:
            continue
        if test_id in KNOWN_DIFFERENCES:
            report.known[test_id] = f"skipped: {reason}"
        else:
            report.skipped_only_under_herokupool.append(test_id)
    pooled_started = set(merged("herokupool", "started"))
    for test_id in KNOWN_DIFFERENCES:
        report.known.setdefault(test_id, "passed" if test_id in pooled_started else "not run")


# ------------------------------------------------------------------------------ output

_INTRO = """\
# Django's own test suite on herokupool

herokupool's engines are meant as drop-in replacements for Django's. To show it, part of Django's
own test suite (from the sdist of the installed Django) runs twice against the same PostgreSQL
server: once with Django's stock engines and once with herokupool's. The settings differ only in
`ENGINE` and in herokupool's pool settings in `OPTIONS`: {options}.

The rule: **no test fails, errors or succeeds unexpectedly under herokupool unless it does so under
the stock engine too**, and every test that runs (or is skipped) under the stock engine runs (or
is skipped) under herokupool, except the known differences listed below with their reasons.
Failures under the stock engine itself (library versions on the machine) are listed, not hidden.

Regenerate this page with `python -m devtools.django_suite` (see `devtools/django_suite.py`). CI
runs the same comparison as a test when `HEROKUPOOL_DJANGO_SUITE=1` (`tests/django_suite/`).

What it found so far: herokupool skipped Django's `CONN_HEALTH_CHECKS` check on a connection kept
from an earlier request (`CONN_MAX_AGE` > 0), so a backend killed between requests failed the
next request instead of being replaced (`backends.base.test_base.ConnectionHealthChecksTests`);
fixed in the backend mixin.
"""


def _table(report: Report) -> list[str]:
    """The counts per module and engine, and the run times, as markdown lines."""
    stock, pooled = report.counts("stock"), report.counts("herokupool")
    out = [
        "| module | stock: ran | failed | errors | skipped "
        "| herokupool: ran | failed | errors | skipped |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    totals = [0] * 8
    for module in sorted(set(stock) | set(pooled)):
        row = []
        for counts in (stock.get(module, ModuleCounts()), pooled.get(module, ModuleCounts())):
            row += [
                counts.ran,
                counts.failures + counts.unexpected_successes,
                counts.errors,
                counts.skipped,
            ]
        totals = [a + b for a, b in zip(totals, row, strict=True)]
        out.append(f"| {module} | " + " | ".join(map(str, row)) + " |")
    out.append("| **total** | " + " | ".join(f"**{n}**" for n in totals) + " |")
    out.append("")
    out.append(
        f"Run time: stock {report.seconds('stock'):.0f} s, "
        f"herokupool {report.seconds('herokupool'):.0f} s "
        '("failed" includes unexpected successes).\n'
    )
    return out


def _verdict(report: Report) -> list[str]:
    if report.ok:
        return ["No test fails, errors, goes missing or is skipped only under herokupool.\n"]
    out = ["**The comparison failed:**\n"]
    out += [f"- `{line}`" for line in report.problems()]
    out.append("")
    return out


def _markdown(report: Report) -> str:
    options = ", ".join(f"`{key}={value}`" for key, value in POOL_OPTIONS.items())
    out = [_INTRO.format(options=options)]
    out.append(f"## Last run: {report.date}\n")
    versions = ", ".join(f"{name} {version}" for name, version in report.versions.items())
    out.append(f"{versions}; `runtests.py --parallel {PARALLEL}`.\n")
    for run in report.runs["stock"]:
        engines = " / ".join(f"`{ENGINES[e][run.flavour]}`" for e in ENGINES)
        out.append(f"- {engines}: {', '.join(run.modules)}")
    out.append("")
    out += _table(report)
    out.append("### Verdict\n")
    out += _verdict(report)
    stock_failing: dict[str, str] = {}
    for run in report.runs["stock"]:
        if run.outcomes is not None:
            stock_failing.update(_failing(run.outcomes))
    pooled_failing = {t for c in report.counts("herokupool").values() for t in c.failing}
    out.append("### Failing under the stock engine\n")
    if stock_failing:
        out.append(
            "These fail with Django's own engine on this machine (library versions, server "
            "configuration), so they say nothing about herokupool:\n"
        )
        for test_id, text in stock_failing.items():
            also = "fails" if test_id in pooled_failing else "passes"
            out.append(f"- `{test_id}` ({also} under herokupool): {_last_line(text)}")
    else:
        out.append("None.")
    out.append("")
    out.append("### Known differences\n")
    if KNOWN_DIFFERENCES:
        out.append(
            "Tests that legitimately depend on the stock engine's exact identity or behaviour; "
            "they still run, and the comparison tolerates their failing or being skipped under "
            "herokupool only.\n"
        )
        out.append("| test | why it differs | herokupool outcome |")
        out.append("|---|---|---|")
        for test_id, reason in KNOWN_DIFFERENCES.items():
            outcome = report.known.get(test_id, "not run").replace("|", "\\|")
            out.append(f"| `{test_id}` | {reason} | {outcome} |")
    else:
        out.append("None.")
    out.append("")
    return "\n".join(out)


def driver() -> str:
    """The driver Django's PostgreSQL backend loads in this virtualenv: psycopg2 or psycopg3."""
    from django.db.backends.postgresql.psycopg_any import is_psycopg3

    return "psycopg3" if is_psycopg3 else "psycopg2"


def _versions(dsn: str) -> dict[str, str]:
    import dj_database_url
    import psycopg2

    import herokupool

    versions = {
        "Django": django_version(),
        "herokupool": herokupool.__version__,
        "Python": platform.python_version(),
    }
    if driver() == "psycopg3":
        import psycopg

        versions["psycopg"] = psycopg.__version__
    else:
        versions["psycopg2"] = psycopg2.__version__.split()[0]
    settings = dj_database_url.parse(dsn)
    try:
        conn = psycopg2.connect(
            dbname=settings.get("NAME") or "postgres",
            user=settings.get("USER") or None,
            password=settings.get("PASSWORD") or None,
            host=settings.get("HOST") or None,
            port=settings.get("PORT") or None,
        )
    except psycopg2.Error as error:
        raise SystemExit(f"cannot connect to the PostgreSQL server of --dsn: {error}") from None
    try:
        with conn.cursor() as cursor:
            cursor.execute("SHOW server_version")
            versions["PostgreSQL"] = str(cursor.fetchone()[0]).split()[0]
            cursor.execute(
                "SELECT default_version FROM pg_available_extensions WHERE name = 'postgis'"
            )
            row = cursor.fetchone()
            versions["PostGIS"] = row[0] if row else "not installed"
    finally:
        conn.close()
    return versions


def run_comparison(
    *,
    dsn: str,
    modules: Sequence[str] = DEFAULT_MODULES,
    gis_modules: Sequence[str] = GIS_MODULES,
    cache: Path = DEFAULT_CACHE,
    timeout: float = 900.0,
) -> Report:
    """Run ``modules`` (postgresql engines) and ``gis_modules`` (PostGIS engines) with the stock
    and herokupool engines, and compare. Raises SystemExit when the server is unreachable."""
    versions = _versions(dsn)
    tests = fetch_tests(versions["Django"], cache)
    # Per Django version: tox runs several versions side by side.
    settings_dir = tests.parent / "settings"
    write_settings(settings_dir, tests)
    work = tests.parent / "logs" / driver()  # both drivers' logs stay, as CI runs both
    runs: dict[str, list[Run]] = {engine: [] for engine in ENGINES}
    for engine in ENGINES:
        for flavour, selected in (("postgresql", modules), ("postgis", gis_modules)):
            if selected:
                runs[engine].append(
                    run_suite(
                        engine,
                        flavour,
                        selected,
                        dsn=dsn,
                        tests=tests,
                        settings_dir=settings_dir,
                        work=work,
                        timeout=timeout,
                    )
                )
                last = runs[engine][-1]
                ran = len(last.outcomes["started"]) if last.outcomes else "?"
                print(f"  {ran} tests in {last.seconds:.0f} s (log: {last.log})", flush=True)
    report = Report(
        runs=runs,
        versions=versions,
        date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )
    compare(runs, report)
    return report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.django_suite",
        description="Run part of Django's own test suite with the stock and herokupool "
        "engines; exit 1 if anything fails only under herokupool.",
    )
    parser.add_argument(
        "--dsn",
        default=os.environ.get("HEROKUPOOL_TEST_DSN") or os.environ.get("DATABASE_URL"),
        help="PostgreSQL server URL (default: HEROKUPOOL_TEST_DSN, DATABASE_URL, "
        f"else {DEFAULT_DSN}); its database name is not used",
    )
    parser.add_argument(
        "--modules",
        nargs="+",
        help="Django test modules or labels (default: the postgresql set and gis_tests); "
        "gis_tests labels run with the PostGIS engines",
    )
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--docs",
        type=Path,
        help="write the markdown summary here (default: docs/django-suite.md, "
        "docs/django-suite-psycopg3.md on psycopg 3)",
    )
    parser.add_argument("--no-docs", action="store_true", help="do not write the summary")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="seconds allowed per runtests.py process"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.modules:
        modules = [m for m in args.modules if module_of(m) not in GIS_MODULES]
        gis_modules = [m for m in args.modules if module_of(m) in GIS_MODULES]
    else:
        modules, gis_modules = list(DEFAULT_MODULES), list(GIS_MODULES)
    report = run_comparison(
        dsn=args.dsn or DEFAULT_DSN,
        modules=modules,
        gis_modules=gis_modules,
        cache=args.cache_dir,
        timeout=args.timeout,
    )
    text = report.markdown()
    print()
    print(text)
    if args.output:
        args.output.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    if not args.no_docs:
        docs = args.docs or (DEFAULT_DOCS_PSYCOPG3 if driver() == "psycopg3" else DEFAULT_DOCS)
        docs.parent.mkdir(parents=True, exist_ok=True)
        docs.write_text(text)
    if report.ok:
        return 0
    for test_id, traceback in report.new_failures.items():
        print(f"\n=== fails only under herokupool: {test_id}\n{traceback}")
    print("\nthe comparison failed:", file=sys.stderr)
    for line in report.problems():
        print(f"  {line}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
