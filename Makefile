# flox-node-cache: `make run` starts the agent on a working default; `make test` runs the whole suite.
# Both set up everything they need on a fresh Debian machine (root): system packages and .venv.

PYTHON   ?= python3
VENV     := .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.installed
APT_PKGS := nix-bin git prometheus nginx-light curl
# Binaries that tell whether the packages above are present.
APT_BINS := nix-store git prometheus promtool nginx curl

.PHONY: run test lint system-deps venv clean loadtest

run: venv
	mkdir -p var/run
	$(BIN)/flox-node-cache run --store var/store --socket var/run/agent.sock

test: system-deps venv
	$(BIN)/ruff check agent tests loadtest
	$(BIN)/pytest -q $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check agent tests loadtest

loadtest: system-deps venv
	$(BIN)/python -m loadtest $(LOADTEST_ARGS)

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

system-deps:
	@missing=""; for b in $(APT_BINS); do command -v $$b >/dev/null 2>&1 || missing="$$missing $$b"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages (missing:$$missing)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PKGS); \
	fi

clean:
	rm -rf var .pytest_cache .ruff_cache .hypothesis
