//! Fuel (wasm instructions, deterministic) per call, so a change that makes
//! the common path much costlier is noticed. Timing belongs in `make bench`.

use crate::support::*;

/// Fuel for one default-config unary OK call (64-byte messages both ways),
/// measured on the release build: 27,449 with the first filter; 18,524 once
/// the log line was written by hand and the path map hashed with FNV (of
/// which about 6,500 is the log line and 3,500 the SDK's dispatch of seven
/// callbacks); 19,845 with deadline validation (one more header read).
const BASELINE_DEFAULT_CONFIG: u64 = 19_845;

/// The same call with `deadline.default` and `deadline.max` set, the client
/// sending no `grpc-timeout`: the default is formatted and written upstream.
const BASELINE_DEADLINE_POLICY: u64 = 23_099;

/// Fuel for the second of two identical unary calls (the first defines the
/// method's metrics and admits it into the shared method table).
fn fuel_per_unary_call(config: &str) -> u64 {
    let (_host, mut vm) = vm_with(config);
    unary(&mut vm, PATH, &[], 64, 64, 0);
    let before = vm.fuel_consumed();
    unary(&mut vm, PATH, &[], 64, 64, 0);
    vm.fuel_consumed() - before
}

#[test]
fn fuel_per_unary_call_is_reported_and_bounded() {
    for (config, baseline) in
        [("{}", BASELINE_DEFAULT_CONFIG), (r#"{"deadline":{"default":"10s","max":"60s"}}"#, BASELINE_DEADLINE_POLICY)]
    {
        let fuel = fuel_per_unary_call(config);
        eprintln!("fuel per unary call ({config}): {fuel}");
        assert!(
            fuel < 2 * baseline,
            "one unary call with {config} burnt {fuel} fuel, over twice the baseline {baseline}"
        );
    }
}
