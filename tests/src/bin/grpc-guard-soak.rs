//! `make soak`: see `grpc_guard_tests::soak`. Prints the figures and exits 1
//! if a promise broke.
//!
//!   grpc-guard-soak [--seconds N] [--rate CALLS_PER_SECOND]

use std::time::Duration;

use grpc_guard_tests::e2e::{envoy_binary, scratch_dir, wasm_path};
use grpc_guard_tests::soak::{run, Options};

fn main() {
    let mut seconds: u64 = 600;
    let mut rate: u32 = 100;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next();
        let parsed = match flag.as_str() {
            "--seconds" => value.as_deref().and_then(|v| v.parse().ok()).filter(|s| *s >= 12).map(|s| seconds = s),
            "--rate" => value.as_deref().and_then(|v| v.parse().ok()).filter(|r| *r >= 20).map(|r| rate = r),
            _ => {
                eprintln!("grpc-guard-soak: unknown flag {flag}; expected --seconds N (at least 12) or --rate R (calls per second, at least 20)");
                std::process::exit(2);
            }
        };
        if parsed.is_none() {
            eprintln!(
                "grpc-guard-soak: {flag} needs a whole number ({})",
                if flag == "--seconds" { "at least 12" } else { "at least 20" }
            );
            std::process::exit(2);
        }
    }
    let options = Options {
        duration: Duration::from_secs(seconds),
        rate,
        envoy: envoy_binary(),
        wasm: wasm_path(),
        dir: scratch_dir("soak"),
    };
    println!("soak: {seconds} s at {rate} calls/s through Envoy (2 workers), upstream restarted halfway");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime");
    let report = match runtime.block_on(run(&options)) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("grpc-guard-soak: {e}");
            std::process::exit(1);
        }
    };
    println!("{}", report.table());
    let problems = report.problems();
    for p in &problems {
        println!("FAILED: {p}");
    }
    if !problems.is_empty() {
        std::process::exit(1);
    }
    println!("soak passed");
}
