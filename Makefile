# The two commands of the README: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_LOGGING_LEVEL ?= INFO

.PHONY: demo test lint install clean-demo prefect-up prefect-down prefect-status

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m flows.demo --out runs/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check smlstm features flows tests bench

test: $(STAMP) lint
	$(VENV)/bin/pytest -q

clean-demo:
	rm -rf runs/demo

# A local Prefect server (127.0.0.1, SQLite under .prefect/), the process work pool, every
# deployment of prefect.yaml and a worker; `make prefect-down` stops them by PID.
prefect-up: $(STAMP)
	scripts/prefect-local start

prefect-down:
	scripts/prefect-local stop

prefect-status:
	scripts/prefect-local status
