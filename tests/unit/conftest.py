from collections.abc import Iterator

import pytest

from tests.unit.fakes import FakeConnection


@pytest.fixture(autouse=True)
def _dispose_fake_connections() -> Iterator[None]:
    yield
    while FakeConnection.instances:
        FakeConnection.instances.pop().dispose()
