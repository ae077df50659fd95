//! Deadlines and the size guard through real Envoy: what the upstream saw as
//! its own deadline, what the client got, what ran, what was counted.

use std::net::SocketAddr;
use std::time::Duration;

use grpc_guard_demo::pb::EchoRequest;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tonic::Code;

use crate::support::*;

/// Echo named in the configuration: labelled before the service has answered
/// it (a method matched only by `*` earns its label from an answer).
const ECHO_NAMED: &str = r#"{"metrics":{"methods":["grpcguard.demo.v1.Demo/Echo","*"]}}"#;

/// Echo with an optional client deadline; the code the client got.
async fn echo(envoy: &grpc_guard_demo::envoy::Envoy, request: EchoRequest, timeout: Option<Duration>) -> Code {
    let channel = grpc_guard_demo::lazy_channel(&envoy.grpc_uri()).unwrap();
    let mut client = grpc_guard_demo::client(channel);
    let mut request = tonic::Request::new(request);
    if let Some(t) = timeout {
        request.set_timeout(t);
    }
    match client.echo(request).await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// The deadline the upstream received, parsed (Envoy's router re-emits the
/// `grpc-timeout` it enforces in milliseconds).
fn upstream_deadline(upstream: &Upstream) -> Option<Duration> {
    let raw = upstream.observed.last_grpc_timeout()?;
    grpc_guard::deadline::parse_grpc_timeout(raw.as_bytes()).ok()
}

fn hello() -> EchoRequest {
    EchoRequest { message: "hello".into(), ..Default::default() }
}

/// A gRPC Echo request sent by hyper's HTTP/2 client with a `grpc-timeout`
/// that tonic would refuse to send; returns the `grpc-status` and
/// `grpc-message` the client got (trailers-only or trailers).
async fn echo_with_raw_grpc_timeout(listen: SocketAddr, grpc_timeout: &str) -> (String, String) {
    let tcp = tokio::net::TcpStream::connect(listen).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    // EchoRequest { message: "hi" }: field 1, length 2.
    let body = Bytes::from_static(&[0, 0, 0, 0, 4, 0x0a, 2, b'h', b'i']);
    let request = hyper::Request::post(format!("http://{listen}/grpcguard.demo.v1.Demo/Echo"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", grpc_timeout)
        .body(Full::new(body))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let headers = response.headers().clone();
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let get = |name: &str| {
        trailers
            .get(name)
            .or_else(|| headers.get(name))
            .map(|v| v.to_str().unwrap_or_default().to_owned())
            .unwrap_or_default()
    };
    (get("grpc-status"), get("grpc-message"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_sees_the_injected_default_and_the_clamped_maximum_as_its_deadline() {
    let upstream = Upstream::start().await;
    let config = r#"{"deadline":{"default":"5s","max":"20s","per_method":{"grpcguard.demo.v1.Demo/Count":{"default":"3s"}}},"log":{"ok_sample":1}}"#;
    let envoy = start_envoy("deadline-policy", upstream.addr, config).unwrap();

    assert_eq!(echo(&envoy, hello(), None).await, Code::Ok);
    assert_eq!(upstream_deadline(&upstream), Some(Duration::from_secs(5)), "default injected");

    assert_eq!(echo(&envoy, hello(), Some(Duration::from_secs(60))).await, Code::Ok);
    assert_eq!(upstream_deadline(&upstream), Some(Duration::from_secs(20)), "clamped to the maximum");

    assert_eq!(echo(&envoy, hello(), Some(Duration::from_secs(2))).await, Code::Ok);
    let kept = upstream_deadline(&upstream).unwrap();
    assert!(kept <= Duration::from_secs(2) && kept > Duration::from_millis(1500), "client's own deadline: {kept:?}");

    let samples = parse_exposition(&envoy.prometheus().unwrap());
    let echo_labels = [("grpc_method", "Echo")];
    assert_eq!(value(&samples, "grpc_server_deadline_injected_total", &echo_labels), Some(1.0));
    assert_eq!(value(&samples, "grpc_server_deadline_clamped_total", &echo_labels), Some(1.0));
    let logs = call_logs(&envoy, 3).await;
    let sources: Vec<&str> = logs.iter().filter_map(|l| l["deadline_source"].as_str()).collect();
    assert_eq!(sources, ["default", "clamped", "client"]);
    assert_eq!(logs[0]["deadline_ms"], 5000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_method_default_wins_over_the_global_one() {
    let upstream = Upstream::start().await;
    let config = r#"{"deadline":{"default":"5s","per_method":{"grpcguard.demo.v1.Demo/Echo":{"default":"3s"}}}}"#;
    let envoy = start_envoy("deadline-per-method", upstream.addr, config).unwrap();
    assert_eq!(echo(&envoy, hello(), None).await, Code::Ok);
    assert_eq!(upstream_deadline(&upstream), Some(Duration::from_secs(3)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_zero_timeouts_are_answered_by_the_proxy_and_never_reach_the_upstream() {
    let upstream = Upstream::start().await;
    // Echo is named: none of these calls is answered by the service, and a
    // method not named in the configuration earns its label only from an
    // answer (README "Metrics").
    let envoy = start_envoy("deadline-reject", upstream.addr, ECHO_NAMED).unwrap();
    let listen = envoy.params().listen_addr();

    let (status, message) = echo_with_raw_grpc_timeout(listen, "soon").await;
    assert_eq!(status, "3", "INVALID_ARGUMENT");
    assert!(message.contains("grpc-timeout"), "grpc-message names the header: {message:?}");

    let (status, message) = echo_with_raw_grpc_timeout(listen, "0m").await;
    assert_eq!(status, "4", "DEADLINE_EXCEEDED");
    assert!(message.contains("zero"), "{message:?}");

    let (status, _) = echo_with_raw_grpc_timeout(listen, "123456789S").await;
    assert_eq!(status, "3", "nine digits is malformed");

    assert_eq!(upstream.observed.executions("Echo"), 0, "the upstream must never see these calls");
    let samples = parse_exposition(&envoy.prometheus().unwrap());
    assert_eq!(
        value(
            &samples,
            "grpc_server_deadline_rejected_total",
            &[("grpc_method", "Echo"), ("grpc_code", "InvalidArgument")]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            &samples,
            "grpc_server_deadline_rejected_total",
            &[("grpc_method", "Echo"), ("grpc_code", "DeadlineExceeded")]
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_is_ended_deadline_exceeded_by_envoy_and_counts_a_late_response() {
    // An upstream that ignores grpc-timeout and answers after 10 s; the client
    // sets no deadline (no client-side timer); grpc-guard injects 300 ms and
    // Envoy's router enforces it.
    let slow = start_plain_http_after(200, Duration::from_secs(10)).await;
    let config = r#"{"deadline":{"default":"300ms"},"metrics":{"methods":["grpcguard.demo.v1.Demo/Echo","*"]}}"#;
    let envoy = start_envoy("deadline-late", slow, config).unwrap();
    assert_eq!(echo(&envoy, hello(), None).await, Code::DeadlineExceeded);

    let samples =
        scrape_until(&envoy, |s| value(s, "grpc_server_late_responses_total", &[("grpc_method", "Echo")]).is_some())
            .await;
    assert_eq!(value(&samples, "grpc_server_late_responses_total", &[("grpc_method", "Echo")]), Some(1.0));
    let logs = call_logs(&envoy, 1).await;
    assert_eq!(logs[0]["late"], true);
    assert_eq!(logs[0]["grpc_code"], "DeadlineExceeded");
    assert_eq!((logs[0]["deadline_ms"].as_u64(), logs[0]["deadline_source"].as_str()), (Some(300), Some("default")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_tonic_handler_is_cut_at_the_deadline_while_it_keeps_running() {
    // tonic enforces grpc-timeout itself, racing Envoy's router to the same
    // instant: the client gets DEADLINE_EXCEEDED (Envoy) or CANCELLED
    // ("Timeout expired", tonic). Either way the handler was started, never
    // completed for the client, and grpc-guard counts the late response.
    let upstream = Upstream::start().await;
    let envoy = start_envoy("deadline-tonic", upstream.addr, r#"{"deadline":{"default":"300ms"}}"#).unwrap();
    // The service has answered Echo before: the method has its label.
    assert_eq!(echo(&envoy, hello(), None).await, Code::Ok);
    let slow = EchoRequest { message: "slow".into(), delay_ms: 10_000, ..Default::default() };
    let code = echo(&envoy, slow, None).await;
    assert!(matches!(code, Code::DeadlineExceeded | Code::Cancelled), "{code:?}");
    assert_eq!(upstream.observed.executions("Echo"), 2);
    assert_eq!(upstream.observed.completions("Echo"), 1, "only the fast call completed");
    let samples =
        scrape_until(&envoy, |s| value(s, "grpc_server_late_responses_total", &[("grpc_method", "Echo")]).is_some())
            .await;
    assert_eq!(value(&samples, "grpc_server_late_responses_total", &[("grpc_method", "Echo")]), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_message_is_refused_and_never_executed() {
    let upstream = Upstream::start().await;
    let config = r#"{"limits":{"max_request_message_bytes":1024}}"#;
    let envoy = start_envoy("size-limit", upstream.addr, config).unwrap();
    let big = EchoRequest { message: "x".repeat(4096), ..Default::default() };
    assert_eq!(echo(&envoy, hello(), None).await, Code::Ok, "small messages pass");
    assert_eq!(echo(&envoy, big, None).await, Code::ResourceExhausted);
    assert_eq!(upstream.observed.executions("Echo"), 1, "only the small call ran");

    let samples =
        scrape_until(&envoy, |s| value(s, "grpc_server_request_bytes_count", &[("grpc_method", "Echo")]) == Some(2.0))
            .await;
    assert_eq!(value(&samples, "grpc_server_request_too_large_total", &[("grpc_method", "Echo")]), Some(1.0));
    assert_eq!(
        value(&samples, "grpc_server_handled_total", &[("grpc_method", "Echo"), ("grpc_code", "ResourceExhausted")]),
        Some(1.0)
    );
}
