# The two commands of the README: `make demo` and `make test`. Each creates what it needs
# (the virtualenv, the Python packages, and, when run as root, the Debian packages of the
# starter suite) and skips what is already there.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo test bench lint format venv

venv: $(INSTALLED)

$(INSTALLED): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: $(INSTALLED)
	$(PY) -m mm.selftest

test: $(INSTALLED)
	$(PY) -m pytest

bench: $(INSTALLED)
	@for script in benchmarks/[a-z]*.py; do \
		name=$$(basename $$script .py); \
		[ $$name = common ] || $(PY) -m benchmarks.$$name || exit 1; \
	done

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(INSTALLED)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
