"""The PostGIS engine (the spec's "done when"): a PointField model migrates and distance
queries return the right rows, through Django's test runner on the project in
tests/projects/geo/ (see places/tests.py there for the queries and expected rows).

The embedded server of the fresh-machine run has no PostGIS: these tests are marked
``postgis`` (deselected there) and fail, not skip, when CI requires services.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import Server, require
from tests.projects import Project, assert_passed, running

pytestmark = [pytest.mark.integration, pytest.mark.postgis]


@pytest.fixture
def geo(pg_server: Server, dsn: str) -> Iterator[Project]:
    require(pg_server.has_extension("postgis"), "the PostGIS extension")
    with running(pg_server, dsn, "geo") as project:
        yield project


def test_pointfield_migrates_and_distance_queries_return_the_right_rows(geo: Project) -> None:
    report = geo.run("-v", "2", settings="geoproj.settings")
    assert "Applying places.0001_initial... OK" in report
    for test in (
        "test_dwithin_returns_exactly_the_cities_inside_the_radius",
        "test_distance_annotation_orders_by_distance",
        "test_a_point_round_trips",
        "test_the_reused_connection_answers_spatial_queries",  # pid reuse after close()
    ):
        assert f"{test} (places.tests." in report
        assert report.split(f"{test} (places.tests.", 1)[1].split("\n", 1)[0].endswith("... ok")
    assert_passed(report)
    geo.assert_clean()


def test_parallel_clones_of_a_postgis_test_database(geo: Project) -> None:
    report = geo.run("--parallel", "2", settings="geoproj.settings")
    assert report.count("Cloning test database for alias 'default'") == 2
    assert_passed(report)
    geo.assert_clean()
