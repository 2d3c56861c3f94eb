"""Issue 15, item 5: libraries that recognise backends by ENGINE name.

django-cachalot caches only for the ENGINE names on its own list
(``CACHALOT_DATABASES = "supported_only"``): with herokupool's engine it silently caches
nothing unless ``CACHALOT_DATABASES`` names the alias, which is what herokupool's README
must document.  This test is documentation-driven: it proves the documented setting
works, and may well pass on main.

cachalot patches Django's SQL compiler process-wide when its app is ready, so each case
runs in a Python process of its own, leaving this one untouched.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from tests.conftest import Server
from tests.integration.conftest import settings_for
from tests.integration.isolation.conftest import HEROKUPOOL, STOCK

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]

SCRIPT = """
import django
django.setup()
from django.db import connections
from django.test.utils import CaptureQueriesContext
from tests.testapp.models import Item

with connections["default"].schema_editor() as editor:
    editor.create_model(Item)
Item.objects.create(name="cached")
assert [i.name for i in Item.objects.all()] == ["cached"]  # fills the cache
with CaptureQueriesContext(connections["default"]) as queries:
    assert [i.name for i in Item.objects.all()] == ["cached"]
print(len(queries.captured_queries))
"""


@pytest.mark.parametrize(
    ("engine", "cachalot_databases", "queries"),
    [
        (STOCK, "supported_only", 0),
        (HEROKUPOOL, ["default"], 0),
        # The trap the README warns of (and the proof that this test can see a miss).
        (HEROKUPOOL, "supported_only", 1),
    ],
    ids=[
        "stock-default_setting-caches",
        "herokupool-CACHALOT_DATABASES_names_the_alias-caches",
        "herokupool-default_setting-silently_caches_nothing",
    ],
)
def test_cachalot_caches_on_herokupool_with_the_documented_setting(
    pg_server: Server, tmp_path: Path, engine: str, cachalot_databases: object, queries: int
) -> None:
    """Item 5 (documentation-driven, passes on main): django-cachalot with
    ``CACHALOT_DATABASES`` naming herokupool's alias caches: the second identical query
    reaches no database, as on the stock engine with cachalot's default setting; with the
    default setting it silently caches nothing on herokupool's engine."""
    pytest.importorskip("cachalot")
    url = pg_server.create_database(f"hp_iso_cachalot_{uuid.uuid4().hex[:10]}")
    database = settings_for(url, engine=engine)
    settings = textwrap.dedent(
        f"""
        SECRET_KEY = "herokupool-tests-only"
        USE_TZ = True
        INSTALLED_APPS = [
            "django.contrib.contenttypes",
            "django.contrib.auth",
            "cachalot",
            "tests.testapp",
        ]
        DATABASES = {{"default": {database!r}}}
        CACHES = {{"default": {{"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}}}
        CACHALOT_DATABASES = {cachalot_databases!r}
        DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
        """
    )
    (tmp_path / "hp_cachalot_settings.py").write_text(settings, encoding="utf-8")
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "hp_cachalot_settings",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
    }
    done = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error", "-c", SCRIPT],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(queries)], "queries the second identical query ran"
