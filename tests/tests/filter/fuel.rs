//! Fuel (wasm instructions, deterministic) per call, so a change that makes
//! the common path much costlier is noticed. Timing belongs in `make bench`.

use crate::support::*;

/// Fuel for one default-config unary OK call (64-byte messages both ways),
/// measured on the release build: 27,449 with the first filter, 18,524 once
/// the log line was written by hand and the path map hashed with FNV (of
/// which about 6,500 is the log line and 3,500 the SDK's dispatch of seven
/// callbacks). The test fails at twice the current figure.
const BASELINE_FUEL_PER_UNARY_CALL: u64 = 18_524;

#[test]
fn fuel_per_unary_call_is_reported_and_bounded() {
    let (_host, mut vm) = vm_with("{}");
    // Warm-up: the first call of a method defines its metrics and admits it
    // into the shared method table; every later call reuses them.
    unary(&mut vm, PATH, &[], 64, 64, 0);
    let before = vm.fuel_consumed();
    unary(&mut vm, PATH, &[], 64, 64, 0);
    let fuel = vm.fuel_consumed() - before;
    eprintln!("fuel per unary call (default config): {fuel}");
    assert!(
        fuel < 2 * BASELINE_FUEL_PER_UNARY_CALL,
        "one unary call burnt {fuel} fuel, over twice the baseline {BASELINE_FUEL_PER_UNARY_CALL}"
    );
}
