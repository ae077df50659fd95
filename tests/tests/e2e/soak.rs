//! `make soak`, shortened: 40 s of the mix (errors, deadlines, keyed calls
//! with retries, cancels, streams) with the upstream restarted halfway. The
//! full run is 10 minutes (`make soak`).

use std::time::Duration;

use grpc_guard_tests::soak::{run, Options};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_soak_keeps_memory_flat_counts_every_call_once_and_runs_each_key_at_most_once() {
    let options = Options {
        duration: Duration::from_secs(40),
        rate: 60,
        envoy: envoy_binary(),
        wasm: wasm_path(),
        dir: scratch_dir("soak"),
    };
    let report = run(&options).await.unwrap();
    eprintln!("{}", report.table());
    assert!(report.keys > 50, "the mix sent keyed calls: {report:?}");
    assert!(report.sent.keys().any(|(_, code)| code == "Unavailable"), "the upstream restart was felt");
    assert!(report.sent.keys().any(|(_, code)| code == "Canceled"), "cancels were sent");
    assert!(report.sent.keys().any(|(_, code)| code == "DeadlineExceeded"), "deadlines were cut");
    assert_eq!(report.problems(), Vec::<String>::new());
}
