"""Drop-in proof: Django's own tests pass under herokupool wherever they pass under Django's engine.

A thin wrapper over ``devtools.django_suite`` (which documents the modules, the rule and the known
differences), against the session's PostgreSQL server (``pg_server``). The PostGIS half needs the
postgis extension on that server.
"""

from __future__ import annotations

import pytest

from devtools import django_suite
from tests.conftest import Server, require

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _message(report: django_suite.Report) -> str:
    logs = ", ".join(str(run.log) for runs in report.runs.values() for run in runs)
    return (
        f"{len(report.problems())} problem(s) under herokupool that Django's own engine does not "
        f"have:\n" + "\n".join(report.problems()) + f"\n\n{report.summary()}\nlogs: {logs}"
    )


def test_postgresql_engine_fails_nothing_the_stock_engine_passes(pg_server: Server) -> None:
    report = django_suite.run_comparison(
        dsn=pg_server.url, modules=django_suite.DEFAULT_MODULES, gis_modules=()
    )
    assert report.ok, _message(report)
    stock, pooled = report.counts("stock"), report.counts("herokupool")
    assert sum(c.ran for c in pooled.values()) == sum(c.ran for c in stock.values()) > 0


@pytest.mark.postgis
def test_postgis_engine_fails_nothing_the_stock_engine_passes(pg_server: Server) -> None:
    require(pg_server.has_extension("postgis"), "the PostGIS extension")
    report = django_suite.run_comparison(
        dsn=pg_server.url, modules=(), gis_modules=django_suite.GIS_MODULES
    )
    assert report.ok, _message(report)
    stock, pooled = report.counts("stock"), report.counts("herokupool")
    assert sum(c.ran for c in pooled.values()) == sum(c.ran for c in stock.values()) > 0
