# Two entry points that do all the set-up on a fresh machine:
#   make demo   creates .venv, installs genofed, runs the demo on a synthetic cohort
#   make test   creates .venv, installs genofed with its test tools, runs the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.genofed-installed
DEMO_OUT ?= runs/demo

# No network calls from Flower, no runtime dependency installation, no progress bars in logs.
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	rm -rf $(DEMO_OUT)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/genofed demo --out $(DEMO_OUT)

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
