# herokupool's developer commands. `make run` and `make test` need nothing running:
# without DATABASE_URL / HEROKUPOOL_TEST_DSN they start an embedded PostgreSQL.
#
# PYTHON: the interpreter .venv is built with, 3.11 or newer (`make PYTHON=/path/to/python3.12`).
PYTHON ?= $(shell command -v python3.12 || command -v python3.13 || command -v python3.11 || command -v python3)
# Two virtualenvs, one per driver: Django's PostgreSQL backend picks psycopg 3 whenever it can
# import it, so .venv holds psycopg2 only and .venv-pg3 adds herokupool[psycopg] (psycopg 3).
VENV ?= .venv
VENV_PG3 ?= .venv-pg3
BIN := $(VENV)/bin
BIN_PG3 := $(VENV_PG3)/bin
# psycopg2 is built from source (a C compiler and pg_config, from libpq-dev) when pg_config is on
# PATH, as Heroku builds it; otherwise .venv gets the psycopg2-binary wheel. PSYCOPG2=source or
# PSYCOPG2=binary chooses.
PSYCOPG2 ?= $(if $(shell command -v pg_config),source,binary)

.PHONY: help venv venv-pg3 test test-psycopg2 test-psycopg3 test-unit test-fresh matrix lint format \
	run bench bench-quick bench-instructions faults clean fleet

help:
	@echo "make help         this list"
	@echo "make venv         .venv with the package and its test, dev, demo and django-prometheus extras (PYTHON=...)"
	@echo "make venv-pg3     .venv-pg3: the same plus the psycopg extra (psycopg 3)"
	@echo "make run          the demo app (embedded PostgreSQL unless DATABASE_URL is set)"
	@echo "make test         the whole test suite on psycopg2, then on psycopg 3 (PYTEST_ARGS=...)"
	@echo "make test-psycopg2  the whole test suite on psycopg2 (.venv)"
	@echo "make test-psycopg3  the test suite on psycopg 3 (.venv-pg3), tests/devtools left out"
	@echo "make test-unit    the tests that need no database (psycopg2)"
	@echo "make test-fresh   the integration suite on an embedded PostgreSQL (ignores DSNs), both drivers"
	@echo "make matrix       unit tests across Python x Django x driver with tox"
	@echo "make lint         ruff and mypy (strict)"
	@echo "make format       ruff's fixes and formatting, applied"
	@echo "make bench        the benchmark against peers"
	@echo "make bench-quick  a short run of the benchmark"
	@echo "make bench-instructions  connect+close, waited connects and requests in CPU instructions (valgrind)"
	@echo "make faults       restarts, killed backends, outage, full server, new password, soak (both drivers)"
	@echo "make fleet        fleet sizing: 2/8/32 processes vs max_connections 20, direct and via PgBouncer"
	@echo "make clean        remove .venv, .venv-pg3, tox's environments, build output and tool caches"

# Rebuilds a .venv whose Python is missing, older than 3.11 or (with PYTHON given) another
# version; reinstalls when pyproject.toml is newer than .venv/.installed; else does nothing.
venv:
	@MAKE_GOALS="$(MAKECMDGOALS)" sh devtools/venv.sh "$(PYTHON)" "$(VENV)" "$(PSYCOPG2)" "$(origin PYTHON)"

# The same rules, with psycopg 3 added (psycopg2 is still installed: the package depends on it).
venv-pg3:
	@MAKE_GOALS="$(MAKECMDGOALS)" sh devtools/venv.sh "$(PYTHON)" "$(VENV_PG3)" "$(PSYCOPG2)" "$(origin PYTHON)" psycopg

# Each driver in its own virtualenv; HEROKUPOOL_TEST_DRIVER makes tests/conftest.py refuse to
# start when Django loaded the other driver. tests/devtools (pgcluster, the relay, this
# Makefile) tests the harness, not the driver: it runs once, on psycopg2. The fault suite runs on
# both: its app under gunicorn recovers through the driver's errors (a restart, killed backends,
# an outage, a full server, a new password).
test: test-psycopg2 test-psycopg3

test-psycopg2: venv
	HEROKUPOOL_TEST_DRIVER=psycopg2 $(BIN)/python -X dev -m pytest $(PYTEST_ARGS)

test-psycopg3: venv-pg3
	HEROKUPOOL_TEST_DRIVER=psycopg3 $(BIN_PG3)/python -X dev -m pytest \
		--ignore=tests/devtools $(PYTEST_ARGS)

test-unit: venv
	HEROKUPOOL_TEST_DRIVER=psycopg2 $(BIN)/python -X dev -m pytest tests/unit $(PYTEST_ARGS)

# The "fresh machine" run: no DSN, so the suite starts its own embedded PostgreSQL.
# PostGIS ships only with the system packages, so those tests are deselected here
# (they run in `make test`); the fault suite and devtools' own tests start private
# servers whatever the DSN, so `make test` has already run them. Both drivers: the embedded
# server is another PostgreSQL version than CI's service, and what a new user's `make test` meets.
# FRESH_DRIVERS=psycopg3 runs one (CI, whose `make test` has run both on its service).
FRESH_DRIVERS ?= psycopg2 psycopg3
test-fresh: $(if $(filter psycopg2,$(FRESH_DRIVERS)),venv) $(if $(filter psycopg3,$(FRESH_DRIVERS)),venv-pg3)
	@for driver in $(FRESH_DRIVERS); do \
		case $$driver in psycopg2) bin=$(BIN);; psycopg3) bin=$(BIN_PG3);; \
			*) echo "FRESH_DRIVERS: $$driver is neither psycopg2 nor psycopg3" >&2; exit 2;; esac; \
		echo "--- test-fresh on $$driver"; \
		env -u HEROKUPOOL_TEST_DSN -u DATABASE_URL HEROKUPOOL_TEST_DRIVER=$$driver \
			$$bin/python -X dev -m pytest tests -m "not postgis" \
			--ignore=tests/faults --ignore=tests/devtools $(PYTEST_ARGS) || exit 1; \
	done

# The fault suite (tests/faults, docs/reliability.md): the app under gunicorn on private
# PostgreSQL servers through a restart, killed backends, an outage, a full server and a password
# change, then a soak (HEROKUPOOL_SOAK_SECONDS, 75 by default). Figures at the end and in
# tests/faults/results.json.
faults: venv venv-pg3
	HEROKUPOOL_TEST_DRIVER=psycopg2 $(BIN)/python -X dev -m pytest tests/faults $(PYTEST_ARGS)
	HEROKUPOOL_TEST_DRIVER=psycopg3 $(BIN_PG3)/python -X dev -m pytest tests/faults $(PYTEST_ARGS)

matrix: venv
	$(BIN)/python -m tox run-parallel --parallel 2 --parallel-no-spinner $(TOX_ARGS)

# In .venv-pg3, which has both drivers (and types-psycopg2): mypy follows herokupool's imports of
# psycopg 3 (in .venv it cannot find them) as well as psycopg2's.
lint: venv-pg3
	$(BIN_PG3)/ruff check .
	$(BIN_PG3)/ruff format --check .
	$(BIN_PG3)/mypy

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The benchmark against the peers (bench/): results in bench/results/ (JSON, markdown, PNG).
# Its own virtualenv, .venv-bench, holds psycopg 3 and the peers; see docs/benchmarks.md.
bench:
	sh bench/venv.sh $(PYTHON)
	.venv-bench/bin/python -m bench $(BENCH_ARGS)

bench-quick:
	sh bench/venv.sh $(PYTHON)
	.venv-bench/bin/python -m bench --quick $(BENCH_ARGS)

# Django's connect+close and two of the bench's requests counted in instructions under valgrind's
# callgrind (bench/instructions.py): the native pool, herokupool and Django's own floor on psycopg 3;
# the same on a busy machine as on a quiet one. About 8 minutes; needs valgrind. BENCH_ARGS="--threads 8
# --workloads item" counts requests from 8 threads on the pool's 4 connections (most borrows wait);
# BENCH_ARGS=--bytecodes counts Python bytecodes instead (no valgrind, under a minute), which is what
# the time follows, with herokupool's own per function.
bench-instructions:
	sh bench/venv.sh $(PYTHON)
	.venv-bench/bin/python -m bench.instructions $(BENCH_ARGS)

# Fleet sizing (bench/fleet.py, docs/fleet.md): N = 2, 8, 32 worker processes, each with its own
# pool, against a private PostgreSQL with max_connections 20, directly and through PgBouncer
# (transaction mode); about 5 minutes on 2 cores, loopback only. Results in docs/fleet.{md,json,png};
# FLEET_ARGS=--quick runs N = 2, 4 for 3 s and writes nothing. Uses the benchmark's .venv-bench.
fleet:
	sh bench/venv.sh $(PYTHON)
	.venv-bench/bin/python -m bench.fleet $(FLEET_ARGS)

# The demo as Heroku runs it (demo/run.py): collectstatic, the Procfile's release command,
# then its web command, and the URL once /healthz answers. Without DATABASE_URL it runs on an
# embedded PostgreSQL whose data stays in .pgdata (git-ignored); Ctrl-C stops both.
run: venv
ifeq ($(strip $(DATABASE_URL)),)
	$(BIN)/python -m devtools.pgcluster run --datadir .pgdata -- $(BIN)/python -m demo.run
else
	$(BIN)/python -m demo.run
endif

clean:
	rm -rf $(VENV) $(VENV_PG3) .tox build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
