# setpoint developer entry points. `make run` and `make test` are the README's Quickstart.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= setpoint.yaml
STATE := .setpoint

.PHONY: venv servers run stop test lint clean prometheusrule bench bench-supervise

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

## Prometheus, Alertmanager and systemd-analyze for the tests that run them: installed from Debian's packages
## where this runs as root with apt-get (services not started); elsewhere those tests skip, with a message here.
servers:
	@bash .ci/install-servers

## Start the daemon on embedded etcd with the example config, apply the example
## resources, wait until they converge and show their status. The daemon keeps
## running in the background; `make stop` stops it.
run: venv
	$(PY) examples/run_demo.py --config $(CONFIG) --resources examples/resources.yaml

stop: venv
	$(PY) examples/run_demo.py --config $(CONFIG) --stop

## Unit tests, layer contracts, type and lint checks, then integration tests against a real etcd
## and tests against real Prometheus and Alertmanager servers.
test: venv servers
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy .
	$(PY) -m pytest $(PYTEST_ARGS)

## The engine against etcd on this machine: ingest, coalescing, latency, throughput, resync, cold start, memory,
## LLM flapping; a table and JSON (about 30 minutes on 2 cores; BENCH_ARGS=--quick: under 2 minutes, e.g.
## "--quick --only latency,resync --json out.json").
bench: venv
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) -m benchmarks.engine $(BENCH_ARGS)

## setpoint's process agent side by side with supervisord: restart time after SIGKILL (p50/p99) and idle CPU
## while supervising 100 processes (BENCH_ARGS, e.g. "--processes 20 --kills 20 --json").
bench-supervise: venv
	$(PY) -m benchmarks.supervise $(BENCH_ARGS)

## Write deploy/kubernetes/prometheusrule.yaml from deploy/prometheus/alerts.yaml (edit only the latter).
prometheusrule: venv
	$(PY) deploy/prometheus/prometheusrule.py

clean:
	rm -rf $(VENV) $(STATE) build dist *.egg-info
