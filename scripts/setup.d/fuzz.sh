# Sourced by scripts/setup.sh: what `make fuzz` needs, and only when it asks
# for it (SETUP_FUZZ=1), so `make test` never builds cargo-fuzz. The fuzz
# targets build on a nightly toolchain (libFuzzer's coverage instrumentation
# takes nightly-only flags) with cargo-fuzz, installed once.
[ "${SETUP_FUZZ:-}" = 1 ] || return 0

if ! rustup toolchain list | grep -q '^nightly'; then
  echo "setup: rustup toolchain install nightly (for make fuzz)"
  rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "setup: cargo install cargo-fuzz (a few minutes, once)"
  cargo install -j2 --quiet --locked cargo-fuzz --version 0.13.2
fi
