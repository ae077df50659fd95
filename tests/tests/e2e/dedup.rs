//! Idempotency keys through real Envoy (two workers) with the tonic demo
//! service counting its executions: a retry runs upstream at most once and
//! gets the first call's answer.

use std::time::Duration;

use grpc_guard_demo::pb::{EchoReply, EchoRequest};
use tonic::metadata::MetadataValue;
use tonic::Code;

use crate::support::*;

const ECHO_DEDUP: &str = r#"{"dedup":{"methods":["grpcguard.demo.v1.Demo/Echo"]}}"#;

/// What one keyed Echo got: the reply (or code) and whether it was replayed.
#[derive(Debug, Clone, PartialEq)]
struct Got {
    result: Result<EchoReply, Code>,
    replayed: bool,
}

async fn keyed_echo(envoy: &grpc_guard_demo::envoy::Envoy, key: &str, request: EchoRequest, auth: Option<&str>) -> Got {
    let channel = grpc_guard_demo::lazy_channel(&envoy.grpc_uri()).unwrap();
    let mut client = grpc_guard_demo::client(channel);
    let mut request = tonic::Request::new(request);
    request.metadata_mut().insert("x-idempotency-key", MetadataValue::try_from(key).unwrap());
    if let Some(auth) = auth {
        request.metadata_mut().insert("authorization", MetadataValue::try_from(auth).unwrap());
    }
    match client.echo(request).await {
        Ok(response) => {
            let replayed = response.metadata().get("grpc-guard-replayed").is_some_and(|v| v == "true");
            Got { result: Ok(response.into_inner()), replayed }
        }
        Err(status) => Got {
            replayed: status.metadata().get("grpc-guard-replayed").is_some_and(|v| v == "true"),
            result: Err(status.code()),
        },
    }
}

fn order(n: u32) -> EchoRequest {
    EchoRequest { message: format!("create order {n}"), ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_duplicate_runs_once_and_gets_the_identical_answer_replayed() {
    let upstream = Upstream::start().await;
    let envoy = start_envoy("dedup-seq", upstream.addr, ECHO_DEDUP).unwrap();
    let first = keyed_echo(&envoy, "order-1", order(1), None).await;
    let second = keyed_echo(&envoy, "order-1", order(1), None).await;
    assert_eq!(upstream.observed.executions("Echo"), 1, "the retry must not run upstream");
    let reply = first.result.clone().expect("first call OK");
    assert_eq!(reply.execution, 1);
    assert_eq!(second.result, Ok(reply), "the retry gets the first call's exact answer");
    assert!(!first.replayed);
    assert!(second.replayed, "the retry is marked grpc-guard-replayed: true");

    let samples = parse_exposition(&envoy.prometheus().unwrap());
    assert_eq!(value(&samples, "grpc_server_dedup_first_total", &[("grpc_method", "Echo")]), Some(1.0));
    assert_eq!(value(&samples, "grpc_server_dedup_replayed_total", &[("grpc_method", "Echo")]), Some(1.0));
    let logs = call_logs(&envoy, 2).await;
    let outcomes: Vec<&str> = logs.iter().filter_map(|l| l["dedup"].as_str()).collect();
    assert_eq!(outcomes, ["first", "replay"]);
    assert!(logs.iter().all(|l| l["grpc_code"] == "OK"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_duplicates_run_once_and_each_gets_the_answer_or_aborted() {
    let upstream = Upstream::start().await;
    let envoy = start_envoy("dedup-concurrent", upstream.addr, ECHO_DEDUP).unwrap();
    let request = EchoRequest { message: "pay 10".into(), delay_ms: 300, ..Default::default() };
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let uri = envoy.grpc_uri();
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            let channel = grpc_guard_demo::lazy_channel(&uri).unwrap();
            let mut client = grpc_guard_demo::client(channel);
            let mut r = tonic::Request::new(request);
            r.metadata_mut().insert("x-idempotency-key", MetadataValue::from_static("pay-1"));
            client.echo(r).await.map(|r| r.into_inner()).map_err(|s| s.code())
        }));
    }
    let mut ok = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(reply) => {
                assert_eq!(reply.execution, 1, "every success is the one execution's answer");
                ok += 1;
            }
            Err(code) => assert_eq!(code, Code::Aborted),
        }
    }
    assert!(ok >= 1);
    assert_eq!(upstream.observed.executions("Echo"), 1, "32 concurrent duplicates, one execution");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_with_a_different_request_is_invalid_argument() {
    let upstream = Upstream::start().await;
    let envoy = start_envoy("dedup-mismatch", upstream.addr, ECHO_DEDUP).unwrap();
    assert!(keyed_echo(&envoy, "k", order(1), None).await.result.is_ok());
    assert_eq!(keyed_echo(&envoy, "k", order(2), None).await.result, Err(Code::InvalidArgument));
    assert_eq!(upstream.observed.executions("Echo"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failure_releases_the_key_and_the_retry_runs() {
    let upstream = Upstream::start().await;
    let envoy = start_envoy("dedup-transient", upstream.addr, ECHO_DEDUP).unwrap();
    let failing = EchoRequest { message: "x".into(), fail_code: Code::Unavailable as i32, ..Default::default() };
    assert_eq!(keyed_echo(&envoy, "k", failing.clone(), None).await.result, Err(Code::Unavailable));
    assert_eq!(keyed_echo(&envoy, "k", failing, None).await.result, Err(Code::Unavailable));
    assert_eq!(upstream.observed.executions("Echo"), 2, "UNAVAILABLE is not kept: the retry runs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deterministic_error_is_kept_and_replayed() {
    let upstream = Upstream::start().await;
    let envoy = start_envoy("dedup-error", upstream.addr, ECHO_DEDUP).unwrap();
    let missing = EchoRequest { message: "x".into(), fail_code: Code::NotFound as i32, ..Default::default() };
    let first = keyed_echo(&envoy, "k", missing.clone(), None).await;
    let second = keyed_echo(&envoy, "k", missing, None).await;
    assert_eq!((first.result, second.result), (Err(Code::NotFound), Err(Code::NotFound)));
    assert!(second.replayed);
    assert_eq!(upstream.observed.executions("Echo"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_with_the_same_key_each_run_and_never_see_the_others_answer() {
    let upstream = Upstream::start().await;
    let envoy = start_envoy("dedup-tenants", upstream.addr, ECHO_DEDUP).unwrap();
    let a = keyed_echo(&envoy, "same", order(1), Some("Bearer tenant-a")).await;
    let b = keyed_echo(&envoy, "same", order(1), Some("Bearer tenant-b")).await;
    assert_eq!(upstream.observed.executions("Echo"), 2);
    assert!(!b.replayed);
    assert_eq!(a.result.unwrap().execution, 1);
    assert_eq!(b.result.unwrap().execution, 2, "tenant b got its own execution, not a's answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_answer_expires_after_the_ttl_and_the_call_runs_again() {
    let upstream = Upstream::start().await;
    let config = r#"{"dedup":{"methods":["grpcguard.demo.v1.Demo/Echo"],"ttl":"2s"}}"#;
    let envoy = start_envoy("dedup-ttl", upstream.addr, config).unwrap();
    keyed_echo(&envoy, "k", order(1), None).await;
    assert!(keyed_echo(&envoy, "k", order(1), None).await.replayed);
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let after = keyed_echo(&envoy, "k", order(1), None).await;
    assert!(!after.replayed);
    assert_eq!(upstream.observed.executions("Echo"), 2);
}

async fn fill_table_and_try_a_third_key(when_full: &str) -> (Got, u64, f64) {
    let upstream = Upstream::start().await;
    let config = format!(
        r#"{{"dedup":{{"methods":["grpcguard.demo.v1.Demo/Echo"],"max_entries":2,"when_full":"{when_full}"}}}}"#
    );
    let envoy = start_envoy(&format!("dedup-full-{when_full}"), upstream.addr, &config).unwrap();
    let mut slow = Vec::new();
    for key in ["a", "b"] {
        let uri = envoy.grpc_uri();
        slow.push(tokio::spawn(async move {
            let channel = grpc_guard_demo::lazy_channel(&uri).unwrap();
            let mut client = grpc_guard_demo::client(channel);
            let mut r = tonic::Request::new(EchoRequest { message: key.into(), delay_ms: 1500, ..Default::default() });
            r.metadata_mut().insert("x-idempotency-key", MetadataValue::try_from(key).unwrap());
            client.echo(r).await.is_ok()
        }));
    }
    // Both slow calls hold their slots once the upstream has started them.
    while upstream.observed.executions("Echo") < 2 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let third = keyed_echo(&envoy, "c", order(3), None).await;
    for task in slow {
        assert!(task.await.unwrap());
    }
    let samples = parse_exposition(&envoy.prometheus().unwrap());
    let full = value(&samples, "grpc_server_dedup_full_total", &[("grpc_method", "Echo")]).unwrap_or(0.0);
    (third, upstream.observed.executions("Echo"), full)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_table_rejects_a_new_key_with_resource_exhausted_under_reject() {
    let (third, executions, full) = fill_table_and_try_a_third_key("reject").await;
    assert_eq!(third.result, Err(Code::ResourceExhausted));
    assert_eq!(executions, 2);
    assert_eq!(full, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_table_forwards_a_new_key_undeduplicated_under_forward() {
    let (third, executions, full) = fill_table_and_try_a_third_key("forward").await;
    assert!(third.result.is_ok());
    assert_eq!(executions, 3);
    assert_eq!(full, 1.0);
}
