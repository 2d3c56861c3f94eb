#!/bin/sh
# Create (or refresh when pyproject.toml changed) .venv-bench: herokupool plus the
# `bench` extra (the peers, psycopg 3, SQLAlchemy, gunicorn, matplotlib).  One
# virtualenv holds both drivers; bench.bootstrap hides psycopg 3 from the psycopg2
# configurations' processes.  Usage: bench/venv.sh [python]
set -eu
cd "$(dirname "$0")/.."
venv=.venv-bench
stamp=$venv/.installed
python=
for candidate in "${1:-}" python3.12 python3.13 python3.11 python3; do
    if [ -n "$candidate" ] && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        python=$candidate
        break
    fi
done
if [ -z "$python" ]; then
    echo "bench/venv.sh: no Python >= 3.11 found" >&2
    exit 1
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -e '.[bench]'
    touch "$stamp"
fi
command -v wrk >/dev/null || echo "bench: wrk not found; the HTTP run uses the slower Python client (apt-get install wrk)" >&2
command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ] || echo "bench: pgbouncer not found; that configuration is skipped (apt-get install pgbouncer)" >&2
