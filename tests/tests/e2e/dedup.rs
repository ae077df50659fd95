//! Idempotency keys through real Envoy (two workers) with the tonic demo
//! service counting its executions: a retry runs upstream at most once and
//! gets the first call's answer, however the first call ended, and no
//! caller can dress a call up, borrow another's answer or take the table.

use std::time::Duration;

use grpc_guard_demo::pb::{EchoReply, EchoRequest};
use grpc_guard_demo::ServeOptions;
use grpc_guard_tests::e2e::{keyed, CALLER};
use tonic::codec::CompressionEncoding;
use tonic::Code;

use crate::support::*;

/// Every OK call logged: the tests read the `dedup` field of each.
const ECHO_DEDUP: &str = r#"{"dedup":{"methods":["grpcguard.demo.v1.Demo/Echo"]},"log":{"ok_sample":1}}"#;
const ECHO_PATH: &str = "/grpcguard.demo.v1.Demo/Echo";

/// What one keyed Echo got: the reply (or status), whether it was replayed,
/// and the answer's `x-demo-execution`.
#[derive(Debug, Clone)]
struct Got {
    result: Result<EchoReply, tonic::Status>,
    replayed: bool,
    execution_header: Option<String>,
}

impl Got {
    fn code(&self) -> Code {
        self.result.as_ref().map_or_else(|s| s.code(), |_| Code::Ok)
    }
}

fn client(
    envoy: &grpc_guard_demo::envoy::Envoy,
) -> grpc_guard_demo::pb::demo_client::DemoClient<tonic::transport::Channel> {
    grpc_guard_demo::client(grpc_guard_demo::lazy_channel(&envoy.grpc_uri()).unwrap())
}

async fn send(
    client: &mut grpc_guard_demo::pb::demo_client::DemoClient<tonic::transport::Channel>,
    request: tonic::Request<EchoRequest>,
) -> Got {
    let header =
        |m: &tonic::metadata::MetadataMap, name: &str| m.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    match client.echo(request).await {
        Ok(response) => Got {
            replayed: header(response.metadata(), "grpc-guard-replayed").as_deref() == Some("true"),
            execution_header: header(response.metadata(), grpc_guard_demo::EXECUTION_HEADER),
            result: Ok(response.into_inner()),
        },
        Err(status) => Got {
            replayed: header(status.metadata(), "grpc-guard-replayed").as_deref() == Some("true"),
            execution_header: header(status.metadata(), grpc_guard_demo::EXECUTION_HEADER),
            result: Err(status),
        },
    }
}

/// A keyed Echo from `caller`.
async fn keyed_echo_from(envoy: &grpc_guard_demo::envoy::Envoy, key: &str, request: EchoRequest, caller: &str) -> Got {
    send(&mut client(envoy), keyed(request, key, caller)).await
}

async fn keyed_echo(envoy: &grpc_guard_demo::envoy::Envoy, key: &str, request: EchoRequest) -> Got {
    keyed_echo_from(envoy, key, request, CALLER).await
}

fn order(n: u32) -> EchoRequest {
    EchoRequest { message: format!("create order {n}"), ..Default::default() }
}

fn failing(code: Code) -> EchoRequest {
    EchoRequest { message: "x".into(), fail_code: code as i32, ..Default::default() }
}

/// A retry as the README's client policy makes it: again after ABORTED
/// ("in progress"), until the first call has settled.
async fn retry(envoy: &grpc_guard_demo::envoy::Envoy, key: &str, request: EchoRequest) -> Got {
    for _ in 0..40 {
        let got = keyed_echo(envoy, key, request.clone()).await;
        if got.code() != Code::Aborted {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the first call never settled")
}

/// The FAILED_PRECONDITION a retry gets when the first call may have run.
#[track_caller]
fn assert_told_it_may_have_run(got: &Got) {
    let status = got.result.as_ref().expect_err("the retry must not run or replay");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("may have run"), "{status:?}");
}

async fn counter(envoy: &grpc_guard_demo::envoy::Envoy, name: &str) -> f64 {
    let samples = parse_exposition(&envoy.prometheus().unwrap());
    value(&samples, name, &[("grpc_method", "Echo")]).unwrap_or(0.0)
}

async fn wait_for(mut done: impl FnMut() -> bool) {
    for _ in 0..200 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("condition not met in 4 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_duplicate_runs_once_and_gets_the_identical_answer_replayed() {
    let upstream = Upstream::start().await;
    let envoy = start_envoy("dedup-seq", upstream.addr, ECHO_DEDUP).unwrap();
    let first = keyed_echo(&envoy, "order-1", order(1)).await;
    let second = keyed_echo(&envoy, "order-1", order(1)).await;
    assert_eq!(upstream.observed.executions("Echo"), 1, "the retry must not run upstream");
    let reply = first.result.clone().expect("first call OK");
    assert_eq!(reply.execution, 1);
    assert_eq!(second.result.clone().unwrap(), reply, "the retry gets the first call's exact answer");
    assert!(!first.replayed);
    assert!(second.replayed, "the retry is marked grpc-guard-replayed: true");
    assert_eq!(second.execution_header.as_deref(), Some("1"), "the first answer's metadata is replayed too");

    let samples = parse_exposition(&envoy.prometheus().unwrap());
    assert_eq!(value(&samples, "grpc_server_dedup_first_total", &[("grpc_method", "Echo")]), Some(1.0));
    assert_eq!(value(&samples, "grpc_server_dedup_replayed_total", &[("grpc_method", "Echo")]), Some(1.0));
    let logs = call_logs(&envoy, 2).await;
    let outcomes: Vec<&str> = logs.iter().filter_map(|l| l["dedup"].as_str()).collect();
    assert_eq!(outcomes, ["first", "replay"]);
    assert!(logs.iter().all(|l| l["grpc_code"] == "OK"));
}

/// A config that names only the methods: the standard `Idempotency-Key`
/// header is read, bare or in the IETF draft's quoted (sf-string) form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standard_idempotency_key_header_bare_or_quoted_deduplicates_with_only_methods_configured() {
    let upstream = Upstream::start().await;
    let envoy =
        start_envoy("dedup-standard-header", upstream.addr, r#"{"dedup":{"methods":["grpcguard.demo.v1.Demo/Echo"]}}"#)
            .unwrap();
    let first = keyed_echo(&envoy, "order-q", order(7)).await;
    let quoted = keyed_echo(&envoy, "\"order-q\"", order(7)).await;
    assert_eq!(upstream.observed.executions("Echo"), 1, "the quoted retry must not run upstream");
    assert_eq!(first.code(), Code::Ok);
    assert!(quoted.replayed, "the quoted key is the same key: {quoted:?}");
    assert_eq!(quoted.result.unwrap(), first.result.unwrap());
    // A malformed quoted key is refused naming the header, never run.
    let bad = keyed_echo(&envoy, "\"order-q", order(7)).await;
    let status = bad.result.expect_err("a malformed quoted key is refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("idempotency-key") && status.message().contains("sf-string"), "{status:?}");
    assert_eq!(upstream.observed.executions("Echo"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_duplicates_run_once_and_each_gets_the_answer_or_aborted() {
    let upstream = Upstream::start().await;
    let envoy = start_envoy("dedup-concurrent", upstream.addr, ECHO_DEDUP).unwrap();
    let request = EchoRequest { message: "pay 10".into(), delay_ms: 300, ..Default::default() };
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let mut client = client(&envoy);
        let request = request.clone();
        tasks.push(tokio::spawn(async move { send(&mut client, keyed(request, "pay-1", CALLER)).await }));
    }
    let mut ok = 0;
    for task in tasks {
        let got = task.await.unwrap();
        match got.result {
            Ok(reply) => {
                assert_eq!(reply.execution, 1, "every success is the one execution's answer");
                ok += 1;
            }
            Err(status) => assert_eq!(status.code(), Code::Aborted),
        }
    }
    assert!(ok >= 1);
    assert_eq!(upstream.observed.executions("Echo"), 1, "32 concurrent duplicates, one execution");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_with_a_different_request_is_invalid_argument() {
    let upstream = Upstream::start().await;
    let envoy = start_envoy("dedup-mismatch", upstream.addr, ECHO_DEDUP).unwrap();
    assert!(keyed_echo(&envoy, "k", order(1)).await.result.is_ok());
    assert_eq!(keyed_echo(&envoy, "k", order(2)).await.code(), Code::InvalidArgument);
    assert_eq!(upstream.observed.executions("Echo"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_says_retry_frees_the_key_and_the_retry_runs() {
    let upstream = Upstream::start().await;
    let envoy = start_envoy("dedup-retryable", upstream.addr, ECHO_DEDUP).unwrap();
    for (n, code) in [Code::Unavailable, Code::ResourceExhausted, Code::Aborted].into_iter().enumerate() {
        let key = format!("k{n}");
        assert_eq!(keyed_echo(&envoy, &key, failing(code)).await.code(), code);
        assert_eq!(keyed_echo(&envoy, &key, failing(code)).await.code(), code, "{code:?}: the retry runs");
    }
    assert_eq!(upstream.observed.executions("Echo"), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_error_that_may_have_come_after_side_effects_keeps_the_key() {
    let upstream = Upstream::start().await;
    let envoy = start_envoy("dedup-internal", upstream.addr, ECHO_DEDUP).unwrap();
    for (n, code) in [Code::Internal, Code::Unknown, Code::DeadlineExceeded].into_iter().enumerate() {
        let key = format!("k{n}");
        assert_eq!(keyed_echo(&envoy, &key, failing(code)).await.code(), code);
        assert_told_it_may_have_run(&keyed_echo(&envoy, &key, failing(code)).await);
    }
    assert_eq!(upstream.observed.executions("Echo"), 3, "no retry ran");
    assert_eq!(counter(&envoy, "grpc_server_dedup_unknown_total").await, 3.0);
    let logs = call_logs(&envoy, 6).await;
    assert_eq!(logs.iter().filter(|l| l["dedup"] == "unknown").count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_cut_at_its_deadline_is_never_run_again_by_its_retry() {
    let upstream = Upstream::start().await;
    // The client allows 5 s; grpc-guard clamps the call to 500 ms and Envoy
    // cuts it there, while the upstream takes 1.5 s.
    let config = r#"{"deadline":{"max":"500ms"},"dedup":{"methods":["grpcguard.demo.v1.Demo/Echo"]}}"#;
    let envoy = start_envoy("dedup-deadline", upstream.addr, config).unwrap();
    let slow = EchoRequest { message: "charge 10".into(), delay_ms: 1500, ..Default::default() };
    let mut request = keyed(slow.clone(), "charge-1", CALLER);
    request.set_timeout(Duration::from_secs(5));
    let first = send(&mut client(&envoy), request).await;
    assert_eq!(first.code(), Code::DeadlineExceeded, "{first:?}");
    // Right away, while the first call may still run upstream...
    assert_told_it_may_have_run(&retry(&envoy, "charge-1", slow.clone()).await);
    // ...and once it would have finished there (Envoy reset it; a server
    // that ignores the reset would have finished by now).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_told_it_may_have_run(&retry(&envoy, "charge-1", slow).await);
    assert_eq!(upstream.observed.executions("Echo"), 1, "the charge ran once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_the_client_cancelled_after_it_went_upstream_is_never_run_again() {
    let upstream = Upstream::start().await;
    let envoy = start_envoy("dedup-cancel", upstream.addr, ECHO_DEDUP).unwrap();
    let slow = EchoRequest { message: "charge 10".into(), delay_ms: 1000, ..Default::default() };
    let mut c = client(&envoy);
    let call = send(&mut c, keyed(slow.clone(), "charge-1", CALLER));
    // The client gives up (drops the call: RST_STREAM CANCEL) once the
    // upstream has it.
    tokio::select! {
        _ = call => panic!("the slow call answered before the cancel"),
        _ = wait_for(|| upstream.observed.executions("Echo") == 1) => {}
    }
    assert_told_it_may_have_run(&retry(&envoy, "charge-1", slow.clone()).await);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_told_it_may_have_run(&retry(&envoy, "charge-1", slow).await);
    assert_eq!(upstream.observed.executions("Echo"), 1);
    let logs = call_logs(&envoy, 3).await;
    assert!(logs.iter().any(|l| l["grpc_code"] == "Canceled" && l["dedup"] == "first"), "{logs:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_reset_by_the_upstream_mid_call_is_never_run_again() {
    let (addr, requests) = start_resetting_upstream().await;
    let envoy = start_envoy("dedup-reset", addr, ECHO_DEDUP).unwrap();
    let first = keyed_echo(&envoy, "k", order(1)).await;
    assert_ne!(first.code(), Code::Ok, "{first:?}");
    assert_told_it_may_have_run(&retry(&envoy, "k", order(1)).await);
    assert_eq!(requests.load(std::sync::atomic::Ordering::SeqCst), 1, "the upstream saw the call once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_never_reached_an_upstream_frees_its_key() {
    let upstream = Upstream::start().await;
    let envoy = start_envoy("dedup-down", upstream.addr, ECHO_DEDUP).unwrap();
    // The demo route for this header leads to a port where nothing listens.
    let mut request = keyed(order(1), "k", CALLER);
    request.metadata_mut().insert("x-grpc-guard-demo", "upstream-down".parse().unwrap());
    assert_eq!(send(&mut client(&envoy), request).await.code(), Code::Unavailable);
    let retry = keyed_echo(&envoy, "k", order(1)).await;
    assert_eq!(retry.result.unwrap().execution, 1, "the retry ran, once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_error_is_replayed_with_its_status_details_and_metadata() {
    let upstream = Upstream::start().await;
    let envoy = start_envoy("dedup-error", upstream.addr, ECHO_DEDUP).unwrap();
    let first = keyed_echo(&envoy, "k", failing(Code::NotFound)).await;
    let second = keyed_echo(&envoy, "k", failing(Code::NotFound)).await;
    assert_eq!((first.code(), second.code()), (Code::NotFound, Code::NotFound));
    assert!(second.replayed);
    let (a, b) = (first.result.unwrap_err(), second.result.unwrap_err());
    assert_eq!(b.message(), a.message());
    assert_eq!(b.details(), b"demo details: NotFound", "grpc-status-details-bin is kept");
    assert_eq!(second.execution_header.as_deref(), Some("1"));
    assert_eq!(upstream.observed.executions("Echo"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_answer_is_replayed_and_decodes() {
    let upstream = Upstream::start_with(ServeOptions { gzip: true }).await;
    let envoy = start_envoy("dedup-gzip", upstream.addr, ECHO_DEDUP).unwrap();
    let mut c = client(&envoy).accept_compressed(CompressionEncoding::Gzip);
    let big = EchoRequest { message: "compress me ".repeat(50), ..Default::default() };
    let first = send(&mut c, keyed(big.clone(), "gz", CALLER)).await;
    let second = send(&mut c, keyed(big, "gz", CALLER)).await;
    let reply = first.result.expect("first call OK");
    assert!(second.replayed, "{second:?}");
    assert_eq!(second.result.expect("the replay decodes"), reply);
    assert_eq!(upstream.observed.executions("Echo"), 1);
    let logs = call_logs(&envoy, 2).await;
    assert_eq!(logs[1]["dedup"], "replay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_with_more_metadata_than_kept_is_not_replayed_and_never_run_again() {
    let upstream = Upstream::start().await;
    let config = r#"{"dedup":{"methods":["grpcguard.demo.v1.Demo/Echo"],"max_metadata_bytes":40}}"#;
    let envoy = start_envoy("dedup-metadata", upstream.addr, config).unwrap();
    assert!(keyed_echo(&envoy, "k", order(1)).await.result.is_ok());
    let retry = keyed_echo(&envoy, "k", order(1)).await;
    assert_eq!(retry.code(), Code::AlreadyExists, "{retry:?}");
    assert_eq!(upstream.observed.executions("Echo"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_with_the_same_key_each_run_and_never_see_the_others_answer() {
    let upstream = Upstream::start().await;
    let envoy = start_envoy("dedup-tenants", upstream.addr, ECHO_DEDUP).unwrap();
    let a = keyed_echo_from(&envoy, "same", order(1), "Bearer tenant-a").await;
    let b = keyed_echo_from(&envoy, "same", order(1), "Bearer tenant-b").await;
    assert_eq!(upstream.observed.executions("Echo"), 2);
    assert!(!b.replayed);
    assert_eq!(a.result.unwrap().execution, 1);
    assert_eq!(b.result.unwrap().execution, 2, "tenant b got its own execution, not a's answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_call_from_nobody_is_refused_unless_forwarding_is_configured() {
    let upstream = Upstream::start().await;
    let envoy = start_envoy("dedup-anonymous", upstream.addr, ECHO_DEDUP).unwrap();
    let mut anonymous = tonic::Request::new(order(1));
    anonymous.metadata_mut().insert("idempotency-key", "k".parse().unwrap());
    let got = send(&mut client(&envoy), anonymous).await;
    assert_eq!(got.code(), Code::Unauthenticated, "{got:?}");
    assert_eq!(upstream.observed.executions("Echo"), 0);
    assert_eq!(counter(&envoy, "grpc_server_dedup_anonymous_total").await, 1.0);

    let forward =
        r#"{"dedup":{"methods":["grpcguard.demo.v1.Demo/Echo"],"anonymous":"forward"},"log":{"ok_sample":1}}"#;
    let envoy = start_envoy("dedup-anonymous-forward", upstream.addr, forward).unwrap();
    for _ in 0..2 {
        let mut anonymous = tonic::Request::new(order(1));
        anonymous.metadata_mut().insert("idempotency-key", "k".parse().unwrap());
        assert!(send(&mut client(&envoy), anonymous).await.result.is_ok());
    }
    assert_eq!(upstream.observed.executions("Echo"), 2, "forwarded undeduplicated");
    assert_eq!(call_logs(&envoy, 2).await[1]["dedup"], "anonymous");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scope_that_identifies_nobody_stops_the_plugin_naming_the_field() {
    let upstream = Upstream::start().await;
    let config = r#"{"dedup":{"methods":["grpcguard.demo.v1.Demo/Echo"],"scope":[":authority"]}}"#;
    let Err(grpc_guard_demo::envoy::EnvoyError::Exited { log_tail, .. }) =
        start_envoy("dedup-noscope", upstream.addr, config)
    else {
        panic!("Envoy must refuse a scope without a caller identity")
    };
    assert!(log_tail.contains("dedup.scope: names no caller identity"), "{log_tail}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_over_the_memory_cap_stops_the_plugin_naming_the_field() {
    let upstream = Upstream::start().await;
    let config = r#"{"dedup":{"methods":["grpcguard.demo.v1.Demo/Echo"],"max_entries":100000}}"#;
    let Err(grpc_guard_demo::envoy::EnvoyError::Exited { log_tail, .. }) =
        start_envoy("dedup-cap", upstream.addr, config)
    else {
        panic!("Envoy must refuse a table whose worst case is over the cap")
    };
    assert!(log_tail.contains("dedup.max_entries: 100000 entries"), "{log_tail}");
}

/// HS256 test key of the JWT provider below, and the tokens it signs.
const JWT_SECRET: &[u8] = b"grpc-guard e2e shared secret, 32+";

/// Envoy's jwt_authn in front of grpc-guard: the verified payload goes to
/// dynamic metadata (`payload`) and, as under Istio by default, the token
/// itself is removed from the request.
fn jwt_filter() -> String {
    format!(
        r#"          - name: envoy.filters.http.jwt_authn
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication
              providers:
                e2e:
                  issuer: grpc-guard-e2e
                  local_jwks:
                    inline_string: '{{"keys":[{{"kty":"oct","alg":"HS256","k":"{}"}}]}}'
                  payload_in_metadata: payload
                  forward: false
              rules:
              - match: {{ prefix: "/" }}
                requires: {{ provider_name: e2e }}
"#,
        base64url(JWT_SECRET)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_verified_jwt_subject_keeps_keys_apart_for_users_behind_one_gateway() {
    let upstream = Upstream::start().await;
    let config = r#"{"dedup":{"methods":["grpcguard.demo.v1.Demo/Echo"],
        "scope":["source.principal","metadata:envoy.filters.http.jwt_authn/payload/sub","header:authorization"]}}"#;
    let envoy = start_envoy_with("dedup-jwt", upstream.addr, &config.replace('\n', " "), &jwt_filter()).unwrap();
    let bearer = |sub: &str| format!("Bearer {}", hs256_jwt(JWT_SECRET, "grpc-guard-e2e", sub));
    let alice = keyed_echo_from(&envoy, "same", order(1), &bearer("alice")).await;
    let bob = keyed_echo_from(&envoy, "same", order(1), &bearer("bob")).await;
    let alice_again = keyed_echo_from(&envoy, "same", order(1), &bearer("alice")).await;
    assert_eq!(alice.result.clone().unwrap().execution, 1);
    assert_eq!(bob.result.unwrap().execution, 2, "bob's key is not alice's");
    assert!(alice_again.replayed, "alice's retry is a retry: {alice_again:?}");
    assert_eq!(alice_again.result.unwrap(), alice.result.unwrap());
    assert_eq!(upstream.observed.executions("Echo"), 2);
    assert_eq!(upstream.observed.last_metadata("authorization"), None, "the token never reached the service");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scope_part_naming_a_struct_identifies_nobody_and_the_call_is_refused() {
    // `payload` is the whole verified JWT, a struct: Envoy hands it over
    // serialized, in no stable form. Counted as absent, it leaves the
    // caller anonymous, refused by default, rather than keyed by bytes
    // that change from call to call.
    let upstream = Upstream::start().await;
    let config = r#"{"dedup":{"methods":["grpcguard.demo.v1.Demo/Echo"],
        "scope":["metadata:envoy.filters.http.jwt_authn/payload"]}}"#;
    let envoy = start_envoy_with("dedup-jwt-struct", upstream.addr, &config.replace('\n', " "), &jwt_filter()).unwrap();
    let bearer = format!("Bearer {}", hs256_jwt(JWT_SECRET, "grpc-guard-e2e", "alice"));
    let got = keyed_echo_from(&envoy, "struct", order(1), &bearer).await;
    let status = got.result.expect_err("refused");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("needs a caller identity"), "{status:?}");
    assert_eq!(upstream.observed.executions("Echo"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_client_can_reach_the_replay_hop_whatever_the_configuration() {
    let upstream = Upstream::start().await;
    for (n, config) in ["{}", ECHO_DEDUP].into_iter().enumerate() {
        let envoy = start_envoy(&format!("dedup-mark-{n}"), upstream.addr, config).unwrap();
        let mut request = keyed(order(1), &format!("fresh-{n}"), CALLER);
        request.metadata_mut().insert("x-grpc-guard-replay", "1".parse().unwrap());
        let got = send(&mut client(&envoy), request).await;
        assert!(!got.replayed);
        assert_eq!(got.result.expect("the call runs").execution, n as u64 + 1, "{config}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_call_dressed_as_another_content_type_is_refused_before_the_service_runs_it() {
    use prost::Message as _;
    let upstream = Upstream::start().await;
    let config = r#"{"limits":{"max_request_message_bytes":1024},"dedup":{"methods":["grpcguard.demo.v1.Demo/Echo"],"require_key":true}}"#;
    let envoy = start_envoy("dedup-disguise", upstream.addr, config).unwrap();
    let message = EchoRequest { message: "x".repeat(4096), ..Default::default() }.encode_to_vec();
    let body = grpc_frame(&message);
    for content_type in ["application/x-grpc-disguised", "application/json", "text/plain"] {
        let answer = h2_post(envoy.params().listen_addr(), ECHO_PATH, &[("content-type", content_type)], &body).await;
        assert_eq!(answer.status, 415, "{content_type}: {answer:?}");
        assert_eq!(answer.header("grpc-status").as_deref(), Some("13"));
    }
    // A query string does not hide the method from its guards either.
    let path = format!("{ECHO_PATH}?via=query");
    let keyless = h2_post(
        envoy.params().listen_addr(),
        &path,
        &[("content-type", "application/grpc"), ("te", "trailers")],
        &body,
    )
    .await;
    assert_eq!(keyless.grpc_status().as_deref(), Some("3"), "require_key holds: {keyless:?}");
    let keyed_big = h2_post(
        envoy.params().listen_addr(),
        &path,
        &[
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("idempotency-key", "k"),
            ("authorization", CALLER),
        ],
        &body,
    )
    .await;
    assert_eq!(keyed_big.grpc_status().as_deref(), Some("8"), "the size limit holds: {keyed_big:?}");
    assert_eq!(upstream.observed.executions("Echo"), 0, "the service never ran it");
    let samples = parse_exposition(&envoy.prometheus().unwrap());
    assert_eq!(value(&samples, "grpc_guard_non_grpc_refused_total", &[]), Some(3.0));
    // Anything else still passes byte for byte.
    let other = h2_post(envoy.params().listen_addr(), "/healthz", &[("content-type", "text/plain")], b"ping").await;
    assert_ne!(other.status, 415);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_caller_cannot_take_the_table_from_the_others() {
    let upstream = Upstream::start().await;
    // 64 entries in eight buckets; a caller holds at most 2 of a bucket's 8.
    let config = r#"{"dedup":{"methods":["grpcguard.demo.v1.Demo/Echo"],"max_entries":64}}"#;
    let envoy = start_envoy("dedup-share", upstream.addr, config).unwrap();
    // The greedy caller holds 64 slow keyed calls open at once...
    let mut held = Vec::new();
    for n in 0..64 {
        let mut c = client(&envoy);
        let slow = EchoRequest { message: format!("hold {n}"), delay_ms: 3000, ..Default::default() };
        held.push(tokio::spawn(async move { send(&mut c, keyed(slow, &format!("hold-{n}"), "Bearer greedy")).await }));
    }
    wait_for(|| upstream.observed.executions("Echo") >= 8).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ...and floods kept errors under new keys.
    let mut refused = 0;
    for n in 0..64 {
        let got = keyed_echo_from(&envoy, &format!("bad-{n}"), failing(Code::InvalidArgument), "Bearer greedy").await;
        refused += u32::from(got.code() == Code::ResourceExhausted);
    }
    // Eight other callers still get their keys.
    for caller in 0..8 {
        for n in 0..2 {
            let got = keyed_echo_from(&envoy, &format!("mine-{n}"), order(n), &format!("Bearer caller-{caller}")).await;
            assert!(got.result.is_ok(), "caller {caller}, call {n}: {got:?}");
        }
    }
    let mut greedy_ran = 0;
    for task in held {
        let got = task.await.unwrap();
        match got.code() {
            Code::Ok => greedy_ran += 1,
            code => assert_eq!(code, Code::ResourceExhausted, "{got:?}"),
        }
    }
    let greedy_kept = 64 - refused;
    eprintln!("the greedy caller held {greedy_ran} open calls and {greedy_kept} kept errors of a 64-entry table");
    assert!(greedy_ran + greedy_kept <= 16, "one caller holds at most a quarter: {greedy_ran} + {greedy_kept}");
    let samples = parse_exposition(&envoy.prometheus().unwrap());
    let caller_full = value(&samples, "grpc_server_dedup_caller_full_total", &[("grpc_method", "Echo")]).unwrap_or(0.0);
    assert_eq!(caller_full, f64::from(128 - greedy_ran - greedy_kept));
}

async fn fill_table_and_try_another_key(when_full: &str) -> (Got, u64, f64) {
    let upstream = Upstream::start().await;
    let config = format!(
        r#"{{"dedup":{{"methods":["grpcguard.demo.v1.Demo/Echo"],"max_entries":8,"caller_share":1,"when_full":"{when_full}"}}}}"#
    );
    let envoy = start_envoy(&format!("dedup-full-{when_full}"), upstream.addr, &config).unwrap();
    let mut slow = Vec::new();
    for n in 0..8 {
        let mut c = client(&envoy);
        let request = EchoRequest { message: format!("slow {n}"), delay_ms: 1500, ..Default::default() };
        slow.push(tokio::spawn(async move { send(&mut c, keyed(request, &format!("slow-{n}"), CALLER)).await }));
    }
    // The slow calls hold every way once the upstream has started them.
    wait_for(|| upstream.observed.executions("Echo") == 8).await;
    let other = keyed_echo(&envoy, "other", order(3)).await;
    for task in slow {
        assert!(task.await.unwrap().result.is_ok());
    }
    (other, upstream.observed.executions("Echo"), counter(&envoy, "grpc_server_dedup_full_total").await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_table_rejects_a_new_key_with_resource_exhausted_under_reject() {
    let (other, executions, full) = fill_table_and_try_another_key("reject").await;
    assert_eq!(other.code(), Code::ResourceExhausted);
    assert_eq!(executions, 8);
    assert_eq!(full, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_table_forwards_a_new_key_undeduplicated_under_forward() {
    let (other, executions, full) = fill_table_and_try_another_key("forward").await;
    assert!(other.result.is_ok());
    assert_eq!(executions, 9);
    assert_eq!(full, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_answer_expires_after_the_ttl_and_the_call_runs_again() {
    let upstream = Upstream::start().await;
    let config = r#"{"dedup":{"methods":["grpcguard.demo.v1.Demo/Echo"],"ttl":"2s"}}"#;
    let envoy = start_envoy("dedup-ttl", upstream.addr, config).unwrap();
    keyed_echo(&envoy, "k", order(1)).await;
    assert!(keyed_echo(&envoy, "k", order(1)).await.replayed);
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let after = keyed_echo(&envoy, "k", order(1)).await;
    assert!(!after.replayed);
    assert_eq!(upstream.observed.executions("Echo"), 2);
}

// ------------------------------------------- AIP-155: the key in the message

/// Echo takes its key from `request_id` (field 5), as an AIP-155 API does;
/// the calls carry no idempotency header.
const ECHO_KEY_FIELD: &str = r#"{"dedup":{"methods":["grpcguard.demo.v1.Demo/Echo"],
    "key_fields":{"grpcguard.demo.v1.Demo/Echo":5}},"log":{"ok_sample":1}}"#;

fn with_request_id(request_id: &str, message: &str) -> EchoRequest {
    EchoRequest { message: message.into(), request_id: request_id.into(), ..Default::default() }
}

/// A call from the tests' caller with no idempotency header.
fn unkeyed(message: EchoRequest) -> tonic::Request<EchoRequest> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", CALLER.parse().unwrap());
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aip155_request_id_deduplicates_calls_that_carry_no_header() {
    let upstream = Upstream::start().await;
    let envoy = start_envoy("dedup-key-field", upstream.addr, ECHO_KEY_FIELD).unwrap();
    let first = send(&mut client(&envoy), unkeyed(with_request_id("r-1", "pay 10"))).await;
    let retry = send(&mut client(&envoy), unkeyed(with_request_id("r-1", "pay 10"))).await;
    assert_eq!(upstream.observed.executions("Echo"), 1, "the retry must not run upstream");
    assert_eq!(first.result.as_ref().unwrap().execution, 1);
    assert!(retry.replayed, "{retry:?}");
    assert_eq!(retry.result.unwrap(), first.result.unwrap(), "the first call's exact answer");
    // The key does not cover the rest of the message: reusing it for another
    // request is refused, never run.
    let reuse = send(&mut client(&envoy), unkeyed(with_request_id("r-1", "pay 99"))).await;
    assert_eq!(reuse.code(), Code::InvalidArgument, "{reuse:?}");
    // Another id runs; a message without one runs undeduplicated, each time.
    assert!(send(&mut client(&envoy), unkeyed(with_request_id("r-2", "pay 10"))).await.result.is_ok());
    for _ in 0..2 {
        assert!(send(&mut client(&envoy), unkeyed(with_request_id("", "read"))).await.result.is_ok());
    }
    assert_eq!(upstream.observed.executions("Echo"), 4);
    let logs = call_logs(&envoy, 6).await;
    let outcomes: Vec<&str> = logs.iter().filter_map(|l| l["dedup"].as_str()).collect();
    assert_eq!(outcomes, ["first", "replay", "mismatch", "first", "none", "none"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_duplicates_by_request_id_run_once() {
    let upstream = Upstream::start().await;
    let envoy = start_envoy("dedup-key-field-concurrent", upstream.addr, ECHO_KEY_FIELD).unwrap();
    let request = EchoRequest { delay_ms: 300, ..with_request_id("pay-32", "pay 10") };
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let mut client = client(&envoy);
        let request = request.clone();
        tasks.push(tokio::spawn(async move { send(&mut client, unkeyed(request)).await }));
    }
    for task in tasks {
        let got = task.await.unwrap();
        match got.result {
            Ok(reply) => assert_eq!(reply.execution, 1),
            Err(status) => assert_eq!(status.code(), Code::Aborted, "{status:?}"),
        }
    }
    assert_eq!(upstream.observed.executions("Echo"), 1, "32 concurrent duplicates, one execution");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_request_hides_its_request_id_and_is_refused_unless_a_header_carries_the_key() {
    let upstream = Upstream::start().await;
    let envoy = start_envoy("dedup-key-field-gzip", upstream.addr, ECHO_KEY_FIELD).unwrap();
    let mut gzip = client(&envoy).send_compressed(CompressionEncoding::Gzip);
    let got = send(&mut gzip, unkeyed(with_request_id("z-1", "pay 10"))).await;
    let status = got.result.expect_err("refused");
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    assert!(status.message().contains("compressed"), "{status:?}");
    assert_eq!(status.metadata().get("grpc-accept-encoding").and_then(|v| v.to_str().ok()), Some("identity"));
    assert_eq!(upstream.observed.executions("Echo"), 0, "never run undeduplicated");
    // With the key in the header as well, the compressed call is deduplicated.
    let first = send(&mut gzip, keyed(with_request_id("z-1", "pay 10"), "z-1", CALLER)).await;
    let retry = send(&mut gzip, keyed(with_request_id("z-1", "pay 10"), "z-1", CALLER)).await;
    assert!(first.result.is_ok() && retry.replayed, "{first:?} {retry:?}");
    assert_eq!(upstream.observed.executions("Echo"), 1);
    let samples = parse_exposition(&envoy.prometheus().unwrap());
    assert_eq!(value(&samples, "grpc_server_refused_total", &[("grpc_method", "Echo")]), Some(1.0));
}

/// Loaded without `allow_on_headers_stop_iteration` (as Istio's WasmPlugin
/// loads a plugin), Envoy holds the body with the headers: a call to a
/// key-field method waits until its client gives up and never runs
/// unguarded. (The client's deadline ends it: its own timer, a cancel, or
/// Envoy's max_stream_duration, whichever comes first.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_envoys_hold_setting_a_key_field_call_times_out_and_never_runs() {
    let upstream = Upstream::start().await;
    let mut params =
        grpc_guard_demo::envoy::EnvoyParams::on_free_ports(upstream.addr, wasm_path(), ECHO_KEY_FIELD).unwrap();
    params.hold_headers = false;
    let envoy =
        grpc_guard_demo::envoy::Envoy::start(&envoy_binary(), params, CONCURRENCY, &scratch_dir("dedup-no-hold"))
            .unwrap();
    let mut request = unkeyed(with_request_id("h-1", "pay 10"));
    request.set_timeout(Duration::from_millis(800));
    let got = send(&mut client(&envoy), request).await;
    assert!(matches!(got.code(), Code::DeadlineExceeded | Code::Cancelled), "{got:?}");
    assert_eq!(upstream.observed.executions("Echo"), 0);
    // Methods without a key field are not held.
    let count = grpc_guard_demo::pb::CountRequest { count: 2, ..Default::default() };
    let mut stream = client(&envoy).count(count).await.expect("Count is served").into_inner();
    let mut replies = 0;
    while stream.message().await.expect("Count streams").is_some() {
        replies += 1;
    }
    assert_eq!(replies, 2);
}

/// A request message whose first frame is `message`, framed.
fn framed(message: &EchoRequest) -> Vec<u8> {
    grpc_frame(&prost::Message::encode_to_vec(message))
}

const KEY_FIELD_HEADERS: [(&str, &str); 3] =
    [("content-type", "application/grpc"), ("te", "trailers"), ("authorization", CALLER)];

/// A key-field method with no size limit is held for at most 1 MiB: a
/// larger message is refused from its prefix, never buffered or run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_field_message_too_large_to_hold_is_refused_from_its_prefix() {
    let upstream = Upstream::start().await;
    let envoy = start_envoy("dedup-key-field-huge", upstream.addr, ECHO_KEY_FIELD).unwrap();
    let listen = envoy.params().listen_addr();
    let mut prefix = vec![0u8];
    prefix.extend_from_slice(&(16u32 << 20).to_be_bytes());
    let stream = h2_stream(listen, None, ECHO_PATH, &KEY_FIELD_HEADERS, vec![data(prefix)], false).await;
    let answer = tokio::time::timeout(Duration::from_secs(5), stream.answer).await.unwrap().unwrap().unwrap();
    assert_eq!(answer.grpc_status().as_deref(), Some("8"), "RESOURCE_EXHAUSTED: {answer:?}");
    assert!(answer.header("grpc-message").unwrap_or_default().contains("max_request_message_bytes"), "{answer:?}");
    assert_eq!(upstream.observed.executions("Echo"), 0);
}

/// The hold counts against the deadline: a message that takes longer than
/// the call's deadline to come in is answered DEADLINE_EXCEEDED and never
/// claimed or run (grpc-guard's own check for a deadline it injected; Envoy
/// cuts a client's own `grpc-timeout` itself); the same request sent in time
/// runs, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_field_call_held_past_its_deadline_never_runs_and_leaves_its_key_free() {
    let upstream = Upstream::start().await;
    let config = r#"{"deadline":{"default":"500ms"},"dedup":{"methods":["grpcguard.demo.v1.Demo/Echo"],
        "key_fields":{"grpcguard.demo.v1.Demo/Echo":5}},"log":{"ok_sample":1}}"#;
    let envoy = start_envoy("dedup-key-field-slow", upstream.addr, config).unwrap();
    let listen = envoy.params().listen_addr();
    let request = framed(&with_request_id("slow-1", "pay 10"));
    for client_timeout in [None, Some("500m")] {
        let mut headers = KEY_FIELD_HEADERS.to_vec();
        headers.extend(client_timeout.map(|t| ("grpc-timeout", t)));
        let first_bytes = vec![data(request[..8].to_vec())];
        let stream = h2_stream(listen, None, ECHO_PATH, &headers, first_bytes, false).await;
        tokio::time::sleep(Duration::from_millis(800)).await;
        let open = stream.open.expect("still open");
        // Envoy may have ended the stream already (the client's own timeout).
        let _ = open.send(data(request[8..].to_vec()));
        drop(open);
        let answer = tokio::time::timeout(Duration::from_secs(5), stream.answer).await.unwrap().unwrap().unwrap();
        assert_eq!(answer.grpc_status().as_deref(), Some("4"), "DEADLINE_EXCEEDED ({client_timeout:?}): {answer:?}");
        assert_eq!(upstream.observed.executions("Echo"), 0, "held past its deadline: never run");
    }
    let first = send(&mut client(&envoy), unkeyed(with_request_id("slow-1", "pay 10"))).await;
    let retry = send(&mut client(&envoy), unkeyed(with_request_id("slow-1", "pay 10"))).await;
    assert_eq!(first.code(), Code::Ok, "the key was never claimed: {first:?}");
    assert!(retry.replayed);
    assert_eq!(upstream.observed.executions("Echo"), 1);
}

/// A message sent a byte at a time is held without copying the buffer at
/// each byte: another call on the same Envoy is served meanwhile, and the
/// held one runs once it is whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_field_message_sent_a_byte_at_a_time_is_held_cheaply() {
    let upstream = Upstream::start().await;
    let envoy = start_envoy("dedup-key-field-drip", upstream.addr, ECHO_KEY_FIELD).unwrap();
    let listen = envoy.params().listen_addr();
    let request = framed(&EchoRequest { reply_padding: 0, ..with_request_id("drip-1", &"x".repeat(64 * 1024)) });
    let stream = h2_stream(listen, None, ECHO_PATH, &KEY_FIELD_HEADERS, Vec::new(), false).await;
    let open = stream.open.expect("open");
    let started = std::time::Instant::now();
    for byte in &request {
        open.send(data(vec![*byte])).unwrap();
    }
    drop(open);
    let answer = tokio::time::timeout(Duration::from_secs(30), stream.answer).await.unwrap().unwrap().unwrap();
    assert_eq!(answer.grpc_status().as_deref(), Some("0"), "{answer:?}");
    assert_eq!(upstream.observed.executions("Echo"), 1);
    let other = send(&mut client(&envoy), unkeyed(with_request_id("", "meanwhile"))).await;
    assert_eq!(other.code(), Code::Ok);
    eprintln!("64 KiB in 1-byte DATA frames held and sent on in {:?}", started.elapsed());
}

/// A client that resets a key-field call while it is held (its message not
/// yet whole) ran nothing and claimed nothing: the same request later runs,
/// once, and its retry is replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_field_call_the_client_resets_while_held_claims_nothing() {
    let upstream = Upstream::start().await;
    let envoy = start_envoy("dedup-key-field-reset", upstream.addr, ECHO_KEY_FIELD).unwrap();
    let listen = envoy.params().listen_addr();
    let request = framed(&with_request_id("reset-1", "pay 10"));
    let stream = h2_stream(listen, None, ECHO_PATH, &KEY_FIELD_HEADERS, vec![data(request[..8].to_vec())], false).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The client gives up on the call (hyper resets the stream when its
    // response future is dropped); the body is left open, so the stream
    // ends by the reset, not by an end of stream.
    let _open = stream.open;
    stream.answer.abort();
    let logs = call_logs(&envoy, 1).await;
    assert_eq!(logs[0]["grpc_code"], "Canceled", "{logs:?}");
    assert_eq!(logs[0]["dedup"], "none", "nothing was claimed: {logs:?}");
    assert_eq!(upstream.observed.executions("Echo"), 0);
    let first = send(&mut client(&envoy), unkeyed(with_request_id("reset-1", "pay 10"))).await;
    let retry = send(&mut client(&envoy), unkeyed(with_request_id("reset-1", "pay 10"))).await;
    assert_eq!(first.code(), Code::Ok, "{first:?}");
    assert!(retry.replayed, "{retry:?}");
    assert_eq!(upstream.observed.executions("Echo"), 1);
}
