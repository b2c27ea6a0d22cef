# The two commands of the README: `make demo` and `make test`. Each creates what it needs
# (the virtualenv, the Python packages, and, when run as root, the Debian packages of the
# starter suite) and skips what is already there.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

# Installs come from uv.lock (every package of the tree at an exact version, with hashes), so
# an upstream release cannot change what a commit installs. uv itself is pinned with hashes in
# uv-bootstrap.txt and lives in a virtualenv of its own, .uv, that `uv sync` never touches.
UV_HOME := .uv
UV := $(UV_HOME)/bin/uv
# Extras of pyproject.toml to install: `dev` (pytest, ruff) here; cluster.yaml's head adds `aws`.
EXTRAS ?= dev
# ("compiled" in the stamp: a virtualenv installed before UV_COMPILE_BYTECODE is synced again once.)
INSTALLED := $(VENV)/.installed-from-lock-compiled-$(subst $() ,+,$(strip $(EXTRAS)))
export UV_PROJECT_ENVIRONMENT := $(abspath $(VENV))
export UV_PYTHON_DOWNLOADS := never
# Byte-compile every installed module once, at install. Where PYTHONDONTWRITEBYTECODE is set
# (as on the development machine) Python never caches what it compiles, and each of the
# suite's few hundred Ray and `mm` processes compiled torch, Ray and pandas again:
# `import ray.train.torch` takes 8.5 s of CPU without the .pyc files and 3.5 s with them.
export UV_COMPILE_BYTECODE := 1

.PHONY: demo test bench lint format venv lock check-lock debian test-debian

venv: $(INSTALLED)

$(UV): uv-bootstrap.txt
	@test -x $(UV_HOME)/bin/python || $(PYTHON) -m venv $(UV_HOME)
	$(UV_HOME)/bin/pip install --quiet --require-hashes --no-deps -r uv-bootstrap.txt
	@touch $@

$(INSTALLED): pyproject.toml uv.lock $(UV)
	@$(MAKE) --no-print-directory check-lock
	$(UV) sync --locked $(addprefix --extra ,$(EXTRAS)) --python $(PYTHON)
	@rm -f $(VENV)/.installed-from-lock-*
	@touch $@

# A lock that no longer matches pyproject.toml fails here (and so in CI), saying what to run.
check-lock: $(UV)
	@$(UV) lock --check --python $(PYTHON) --quiet 2>/dev/null || { \
		echo "uv.lock does not match pyproject.toml: run 'make lock' and commit uv.lock" >&2; exit 1; }

# Re-resolve after editing pyproject.toml's ranges (add --upgrade-package NAME to move one).
lock: $(UV)
	$(UV) lock --python $(PYTHON) $(LOCK_ARGS)

# Debian packages, installed when we are root (as CI is); otherwise the tests that need them
# skip and say which apt-get line to run. The starter suite's, for the demo and the tests;
# sshd and rsync for the test that brings cluster/onprem.yaml up with `ray up`.
TEST_DEBS := openssh-server rsync

debian: $(INSTALLED)
	@if [ "$$(id -u)" = 0 ]; then $(VENV)/bin/mm starter --packages-only; fi

test-debian: debian
	@if [ "$$(id -u)" = 0 ] && ! dpkg -s $(TEST_DEBS) >/dev/null 2>&1; then \
		apt-get install -y -qq --no-install-recommends $(TEST_DEBS) >/dev/null 2>&1 || \
		(apt-get update -qq && apt-get install -y -qq --no-install-recommends $(TEST_DEBS)); fi

demo: $(INSTALLED) debian
	$(VENV)/bin/mm demo configs/starter.yaml

test: check-lock $(INSTALLED) test-debian
	$(PY) -m pytest

# Most benchmarks read the starter's shards: build and prepare them first (both skip what is
# already there). parse_errors reads a trained model, which only `make demo` makes.
bench: $(INSTALLED) debian
	$(VENV)/bin/mm starter > /dev/null
	$(VENV)/bin/mm prepare configs/starter.yaml
	@for script in benchmarks/[a-z]*.py; do \
		name=$$(basename $$script .py); \
		[ $$name = common ] && continue; \
		if [ $$name = parse_errors ] && ! ls -d runs/*/checkpoint_* > /dev/null 2>&1; then \
			echo "benchmarks.parse_errors: skipped, it reads a trained model (make demo first)"; continue; fi; \
		$(PY) -m benchmarks.$$name || exit 1; \
	done

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(INSTALLED)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
