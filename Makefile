# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint unit system-deps node-deps generate dashboards bench bench-deps soak clean

demo: $(VENV)/.runtime
	$(BIN)/jobstats-exporter demo

test: $(VENV)/.test system-deps node-deps lint unit

lint: $(VENV)/.test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: $(VENV)/.test
	$(BIN)/pytest

# Figures, not tests: writes benchmarks/RESULTS.md with the machine's description.
bench: $(VENV)/.runtime bench-deps
	$(BIN)/python benchmarks/bench.py --results benchmarks/RESULTS.md

# The bench's peer row runs Debian's blackbox_exporter on the same upstream; the tests
# do not need it (their quick bench reports the row as skipped without it).
bench-deps:
	@command -v prometheus-blackbox-exporter >/dev/null || \
	  scripts/install-system-deps prometheus-blackbox-exporter

# Thousands of scrapes while the upstream cycles through every fault; exit 1 on any violation.
soak: $(VENV)/.runtime
	$(BIN)/python benchmarks/soak.py --seconds 120

# Regenerate what is built from other files: the dashboard JSON from
# grafana/build_dashboards.py, then the Kubernetes manifests that copy the
# rules and the dashboard. The tests fail while any of them is stale.
generate: $(VENV)/.test
	$(BIN)/python grafana/build_dashboards.py
	$(BIN)/python deploy/kubernetes/build_manifests.py

dashboards: generate

# The tests run Debian's prometheus, promtool, alertmanager, amtool,
# docker-compose (its config parser) and redis-server for real.
system-deps:
	@for tool in prometheus promtool prometheus-alertmanager amtool docker-compose redis-server; do \
	  command -v $$tool >/dev/null || { scripts/install-system-deps; break; }; \
	done

# bullmq for the real BullMQ of the tests, exactly as tests/bullmq/package-lock.json
# pins it (Node.js and npm come with the machine). npm ci writes the hidden lock last.
NODE_DEPS := tests/bullmq/node_modules/.package-lock.json

node-deps: $(NODE_DEPS)

$(NODE_DEPS): tests/bullmq/package-lock.json tests/bullmq/package.json
	cd tests/bullmq && npm ci --no-audit --no-fund --ignore-scripts
	touch $@

$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.runtime
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info
