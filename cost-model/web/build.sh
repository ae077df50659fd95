#!/usr/bin/env bash
# Builds the cost model's browser page into DIR (default: .run/cost-model/web):
# the library compiled to wasm32 as a cdylib, wasm-bindgen's JS glue, and the
# static files beside this script. Used by `make web` and by the browser test.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${1:-$root/.run/cost-model/web}
target=${CARGO_TARGET_DIR:-$HOME/.cache/grpc-guard/target}

if ! command -v wasm-bindgen >/dev/null; then
  echo "wasm-bindgen is not installed: run 'bash scripts/setup.sh' (or 'make setup')" >&2
  exit 1
fi
# Only the library, only for the page: the crate stays an rlib for everyone
# else. A target directory of its own, so that this build can run from inside
# `cargo test`, which holds the shared one.
# Not stripped by cargo: wasm-bindgen reads the `target_features` section, and
# removes the name and producers sections itself. Size over speed: opt-level z.
CARGO_TARGET_DIR="$target/cost-model-web" CARGO_PROFILE_RELEASE_STRIP=false CARGO_PROFILE_RELEASE_OPT_LEVEL=z \
  cargo rustc --quiet -j2 --manifest-path "$root/Cargo.toml" \
  -p grpc-guard-cost-model --lib --release --target wasm32-unknown-unknown --crate-type cdylib
mkdir -p "$out"
wasm-bindgen --target web --no-typescript --remove-name-section --remove-producers-section --out-dir "$out" \
  "$target/cost-model-web/wasm32-unknown-unknown/release/grpc_guard_cost_model.wasm"
cp "$here/index.html" "$here/app.js" "$here/style.css" "$out/"
