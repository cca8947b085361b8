# livekit-mls — every set-up step is a target here; `make demo` and `make test` need
# nothing but Python 3.10+, Rust, Go and a C compiler on the machine.
#
# Caches (all ignored by git, reused by later runs):
#   .venv/             Python virtualenv with the project installed (maturin develop)
#   .cache/target/     cargo target dir
#   .cache/bin/        livekit-server built from the Go module proxy; redis-server from PyPI
#   .cache/go/         Go module and build caches

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CACHE := $(CURDIR)/.cache
LIVEKIT_VERSION := v1.13.5
LIVEKIT_SERVER := $(CACHE)/bin/livekit-server-$(LIVEKIT_VERSION)
REDIS_VERSION := 6.2.14
REDIS_SERVER := $(CACHE)/bin/redis-server-$(REDIS_VERSION)
PYTEST_ARGS ?=

export CARGO_TARGET_DIR := $(CACHE)/target
export GOMODCACHE := $(CACHE)/go/mod
export GOCACHE := $(CACHE)/go/build
export LIVEKIT_MLS_LIVEKIT_SERVER := $(LIVEKIT_SERVER)
export LIVEKIT_MLS_REDIS_SERVER := $(REDIS_SERVER)

NATIVE_SOURCES := $(shell find native -name '*.rs' -o -name 'Cargo.toml' | grep -v /target/) native/Cargo.lock
PROTO_SOURCES := $(wildcard proto/livekit/mls/v1/*.proto)

.PHONY: help
help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

## ---- set-up -------------------------------------------------------------------------

$(VENV)/.deps: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt maturin
	# every runtime and dev dependency, pinned (the project itself comes from `native`)
	$(PY) scripts/project_deps.py | $(PY) -m pip install --quiet -c constraints.txt -r /dev/stdin
	touch $@

$(VENV)/.native: $(VENV)/.deps $(NATIVE_SOURCES)
	VIRTUAL_ENV=$(CURDIR)/$(VENV) $(VENV)/bin/maturin develop --release --locked
	touch $@

.PHONY: venv native livekit-server redis-server
venv: $(VENV)/.deps  ## create .venv with pinned dependencies
native: $(VENV)/.native  ## build the Rust extension into .venv (release)

livekit-server: $(LIVEKIT_SERVER)  ## build livekit-server from the Go module proxy
$(LIVEKIT_SERVER):
	mkdir -p $(CACHE)/bin
	@echo "building livekit-server $(LIVEKIT_VERSION) from the Go module proxy (first run: ~3-6 min)"
	GOBIN=$(CACHE)/bin CGO_ENABLED=0 go install -trimpath github.com/livekit/livekit-server/cmd/server@$(LIVEKIT_VERSION)
	mv $(CACHE)/bin/server $@

redis-server: $(REDIS_SERVER)  ## fetch the pinned redis-server (for the Redis store tests)
$(REDIS_SERVER):
	$(PYTHON) scripts/fetch_redis_server.py $@

## ---- code generation ---------------------------------------------------------------

.PHONY: proto proto-check
proto: $(VENV)/.deps  ## regenerate the gRPC/protobuf Python code from proto/
	$(PY) scripts/gen_proto.py

proto-check: $(VENV)/.deps  ## fail if the generated code is not what proto/ produces
	$(PY) scripts/gen_proto.py --check

## ---- quality -----------------------------------------------------------------------

.PHONY: lint fmt
lint: $(VENV)/.native  ## ruff, mypy, cargo fmt --check, clippy, generated-code check
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	cd native && cargo fmt --all --check
	cd native && cargo clippy --release --all-targets --locked -- -D warnings
	$(PY) scripts/gen_proto.py --check

fmt:  ## format Python and Rust code
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .
	cd native && cargo fmt --all

## ---- the two main commands ---------------------------------------------------------

.PHONY: test test-rust test-python soak demo bench
test: lint test-rust test-python  ## everything CI runs: lint, Rust tests, pytest (real servers)

test-rust:
	cd native && cargo test --release --locked -q

test-python: $(VENV)/.native $(LIVEKIT_SERVER) $(REDIS_SERVER)
	$(PY) -m pytest $(PYTEST_ARGS)

SOAK_RUNS ?= 20
SOAK ?=
soak: $(VENV)/.native $(LIVEKIT_SERVER) $(REDIS_SERVER)  ## loop the kill/race/timing tests: make soak [SOAK_RUNS=20] [SOAK=tests/x.py]
	$(PY) scripts/soak.py -n $(SOAK_RUNS) $(SOAK)

demo: $(VENV)/.native $(LIVEKIT_SERVER)  ## live room: livekit-server + DS (SQLite) + participants
	$(PY) -m mls_provider.demo

SCENARIO ?= scenarios/leave-and-kill.yaml
.PHONY: harness
harness: $(VENV)/.native $(LIVEKIT_SERVER)  ## run a scenario: make harness SCENARIO=file.yaml
	$(PY) -m mls_provider.testing.harness_cli --scenario $(SCENARIO)

bench: $(VENV)/.native $(LIVEKIT_SERVER) $(REDIS_SERVER)  ## run every benchmark, rewrite docs/benchmarks.md
	$(PY) benchmarks/run_all.py

.PHONY: clean
clean:  ## remove the virtualenv and build caches
	rm -rf $(VENV) $(CACHE)
