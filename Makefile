# grpc-guard: the one entry point. What CI runs (`make test`) is what a user runs.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# Build outputs live outside the clone so a fresh clone reuses earlier builds.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/grpc-guard/target
CARGO ?= cargo
# cargo's output, and the filter as shipped: the same after binaryen's
# wasm-opt -Oz (smaller, less work per call), without folding functions that
# have one caller into it: V8 compiles those giant functions with so much
# memory that Envoy's RSS grew 13 MiB (make bench reports RSS).
WASM_CARGO := $(CARGO_TARGET_DIR)/wasm32-wasip1/release/grpc_guard.wasm
WASM := $(CARGO_TARGET_DIR)/grpc-guard/grpc_guard.wasm
WASM_FEATURES := --enable-bulk-memory --enable-sign-ext --enable-mutable-globals --enable-nontrapping-float-to-int
ENVOY := $(CURDIR)/.venv/bin/envoy
# Seconds `make run` keeps serving after the demo traffic; empty = until Ctrl-C.
RUN_SECONDS ?=
# The filter configuration `make run` uses: the demo's streaming methods typed.
PLUGIN_CONFIG ?= $(shell cat envoy/demo-plugin-config.json)

export GRPC_GUARD_WASM := $(WASM)
export GRPC_GUARD_ENVOY := $(ENVOY)

.PHONY: help setup wasm run demo render bench soak test lint unit e2e fuzz clean

help:
	@echo "make run     build the filter, start the demo service behind Envoy, send demo traffic, show metrics and logs"
	@echo "make demo    the same, for 10 seconds, then exit (non-interactive)"
	@echo "make test    install what is missing, then lint and run every test"
	@echo "make wasm    build the release filter: $(WASM)"
	@echo "make bench   grpc-guard against bare Envoy, grpc_stats and a do-nothing wasm filter (bench/results.md)"
	@echo "make soak    10 minutes of mixed traffic through Envoy: memory, counts and at-most-once checked (SOAK_SECONDS=...)"
	@echo "make fuzz    run every fuzz target for FUZZ_SECONDS (default 20) on nightly; fails on a crash"
	@echo "make render  write the Envoy config for running Envoy yourself: .run/envoy.rendered.yaml"
	@echo "make clean   remove build outputs and .venv"

setup:
	@scripts/setup.sh

# Each capability's own targets (cost model, deployment): mk/*.mk.
-include mk/*.mk

wasm: setup
	$(CARGO) build -p grpc-guard-filter --target wasm32-wasip1 --release
	@# The floor filter too: the tests make its VM trap to show Envoy's failure policy.
	$(CARGO) build -p grpc-guard-floor --target wasm32-wasip1 --release
	@mkdir -p $(dir $(WASM))
	@if [ ! -e $(WASM) ] || [ $(WASM_CARGO) -nt $(WASM) ]; then \
		wasm-opt -Oz --one-caller-inline-max-function-size=0 $(WASM_FEATURES) $(WASM_CARGO) -o $(WASM).tmp && mv $(WASM).tmp $(WASM); fi
	@echo "filter: $(WASM) ($$(stat -c %s $(WASM)) bytes)"

run: wasm
	$(CARGO) build -p grpc-guard-demo --bins
	$(CARGO_TARGET_DIR)/debug/grpc-guard-run --envoy $(ENVOY) --wasm $(WASM) \
		--plugin-config '$(PLUGIN_CONFIG)' $(if $(RUN_SECONDS),--seconds $(RUN_SECONDS))

demo:
	$(MAKE) run RUN_SECONDS=10

# The Envoy config for `docker run envoyproxy/envoy` (README). RENDER_WASM is
# where the .wasm will be inside the container; RENDER_ARGS takes
# grpc-guard-run's port flags, e.g. RENDER_ARGS='--upstream-port 8080'.
RENDER_WASM ?= /etc/grpc-guard/grpc_guard.wasm
RENDER_ARGS ?=
render: setup
	$(CARGO) build -p grpc-guard-demo --bins
	@mkdir -p .run
	$(CARGO_TARGET_DIR)/debug/grpc-guard-run --wasm $(RENDER_WASM) --plugin-config '$(PLUGIN_CONFIG)' \
		$(RENDER_ARGS) render > .run/envoy.rendered.yaml
	@echo "wrote .run/envoy.rendered.yaml"

lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) fmt --manifest-path fuzz/Cargo.toml -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p grpc-guard-filter --target wasm32-wasip1 --release -- -D warnings

unit: setup
	$(CARGO) test -p grpc-guard-filter -p grpc-guard-demo

# The wasmtime host tests and the end-to-end tests load the release .wasm.
e2e: wasm
	$(CARGO) test -p grpc-guard-tests

# Envoy alone on CPU 0; h2load and the upstream on CPU 1 (DESIGN.md §7).
# The floor (bench/floor) is a Rust proxy-wasm filter that does nothing.
BENCH_ARGS ?=
FLOOR_WASM := $(CARGO_TARGET_DIR)/wasm32-wasip1/release/grpc_guard_floor.wasm
bench: wasm
	$(CARGO) build --release -p grpc-guard-demo --bins
	taskset -c 1 $(CARGO_TARGET_DIR)/release/grpc-guard-bench --envoy $(ENVOY) --wasm $(WASM) \
		--floor-wasm $(FLOOR_WASM) --envoy-cpus 0 $(BENCH_ARGS)

# Mixed traffic through Envoy for SOAK_SECONDS (10 minutes by default; `make
# test` runs a 40 s one): memory flat, every call counted once, each key run at
# most once (README "Soak").
SOAK_SECONDS ?= 600
SOAK_RATE ?= 100
soak: wasm
	$(CARGO) build --release -p grpc-guard-tests --bin grpc-guard-soak
	$(CARGO_TARGET_DIR)/release/grpc-guard-soak --seconds $(SOAK_SECONDS) --rate $(SOAK_RATE)

# Coverage-guided fuzzing (fuzz/, README "Fuzzing"): each target
# FUZZ_SECONDS under libFuzzer on nightly (or FUZZ_RUNS executions, if
# sooner), then executions per target; a crash fails. FUZZ_TARGETS picks
# some, e.g. FUZZ_TARGETS='frames method'.
FUZZ_SECONDS ?= 20
FUZZ_RUNS ?=
FUZZ_TARGETS ?=
fuzz:
	@SETUP_FUZZ=1 scripts/setup.sh
	FUZZ_RUNS=$(FUZZ_RUNS) scripts/fuzz.sh $(FUZZ_SECONDS) $(FUZZ_TARGETS)

# Ends with one "N passed, N failed" line summed over every test binary.
test: lint wasm
	@mkdir -p .run
	set -o pipefail; $(CARGO) test --workspace 2>&1 | tee .run/test.log
	@awk '/^test result:/ {p += $$4; f += $$6} END {printf "%d passed, %d failed\n", p, f}' .run/test.log

clean:
	$(CARGO) clean
	rm -rf .venv .run
