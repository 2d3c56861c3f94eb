"""WSGI entry point for gunicorn (``gunicorn --config gunicorn.conf.py demo.wsgi``).

With ``preload_app`` gunicorn imports this module in the master process and then forks the
workers: settings are loaded once, and no database connection exists yet (herokupool
creates each worker's pool on its first query).
"""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo.settings")

application = get_wsgi_application()
