# `make test` and `make run` are the two commands README.md promises work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

BENCH_VENV ?= .bench-venv
BENCH_STAMP := $(BENCH_VENV)/.installed

.PHONY: test run demo lint typecheck unit schema bench bench-env image deploy-check clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

# the Node CRM of the contract tests (tests/contract/node): npm packages from its lock file
NODE_DIR := tests/contract/node
NODE_STAMP := $(NODE_DIR)/node_modules/.installed

$(NODE_STAMP): $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		npm ci --prefix $(NODE_DIR) --no-audit --no-fund --loglevel=error && touch $@; \
	elif [ "$$CI" = "true" ]; then \
		echo "npm is required (the Node contract test); install Node.js" >&2; exit 1; \
	else \
		echo "npm not found: the Node contract test will be skipped"; \
	fi

# the Compose specification's JSON Schema, for validating deploy/compose.yaml without a
# container engine (deploy/compose-schema.txt pins the wheel it is read from)
COMPOSE_SCHEMA := $(VENV)/compose_spec.json

$(COMPOSE_SCHEMA): deploy/compose-schema.txt $(STAMP)
	rm -rf $(VENV)/compose-wheel
	$(BIN)/python -m pip download --quiet --no-deps --require-hashes \
		-r deploy/compose-schema.txt --dest $(VENV)/compose-wheel
	$(BIN)/python -c "import glob, sys, zipfile; \
		wheel = zipfile.ZipFile(glob.glob('$(VENV)/compose-wheel/*.whl')[0]); \
		sys.stdout.buffer.write(wheel.read('compose/config/compose_spec.json'))" > $@.tmp
	mv $@.tmp $@

test: $(STAMP) $(BENCH_STAMP) $(NODE_STAMP) $(COMPOSE_SCHEMA)
	$(BIN)/hadolint Dockerfile
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python -m pytest --cov --cov-report=term --cov-fail-under=0 $(PYTEST_ARGS)
	$(BIN)/coverage report --include='gateway/core/*' --fail-under=100

run: $(STAMP)
	$(BIN)/cascadegw demo

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy && $(BIN)/lint-imports

# the fast tests only: no locust virtualenv, no npm, no real Prometheus. Tests marked `slow`
# (real processes) and tests/deploy (fresh virtualenvs; `make deploy-check`) run in `make test`
unit: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" --ignore=tests/deploy $(PYTEST_ARGS)

schema: $(STAMP)
	$(BIN)/cascadegw schema > config/schema/cascadegw.schema.json

# locust gevent-patches whatever imports it, which breaks trio: it gets its own virtualenv
$(BENCH_STAMP): bench/requirements.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install --quiet -r bench/requirements.txt
	touch $@

bench-env: $(BENCH_STAMP)

bench: $(STAMP) $(BENCH_STAMP)
	$(BIN)/python bench/core_bench.py
	$(BIN)/python bench/admission_bench.py
	$(BIN)/python bench/memory_bench.py
	$(BIN)/python bench/run.py

# the Dockerfile and compose file, as `make test` checks them (hadolint, compose schema)
deploy-check: $(STAMP) $(COMPOSE_SCHEMA)
	$(BIN)/hadolint Dockerfile
	$(BIN)/python -m pytest tests/deploy $(PYTEST_ARGS)

# build the container image with podman (deploy/image.sh: a debootstrap base when no registry
# is reachable) and start it once
image:
	deploy/image.sh $(IMAGE_TAG)

clean:
	rm -rf $(VENV) $(BENCH_VENV) .pytest_cache .mypy_cache .ruff_cache .coverage
