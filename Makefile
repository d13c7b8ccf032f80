# The one entry point: `make run`, `make test`, `make lint`, `make bench`.
# Only Python 3.11+ is needed: the virtualenv, the packages and (when KAM_DATABASE_URL /
# KAM_REDIS_URL are not set) an embedded Postgres and Redis are set up on first use.

PYTHON ?= python3
# The browser the workspace's tests drive (Debian's package; no browser is downloaded).
CHROMIUM ?= /usr/bin/chromium
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: install run test lint format bench bench-ingest bench-score bench-webhooks bench-web soak clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit("Python 3.11+ is required") if sys.version_info < (3, 11) else None'
	@echo "first run (or pyproject.toml changed): installing into $(VENV), about a minute..."
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -e '.[embedded,dev]' | grep -E '^(Collecting|Successfully)' || true
	@$(BIN)/python -c 'import services.api.app' || (echo "the install failed: see the pip output above" && false)
	touch $@
	@echo "installed."

HOST ?= 127.0.0.1
PORT ?= 8000

run: install ## set up and run the API and the scorer on http://$(HOST):$(PORT) (make run PORT=8001)
	KAM_HOST=$(HOST) KAM_PORT=$(PORT) $(BIN)/kam dev

test: install ## the whole suite against real Postgres and Redis, and Chromium for the workspace
	@test -x $(CHROMIUM) || { echo "make test: Chromium is missing ($(CHROMIUM)); the workspace's browser tests need it: apt-get install -y chromium" >&2; exit 1; }
	KAM_CHROMIUM=$(CHROMIUM) $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install ## ruff and mypy --strict (alembic check runs in the test suite)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: bench-ingest bench-score bench-webhooks bench-web ## every benchmark, each figure beside its ceiling

bench-ingest: install
	$(BIN)/python -m bench.ingest

bench-score: install ## 100,000 accounts, 5M orders: the portfolio pass, event-to-snapshot latency
	$(BIN)/python -m bench.score

bench-webhooks: install ## order to verified webhook, delivery throughput beside a bare httpx loop
	$(BIN)/python -m bench.webhooks

soak: install ## ten minutes of mixed load, watched each minute; then everything must drain
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

bench-web: install ## p95 server time of every workspace page beside the bare /healthz
	$(BIN)/python -m bench.web

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
