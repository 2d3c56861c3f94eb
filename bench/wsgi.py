"""The WSGI application gunicorn serves in the HTTP run (configuration in BENCH_CONFIG)."""

# First, before anything imports Django: hide psycopg 3 from psycopg2 configurations.
import bench.bootstrap

bench.bootstrap.prepare()

from django.core.wsgi import get_wsgi_application  # noqa: E402

application = get_wsgi_application()
