# Sourced by scripts/setup.sh: what the cost model's browser page and its
# headless-Chromium test need. Installs only what is missing.

# The browser test drives Debian's Chromium through chromedriver (W3C WebDriver).
apt_install chromium chromium-driver

# wasm-bindgen's CLI must be exactly the version of the `wasm-bindgen` crate in
# Cargo.lock: the JS glue it writes and the .wasm it reads share a schema that
# changes between releases.
cost_model_bindgen_version=$(awk '/^name = "wasm-bindgen"$/ {getline; gsub(/"/, "", $3); print $3; exit}' Cargo.lock)
if [ -z "$cost_model_bindgen_version" ]; then
  echo "setup: no wasm-bindgen in Cargo.lock" >&2
  return 1
fi
if [ "$(wasm-bindgen --version 2>/dev/null)" != "wasm-bindgen $cost_model_bindgen_version" ]; then
  echo "setup: cargo install wasm-bindgen-cli $cost_model_bindgen_version (a few minutes, once)"
  # Not --locked: its lockfile pins a webpki-roots release the registry no
  # longer serves; the crate's own semver ranges resolve fine.
  cargo install -j2 --quiet wasm-bindgen-cli --version "$cost_model_bindgen_version"
fi
unset cost_model_bindgen_version
