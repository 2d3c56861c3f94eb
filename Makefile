# herokupool's developer commands. `make run` and `make test` need nothing running:
# without DATABASE_URL / HEROKUPOOL_TEST_DSN they start an embedded PostgreSQL.
PYTHON ?= $(shell command -v python3.12 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help venv test test-unit test-fresh matrix lint format run bench bench-quick faults clean fleet

help:
	@echo "make run          the demo app (embedded PostgreSQL unless DATABASE_URL is set)"
	@echo "make test         the whole test suite on this Python"
	@echo "make test-unit    the tests that need no database"
	@echo "make test-fresh   the integration suite on an embedded PostgreSQL (ignores DSNs)"
	@echo "make matrix       unit tests across Python x Django with tox"
	@echo "make lint         ruff and mypy (strict)"
	@echo "make bench        the benchmark against peers; make bench-quick for a short run"
	@echo "make faults       restarts, killed backends, outage, full server, new password, soak"
	@echo "make fleet        fleet sizing: 2/8/32 processes vs max_connections 20, direct and via PgBouncer"

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,dev,demo]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -X dev -m pytest $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(BIN)/python -X dev -m pytest tests/unit $(PYTEST_ARGS)

# The "fresh machine" run: no DSN, so the suite starts its own embedded PostgreSQL.
# PostGIS ships only with the system packages, so those tests are deselected here
# (they run in `make test`); the fault suite and devtools' own tests start private
# servers whatever the DSN, so `make test` has already run them.
test-fresh: $(STAMP)
	env -u HEROKUPOOL_TEST_DSN -u DATABASE_URL $(BIN)/python -X dev -m pytest tests -m "not postgis" \
		--ignore=tests/faults --ignore=tests/devtools $(PYTEST_ARGS)

# The fault suite (tests/faults, docs/reliability.md): the app under gunicorn on private
# PostgreSQL servers through a restart, killed backends, an outage, a full server and a password
# change, then a soak (HEROKUPOOL_SOAK_SECONDS, 75 by default). Figures at the end and in
# tests/faults/results.json.
faults: $(STAMP)
	$(BIN)/python -X dev -m pytest tests/faults $(PYTEST_ARGS)

matrix: $(STAMP)
	$(BIN)/python -m tox run-parallel --parallel 2 --parallel-no-spinner $(TOX_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
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

# Fleet sizing (bench/fleet.py, docs/fleet.md): N = 2, 8, 32 worker processes, each with its own
# pool, against a private PostgreSQL with max_connections 20, directly and through PgBouncer
# (transaction mode); about 4 minutes on 2 cores, loopback only. Results in docs/fleet.{md,json,png};
# FLEET_ARGS=--quick runs N = 2, 4 for 3 s and writes nothing. Uses the benchmark's .venv-bench.
fleet:
	sh bench/venv.sh $(PYTHON)
	.venv-bench/bin/python -m bench.fleet $(FLEET_ARGS)

# The demo as Heroku runs it (demo/run.py): collectstatic, the Procfile's release command,
# then its web command, and the URL once /healthz answers. Without DATABASE_URL it runs on an
# embedded PostgreSQL whose data stays in .pgdata (git-ignored); Ctrl-C stops both.
run: $(STAMP)
ifeq ($(strip $(DATABASE_URL)),)
	$(BIN)/python -m devtools.pgcluster run --datadir .pgdata -- $(BIN)/python -m demo.run
else
	$(BIN)/python -m demo.run
endif

clean:
	rm -rf $(VENV) .tox build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
