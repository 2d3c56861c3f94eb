from collections.abc import Iterator

import pytest

from herokupool import drivers
from tests.unit import fakes
from tests.unit.fakes import FakeConnection


@pytest.fixture(autouse=True)
def _dispose_fake_connections() -> Iterator[None]:
    yield
    while FakeConnection.instances:
        FakeConnection.instances.pop().dispose()


@pytest.fixture(params=drivers.available())
def flavour(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a pool test once per driver installed: FakeDriver then makes connections shaped
    like that driver's, which the pool serves through that driver's adapter."""
    fakes.flavour = request.param
    try:
        yield request.param
    finally:
        fakes.flavour = "psycopg2"
