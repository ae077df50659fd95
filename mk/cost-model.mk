# The cost model (cost-model/): its browser page. `make web` builds it and
# serves it on localhost; `make test` builds it first so the browser test finds
# it built (the test also builds it itself when run alone).
COST_WEB_DIR := $(CURDIR)/.run/cost-model/web
WEB_PORT ?= 8730

.PHONY: web cost-model-web cost-model-lint-wasm

cost-model-web: setup
	@cost-model/web/build.sh $(COST_WEB_DIR)
	@echo "cost model page: $(COST_WEB_DIR) (.wasm $$(stat -c %s $(COST_WEB_DIR)/grpc_guard_cost_model_bg.wasm) bytes, JS $$(cat $(COST_WEB_DIR)/*.js | wc -c) bytes)"

web: cost-model-web
	@echo "cost model: open http://127.0.0.1:$(WEB_PORT)/  (Ctrl-C stops it; another port: make web WEB_PORT=...)"
	@python3 -m http.server --bind 127.0.0.1 --directory $(COST_WEB_DIR) $(WEB_PORT)

test: cost-model-web

# The browser bindings (src/web.rs) compile only for wasm32: lint them there too.
cost-model-lint-wasm: setup
	CARGO_TARGET_DIR=$(CARGO_TARGET_DIR)/cost-model-web $(CARGO) clippy -p grpc-guard-cost-model --lib \
		--target wasm32-unknown-unknown -- -D warnings

lint: cost-model-lint-wasm
