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

.PHONY: install demo test test-fast lint format image lock bench
install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

test-fast: $(STAMP)  # pure-logic tests only, in seconds
	$(PY) -m pytest -q -m "not integration"

bench: $(STAMP)  # ftjob vs TRL vs padding, one epoch each, in minutes; appends to bench/RESULTS.md
	$(PY) -m bench $(BENCH_ARGS)

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

image:
	docker/image.sh build

lock:  # docker/requirements.lock, the versions the image installs: after changing dependencies or torch
	docker/image.sh lock
