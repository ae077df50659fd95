//! The status a client sees is the status grpc-guard counts and logs.

use std::time::Duration;

use grpc_guard_demo::pb::EchoRequest;
use grpc_guard_demo::scenario::{self, Call, PlannedCall};
use tonic::Code;

use crate::support::*;

/// Every code the demo answers with, OK first.
const CODES: [Code; 8] = [
    Code::Ok,
    Code::NotFound,
    Code::InvalidArgument,
    Code::PermissionDenied,
    Code::Unavailable,
    Code::Internal,
    Code::ResourceExhausted,
    Code::AlreadyExists,
];

/// The label grpc-guard gives a code: the filter's own table.
fn go_name(code: Code) -> &'static str {
    grpc_guard::status::GrpcStatus::from_code(code as u32).map_or("?", |s| s.go_name())
}

fn echo(fail_code: Code) -> PlannedCall {
    PlannedCall {
        call: Call::Echo(EchoRequest { message: "e2e".into(), fail_code: fail_code as i32, ..Default::default() }),
        expected: fail_code,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_demo_code_reaches_the_client_unchanged_and_is_counted_under_its_label() {
    let upstream = Upstream::start().await;
    let envoy = start_envoy("codes", upstream.addr, "{}").unwrap();
    let channel = grpc_guard_demo::lazy_channel(&envoy.grpc_uri()).unwrap();
    for code in CODES {
        for _ in 0..2 {
            let outcome = scenario::run(&channel, echo(code), None).await;
            assert_eq!(outcome.code, code, "client saw {outcome}");
        }
    }
    let missing =
        scenario::run(&channel, PlannedCall { call: Call::Missing, expected: Code::Unimplemented }, None).await;
    assert_eq!(missing.code, Code::Unimplemented);

    let samples = scrape_until(&envoy, |s| {
        value(s, "grpc_server_handling_milliseconds_count", &[("grpc_method", "Echo")]) == Some(16.0)
    })
    .await;
    for code in CODES {
        let labels = [
            ("grpc_service", DEMO_SERVICE),
            ("grpc_method", "Echo"),
            ("grpc_type", "unary"),
            ("grpc_code", go_name(code)),
        ];
        assert_eq!(value(&samples, "grpc_server_handled_total", &labels), Some(2.0), "grpc_code={}", go_name(code));
    }
    let echo = [("grpc_service", DEMO_SERVICE), ("grpc_method", "Echo"), ("grpc_type", "unary")];
    assert_eq!(value(&samples, "grpc_server_started_total", &echo), Some(16.0));
    assert_eq!(value(&samples, "grpc_server_msg_received_total", &echo), Some(16.0));
    assert_eq!(value(&samples, "grpc_server_msg_sent_total", &echo), Some(2.0), "only OK calls carry a reply message");
    assert_eq!(value(&samples, "grpc_server_handling_milliseconds_count", &echo), Some(16.0));
    assert_eq!(value(&samples, "grpc_server_request_bytes_count", &echo), Some(16.0));
    // A method the server does not have takes no label (a flood of made-up
    // paths must not use up `max_methods`): it counts as `other`.
    assert_eq!(
        value(&samples, "grpc_server_handled_total", &[("grpc_method", "other"), ("grpc_code", "Unimplemented")]),
        Some(1.0)
    );
    assert!(!samples.iter().any(|s| s.labels.get("grpc_method").map(String::as_str) == Some("Missing")));
    assert_eq!(upstream.observed.executions("Echo"), 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_that_is_down_is_unavailable_for_the_client_and_the_metric() {
    let upstream = Upstream::start().await;
    // Echo is named: with its service down it is never answered, and a
    // method matched only by `*` would count as `other` until it is.
    let config = r#"{"metrics":{"methods":["grpcguard.demo.v1.Demo/Echo","*"]}}"#;
    let envoy = start_envoy("down", upstream.addr, config).unwrap();
    // The demo route sends calls marked `x-grpc-guard-demo: upstream-down` to a
    // port where nothing listens.
    let channel = grpc_guard_demo::lazy_channel(&envoy.grpc_uri()).unwrap();
    let mut client = grpc_guard_demo::client(channel);
    let mut request = tonic::Request::new(EchoRequest { message: "anyone?".into(), ..Default::default() });
    request.metadata_mut().insert("x-grpc-guard-demo", "upstream-down".parse().unwrap());
    let status = client.echo(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);

    let samples = parse_exposition(&envoy.prometheus().unwrap());
    assert_eq!(
        value(&samples, "grpc_server_handled_total", &[("grpc_method", "Echo"), ("grpc_code", "Unavailable")]),
        Some(1.0)
    );
    assert_eq!(upstream.observed.executions("Echo"), 0);
    let logs = call_logs(&envoy, 1).await;
    assert_eq!(logs[0]["grpc_code"], "Unavailable");
    assert_eq!(logs[0]["status_source"], "headers", "Envoy answers a refused connection trailers-only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_503_without_grpc_status_is_unavailable() {
    let plain = start_plain_http(503).await;
    let envoy = start_envoy("http503", plain, "{}").unwrap();
    let channel = grpc_guard_demo::lazy_channel(&envoy.grpc_uri()).unwrap();
    let outcome = scenario::run(&channel, echo(Code::Ok), None).await;
    assert_eq!(outcome.code, Code::Unavailable, "client saw {outcome}");

    let samples = parse_exposition(&envoy.prometheus().unwrap());
    assert_eq!(
        value(&samples, "grpc_server_handled_total", &[("grpc_method", "Echo"), ("grpc_code", "Unavailable")]),
        Some(1.0)
    );
    let logs = call_logs(&envoy, 1).await;
    assert_eq!(logs[0]["status_source"], "http");
    assert_eq!(logs[0]["http_status"], 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_gives_up_is_counted_as_canceled_while_the_server_keeps_working() {
    let upstream = Upstream::start().await;
    // OK calls never logged: the one line is the cancelled call's.
    let envoy = start_envoy("cancel", upstream.addr, r#"{"log":{"ok_sample":0}}"#).unwrap();
    let channel = grpc_guard_demo::lazy_channel(&envoy.grpc_uri()).unwrap();
    // The service has answered Echo before: the method has its label.
    assert_eq!(scenario::run(&channel, echo(Code::Ok), None).await.code, Code::Ok);
    let slow = PlannedCall {
        call: Call::Echo(EchoRequest { message: "slow".into(), delay_ms: 3_000, ..Default::default() }),
        expected: Code::Ok,
    };
    // No grpc-timeout: the client simply drops the call, which resets the stream.
    let gave_up = tokio::time::timeout(Duration::from_millis(300), scenario::run(&channel, slow, None)).await;
    assert!(gave_up.is_err(), "the call should still be running when the client leaves");

    let canceled = [("grpc_method", "Echo"), ("grpc_code", "Canceled")];
    let samples = scrape_until(&envoy, |s| value(s, "grpc_server_handled_total", &canceled).is_some()).await;
    assert_eq!(
        value(&samples, "grpc_server_handled_total", &canceled),
        Some(1.0),
        "{:?}",
        samples.iter().filter(|s| s.name == "grpc_server_handled_total").collect::<Vec<_>>()
    );
    let logs = call_logs(&envoy, 1).await;
    assert_eq!(logs[0]["status_source"], "reset");
    assert_eq!(upstream.observed.executions("Echo"), 2, "the upstream had started the work");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_prints_the_status_grpc_guard_tagged() {
    let upstream = Upstream::start().await;
    let envoy = start_envoy("accesslog", upstream.addr, "{}").unwrap();
    let channel = grpc_guard_demo::lazy_channel(&envoy.grpc_uri()).unwrap();
    scenario::run(&channel, echo(Code::NotFound), None).await;
    scenario::run(&channel, echo(Code::Ok), None).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let lines = envoy.access_log_lines();
        if lines.len() >= 2 || std::time::Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(lines.iter().any(|l| l.contains("grpc_guard=NotFound")), "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("grpc_guard=OK")), "{lines:?}");
}
