//! `make run`'s tour of the guards (demo/src/tour.rs) through real Envoy with
//! the demo's own configuration (envoy/demo-plugin-config.json): what it
//! prints must be what happened.

use grpc_guard_demo::tour::guards;
use grpc_guard_tests::e2e::workspace_root;
use tonic::Code;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn make_run_shows_each_guard_doing_what_it_says() {
    let config = std::fs::read_to_string(workspace_root().join("envoy/demo-plugin-config.json")).unwrap();
    let upstream = Upstream::start().await;
    let envoy = start_envoy("tour", upstream.addr, config.trim()).unwrap();
    let channel = grpc_guard_demo::lazy_channel(&envoy.grpc_uri()).unwrap();
    let observed = upstream.observed.clone();
    let shown = guards(&channel, || observed.executions("Echo")).await;
    let by = |guard: &str| shown.iter().find(|s| s.guard == guard).unwrap_or_else(|| panic!("no {guard}: {shown:?}"));

    assert_eq!((by("deadline").code, by("deadline").executions), (Code::Ok, 1));
    assert!(matches!(by("late").code, Code::DeadlineExceeded | Code::Cancelled), "{:?}", by("late"));
    assert_eq!((by("size").code, by("size").executions), (Code::ResourceExhausted, 0), "refused before the service");
    let dedup = by("dedup");
    assert_eq!((dedup.code, dedup.executions, dedup.replayed), (Code::Ok, 1, true), "{dedup:?}");
    assert!(dedup.sentence.contains("ran it 1 time;") || dedup.sentence.ends_with("ran it 1 time"), "{dedup}");

    // The log lines back the sentences.
    let logs = call_logs(&envoy, 5).await;
    assert!(logs.iter().any(|l| l["deadline_source"] == "default" && l["deadline_ms"] == 5000), "{logs:?}");
    assert!(logs.iter().any(|l| l["late"] == true), "{logs:?}");
    assert!(logs.iter().any(|l| l["dedup"] == "replay"), "{logs:?}");
    let samples = parse_exposition(&envoy.prometheus().unwrap());
    assert_eq!(value(&samples, "grpc_server_late_responses_total", &[("grpc_method", "Echo")]), Some(1.0));
    assert_eq!(value(&samples, "grpc_server_request_too_large_total", &[("grpc_method", "Echo")]), Some(1.0));
}
