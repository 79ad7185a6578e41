# Two entry points that do all the set-up on a fresh machine:
#   make demo   creates .venv, installs genofed, runs the demo on a synthetic cohort
#   make test   creates .venv, installs genofed with its test tools, runs the test suite
#   make test-attacks   the slow attack campaign (docs/security.md); .ci/run runs it after make test
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.genofed-installed
DEMO_OUT ?= runs/demo
# Test processes: a suite of mostly end-to-end federations leaves a core idle while it waits on
# subprocesses and sockets; whole files go to one worker so a module's fixture is built once, the
# costliest files first (tests/conftest.py).
TEST_WORKERS ?= 2
# One math thread per worker: two workers with a thread per core each would oversubscribe the cores
# (measured: 7% slower on two federation files).
PYTEST := $(if $(filter 0,$(TEST_WORKERS)),,OMP_NUM_THREADS=1) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) \
	--dist loadfile --no-loadscope-reorder

# No network calls from Flower, no runtime dependency installation, no progress bars in logs.
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

# The report's browser test opens report.html in Debian's Chromium (a test tool's own browser
# download is not reachable from the machines genofed is tested on).
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: demo test test-attacks install clean chromium

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP) chromium
	$(PYTEST) -m "not attack"

test-attacks: $(STAMP)
	$(PYTEST) -m attack

chromium:
	@command -v chromium >/dev/null || { echo "installing Debian's chromium for the report's browser test"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "could not install chromium: tests/test_report_browser.py will fail until it is installed"; }

demo: $(STAMP)
	rm -rf $(DEMO_OUT)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/genofed demo --out $(DEMO_OUT)

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
