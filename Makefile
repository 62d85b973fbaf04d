# Every target creates or refreshes .venv itself, so a fresh clone needs only `make up` / `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# litellm's price map is data we read, not code we run: pinned for reproducible prices.
LITELLM_VERSION := 1.110.2
STAMP  := $(VENV)/.installed-$(LITELLM_VERSION)

.PHONY: up test bench lint clean

$(STAMP): pyproject.toml Makefile
	@echo "==> preparing $(VENV) (Python virtual environment)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps 'litellm==$(LITELLM_VERSION)'
	@rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

up: $(STAMP)
	$(BIN)/billingproxy up

test: $(STAMP)
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .data
