//! Sends a scenario's calls to a target and checks each status it got.
//!
//! Exit code 0 when every call got the status the scenario expects, 1 when
//! any differed, 2 for bad arguments.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use grpc_guard_demo::scenario::{self, Scenario};
use grpc_guard_demo::{lazy_channel, parse_duration};

/// Drive the grpc-guard demo service with a known traffic mix.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// gRPC endpoint to call: Envoy's listener, or the demo server itself.
    #[arg(long, default_value = "http://127.0.0.1:10000")]
    target: String,
    /// Which calls to make and which status each must get.
    #[arg(long, value_enum, default_value_t = Scenario::Mix)]
    scenario: Scenario,
    /// How many times to run the scenario.
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// Per-call deadline sent as grpc-timeout, e.g. 500ms or 2s; none by default.
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let channel = match lazy_channel(&args.target) {
        Ok(channel) => channel,
        Err(error) => {
            eprintln!("demo-client: {error}");
            return ExitCode::from(2);
        }
    };
    let mut total = 0usize;
    let mut unexpected = Vec::new();
    for _ in 0..args.repeat {
        for planned in args.scenario.calls() {
            let outcome = scenario::run(&channel, planned, args.timeout).await;
            println!("{outcome}");
            total += 1;
            if !outcome.is_expected() {
                unexpected.push(outcome);
            }
        }
    }
    if unexpected.is_empty() {
        println!("demo-client: all {total} calls got the expected status");
        return ExitCode::SUCCESS;
    }
    eprintln!("demo-client: {} of {total} calls got an unexpected status:", unexpected.len());
    for outcome in &unexpected {
        eprintln!("  {outcome}");
    }
    ExitCode::FAILURE
}
