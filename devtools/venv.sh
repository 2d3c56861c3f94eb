#!/bin/sh
# `make venv`: build the development virtualenv, or rebuild one that cannot work.
#
#   sh devtools/venv.sh PYTHON VENV PSYCOPG2 PYTHON_ORIGIN [EXTRAS]
#
# PYTHON     the interpreter to build with (must be 3.11 or newer; 3.12 is .python-version's)
# VENV       the virtualenv's directory (.venv)
# PSYCOPG2   "source" (pip builds psycopg2: needs pg_config and a C compiler) or "binary"
#            (psycopg2-binary, for a machine without pg_config; see devtools/requirements.py)
# PYTHON_ORIGIN  make's $(origin PYTHON): when PYTHON was given (command line or environment)
#            and is another version than the virtualenv's, the virtualenv is rebuilt with it
#
# A virtualenv whose Python is missing, broken or older than 3.11 (left by a `make` run with
# an unsupported Python first on PATH) is removed and built again: pip would otherwise fail in
# it the same way on every run. Nothing is removed before PYTHON is known to be usable.
# Does nothing when the virtualenv is sound and newer than pyproject.toml.
set -eu

python=$1
venv=$2
psycopg2=$3
origin=$4
# django-prometheus is not in the test extra (it excludes Django 6.1); .venv has the default
# Django (6.0 while django-prometheus' newest declares Django<6.1), so it gets it.
extras="test,dev,demo,django-prometheus${5:+,$5}"
stamp="$venv/.installed"
goals=${MAKE_GOALS:-venv}

version_of() {
    "$1" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null || echo "unknown"
}

supported() {
    "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

minor() {
    "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo "none"
}

refuse() {
    echo "make: $1" >&2
    echo "make: herokupool needs Python 3.11 or newer (3.12 recommended: .python-version)." >&2
    echo "make: install one (e.g. \`pyenv install 3.12\` or your system's python3.12 package)" \
        "and name it: make PYTHON=/path/to/python3.12 $goals" >&2
    exit 1
}

rebuild=""
if [ -e "$venv" ]; then
    if ! supported "$venv/bin/python"; then
        rebuild="its Python is $(version_of "$venv/bin/python"), not 3.11 or newer"
    elif [ "$origin" = "command line" ] || [ "$origin" = "environment" ]; then
        if [ "$(minor "$venv/bin/python")" != "$(minor "$python")" ]; then
            rebuild="it has Python $(minor "$venv/bin/python") and PYTHON=$python is $(minor "$python")"
        fi
    fi
fi
if [ -z "$rebuild" ] && [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
    exit 0
fi

if [ -z "$python" ]; then
    refuse "no python3.12, python3.13, python3.11 or python3 on PATH."
elif ! command -v "$python" >/dev/null 2>&1; then
    refuse "PYTHON=$python is not a program."
elif ! supported "$python"; then
    refuse "PYTHON=$python is Python $(version_of "$python")."
fi

if [ -n "$rebuild" ]; then
    echo "make: rebuilding $venv: $rebuild." >&2
    rm -rf "$venv"
fi
if [ ! -d "$venv" ]; then
    echo "$python -m venv $venv"
    if ! "$python" -m venv "$venv"; then
        rm -rf "$venv"
        echo "make: $python -m venv failed (on Debian and Ubuntu, install the python3.X-venv" \
            "package of that version)." >&2
        exit 1
    fi
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
if [ "$psycopg2" = "binary" ]; then
    echo "make: installing psycopg2-binary instead of building psycopg2 (pg_config is not on" \
        "PATH; this virtualenv only: the package still depends on psycopg2)." >&2
    # shellcheck disable=SC2046 # one argument per extra
    "$venv/bin/python" devtools/requirements.py $(echo "$extras" | tr , ' ') \
        >"$venv/requirements-binary.txt"
    "$venv/bin/python" -m pip install --quiet -r "$venv/requirements-binary.txt"
    "$venv/bin/python" -m pip install --quiet --no-deps -e .
else
    "$venv/bin/python" -m pip install --quiet -e ".[$extras]"
fi
touch "$stamp"
