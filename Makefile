# The two commands of the README: `make demo` and `make test`. Each creates what it needs
# (the virtualenv, the Python packages, and, when run as root, the Debian packages of the
# starter suite) and skips what is already there.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo test bench lint format venv debian test-debian

venv: $(INSTALLED)

$(INSTALLED): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

# Debian packages, installed when we are root (as CI is); otherwise the tests that need them
# skip and say which apt-get line to run. The starter suite's, for the demo and the tests;
# sshd and rsync for the test that brings cluster/onprem.yaml up with `ray up`.
TEST_DEBS := openssh-server rsync

debian: $(INSTALLED)
	@if [ "$$(id -u)" = 0 ]; then $(PY) -m pipelines.starter --packages-only; fi

test-debian: debian
	@if [ "$$(id -u)" = 0 ] && ! dpkg -s $(TEST_DEBS) >/dev/null 2>&1; then \
		apt-get install -y -qq --no-install-recommends $(TEST_DEBS) >/dev/null 2>&1 || \
		(apt-get update -qq && apt-get install -y -qq --no-install-recommends $(TEST_DEBS)); fi

demo: $(INSTALLED) debian
	$(VENV)/bin/mm demo configs/starter.yaml

test: $(INSTALLED) test-debian
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
