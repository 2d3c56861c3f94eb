"""herokupool's benchmark against its peers: ``make bench`` / ``make bench-quick``.

The coordinator (``python -m bench``) runs every configuration in its own subprocess:
Django's PostgreSQL backend chooses psycopg 3 whenever it can import it, so the
psycopg2-based configurations hide psycopg 3 from their process (see
:mod:`bench.bootstrap`).  This package must import nothing at the top level.
"""
