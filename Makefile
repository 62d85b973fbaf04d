# Every target creates or refreshes .venv itself, so a fresh clone needs only `make up` / `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# litellm's price map is data we read, not code we run: pinned for reproducible prices.
LITELLM_VERSION := 1.110.2
STAMP  := $(VENV)/.installed-$(LITELLM_VERSION)

.PHONY: venv up lint test test-fast bench docs clean

$(STAMP): pyproject.toml Makefile
	@echo "==> preparing $(VENV) (Python virtual environment)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,devstack]'
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps 'litellm==$(LITELLM_VERSION)'
	@rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

up: $(STAMP)
	$(BIN)/billingproxy up

# The checks the tests start with: lint, format, types, import contracts (pyproject.toml configures them).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

test: lint
	$(BIN)/python -m pytest -q

# The tests that start no process (no PostgreSQL, Envoy, stack, operator or browser).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not (db or envoy or stack or kube or browser)"

bench: $(STAMP)
	$(BIN)/python -m bench

# docs/configuration.md from the settings' `# --` comments; a unit test fails while it is stale.
docs: $(STAMP)
	$(BIN)/python -m billingproxy.settings_reference > docs/configuration.md.new
	mv docs/configuration.md.new docs/configuration.md

clean:
	rm -rf $(VENV) .data
