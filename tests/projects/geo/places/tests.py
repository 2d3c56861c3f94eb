"""Run by tests/integration/test_postgis.py through ``python -m django test``.

A few cities with known great-circle distances from Berlin; every distance query must
return exactly the right rows, through herokupool's pooled PostGIS backend.
"""

# Django TestCases run by Django's own runner: unittest's assertions are the idiom.
# ruff: noqa: PT009

from django.contrib.gis.db.models.functions import Distance
from django.contrib.gis.geos import Point
from django.contrib.gis.measure import D
from django.db import connection, connections
from django.test import TestCase, TransactionTestCase

from places.models import City

BERLIN = Point(13.4050, 52.5200, srid=4326)
CITIES = {  # name: (longitude, latitude), about this far from Berlin
    "Berlin": (13.4050, 52.5200),  # 0 km
    "Potsdam": (13.0645, 52.3906),  # 27 km
    "Brandenburg an der Havel": (12.5316, 52.4125),  # 60 km
    "Hamburg": (9.9937, 53.5511),  # 255 km
    "Munich": (11.5820, 48.1351),  # 504 km
    "Paris": (2.3522, 48.8566),  # 878 km
}


def add_cities() -> None:
    City.objects.bulk_create(
        City(name=name, point=Point(lon, lat, srid=4326)) for name, (lon, lat) in CITIES.items()
    )


def backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return int(cursor.fetchone()[0])


def names_within(km: float) -> list[str]:
    return sorted(
        City.objects.filter(point__dwithin=(BERLIN, D(km=km))).values_list("name", flat=True)
    )


class DistanceTests(TestCase):
    @classmethod
    def setUpTestData(cls) -> None:
        add_cities()

    def test_dwithin_returns_exactly_the_cities_inside_the_radius(self) -> None:
        self.assertEqual(names_within(1), ["Berlin"])
        self.assertEqual(names_within(30), ["Berlin", "Potsdam"])
        self.assertEqual(names_within(70), ["Berlin", "Brandenburg an der Havel", "Potsdam"])
        self.assertEqual(len(names_within(1000)), len(CITIES))

    def test_distance_annotation_orders_by_distance(self) -> None:
        cities = City.objects.annotate(distance=Distance("point", BERLIN)).order_by("distance")
        self.assertEqual(
            [city.name for city in cities],
            ["Berlin", "Potsdam", "Brandenburg an der Havel", "Hamburg", "Munich", "Paris"],
        )
        km = {city.name: city.distance.km for city in cities}
        self.assertAlmostEqual(km["Berlin"], 0, delta=0.001)
        self.assertAlmostEqual(km["Potsdam"], 27, delta=2)
        self.assertAlmostEqual(km["Hamburg"], 255, delta=5)
        self.assertAlmostEqual(km["Paris"], 878, delta=10)

    def test_a_point_round_trips(self) -> None:
        paris = City.objects.get(name="Paris").point
        self.assertEqual(paris.srid, 4326)
        self.assertAlmostEqual(paris.x, 2.3522, places=6)
        self.assertAlmostEqual(paris.y, 48.8566, places=6)


class PooledPostGISTests(TransactionTestCase):
    def test_the_reused_connection_answers_spatial_queries(self) -> None:
        self.assertEqual(
            type(connections["default"]).__module__, "herokupool.db.backends.postgis.base"
        )
        self.assertGreaterEqual(connection.ops.spatial_version, (3, 0))
        add_cities()
        pid = backend_pid()
        connection.close()
        self.assertIsNone(connection.connection)
        self.assertEqual(backend_pid(), pid, "the same server session, from the pool")
        self.assertEqual(names_within(30), ["Berlin", "Potsdam"])
        connection.close()
        farthest = City.objects.annotate(d=Distance("point", BERLIN)).order_by("-d").first()
        self.assertEqual(farthest.name, "Paris")
        self.assertEqual(backend_pid(), pid)
