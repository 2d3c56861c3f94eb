"""``manage.py load [URL]``: a burst of concurrent requests against the demo's /api/work.

Each request holds a pooled connection for ``--hold`` seconds. With more concurrent requests
than dynos x WEB_CONCURRENCY x POOL_MAX_CONNS the pools queue them (the page's chart shows
the orange "waiting" bars) and drain the queue; no server ever sees more connections than
that product. Works against a local ``make run`` or a deployed app::

    python manage.py load https://<app>.herokuapp.com/ --requests 400 --concurrency 32
"""

from __future__ import annotations

import os
from typing import Any, ClassVar
from urllib.parse import urlencode, urljoin, urlsplit

from django.core.management.base import BaseCommand, CommandError, CommandParser

from demo.dashboard.loadgen import burst


class Command(BaseCommand):
    help = "Send a burst of concurrent requests to the demo's /api/work and summarise them."

    # An HTTP client only: no system checks, no database.
    requires_system_checks: ClassVar[list[str]] = []

    def add_arguments(self, parser: CommandParser) -> None:
        default = f"http://127.0.0.1:{os.environ.get('PORT', '8000')}/"
        parser.add_argument("url", nargs="?", default=default, help=f"the app (default {default})")
        parser.add_argument("--requests", type=int, default=200, help="how many (default 200)")
        parser.add_argument(
            "--concurrency", type=int, default=16, help="client threads (default 16)"
        )
        parser.add_argument(
            "--hold",
            type=float,
            default=0.05,
            help="seconds each request holds its connection (default 0.05, at most 1)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        base = options["url"]
        if urlsplit(base).scheme not in ("http", "https"):
            raise CommandError(f"URL ({base!r}) must start with http:// or https://.")
        if options["requests"] < 1 or options["concurrency"] < 1:
            raise CommandError("--requests and --concurrency must be at least 1.")
        target = urljoin(base, "/api/work") + "?" + urlencode({"hold": options["hold"]})
        self.stdout.write(
            f"{options['requests']} requests to {target} from {options['concurrency']} threads..."
        )
        report = burst(target, options["requests"], options["concurrency"])
        for line in report.lines():
            self.stdout.write(line)
        if report.statuses.get(200, 0) != report.total:
            raise CommandError(f"{report.total - report.statuses.get(200, 0)} request(s) failed.")
