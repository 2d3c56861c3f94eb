"""Django's own test suite on both engines: collected only with HEROKUPOOL_DJANGO_SUITE=1.

It downloads the sdist of the installed Django once (into .cache/django-suite/) and takes a few
minutes, so a plain ``make test`` leaves it out altogether rather than reporting it skipped
(a skip would fail under HEROKUPOOL_REQUIRE_SERVICES=1). CI sets the variable.
"""

from __future__ import annotations

import os

if os.environ.get("HEROKUPOOL_DJANGO_SUITE", "") in ("", "0"):
    collect_ignore_glob = ["test_*.py"]
