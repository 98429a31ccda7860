# The two commands of the README: `make demo` and `make test`. Each creates .venv and installs what it needs.
# `make image` builds the container image (docker/image.sh; TORCH=cuda, IMAGE=... as variables).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# torch first, pinned: the CPU build lies on disk here; an unpinned torch would pull a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

PYTEST := $(PY) -m pytest
.PHONY: install demo test test-fast test-integration test-e2e lint format image lock bench
install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Everything CI runs (.ci/run is `make test`): lint, then the three tiers, cheapest first, so that a
# failing unit test stops before the e2e tier's minutes (`make -k test` runs them all). The tests set up
# what they need, lazily and only as root (FTJOB_TEST_INSTALL=no opts out): the Slurm test cluster (up for
# the session, down at its end), shellcheck, the container engine and image; elsewhere they skip, saying why.
test: lint test-fast test-integration test-e2e

test-fast: $(STAMP)  # tests/unit: in-process, no process, server or model weights; under a minute
	$(PYTEST) -q tests/unit

test-integration: $(STAMP)  # tests/integration: the tiny model, local servers (moto, mlflow, hub), lint tools
	$(PYTEST) -q tests/integration

test-e2e: $(STAMP)  # tests/e2e: ftjob as processes: signals, ranks, Slurm, the container image, the bench
	$(PYTEST) -q tests/e2e

bench: $(STAMP)  # ftjob vs TRL vs padding, one epoch each, in minutes; appends to bench/RESULTS.md
	$(PY) -m bench $(BENCH_ARGS)

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

image:
	docker/image.sh build

lock:  # docker/requirements.lock, the versions the image installs: after changing dependencies or torch
	docker/image.sh lock
