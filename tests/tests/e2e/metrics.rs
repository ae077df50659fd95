//! What Prometheus scrapes and what the log shows, for streams, floods of
//! method names, and traffic that is not gRPC.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::str::FromStr;

use grpc_guard_demo::pb::{CountRequest, EchoReply, EchoRequest};
use grpc_guard_demo::scenario::{self, Call, PlannedCall};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::Code;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_streaming_call_counts_every_message_under_its_configured_type() {
    let upstream = Upstream::start().await;
    let config = r#"{"metrics":{"method_types":{"grpcguard.demo.v1.Demo/Count":"server_stream"}}}"#;
    let envoy = start_envoy("stream", upstream.addr, config).unwrap();
    let channel = grpc_guard_demo::lazy_channel(&envoy.grpc_uri()).unwrap();
    let planned = PlannedCall {
        call: Call::Count(CountRequest { count: 7, interval_ms: 5, fail_code: Code::DataLoss as i32 }),
        expected: Code::DataLoss,
    };
    let outcome = scenario::run(&channel, planned, None).await;
    assert_eq!(outcome.code, Code::DataLoss, "{outcome}");
    assert!(outcome.detail.contains('7'), "client should have read 7 messages first: {outcome}");

    let count = [("grpc_service", DEMO_SERVICE), ("grpc_method", "Count"), ("grpc_type", "server_stream")];
    let samples = scrape_until(&envoy, |s| value(s, "grpc_server_response_bytes_count", &count) == Some(7.0)).await;
    assert_eq!(value(&samples, "grpc_server_msg_sent_total", &count), Some(7.0));
    assert_eq!(value(&samples, "grpc_server_msg_received_total", &count), Some(1.0));
    assert_eq!(value(&samples, "grpc_server_response_bytes_count", &count), Some(7.0));
    let mut handled = count.to_vec();
    handled.push(("grpc_code", "DataLoss"));
    assert_eq!(value(&samples, "grpc_server_handled_total", &handled), Some(1.0));

    let logs = call_logs(&envoy, 1).await;
    let line = &logs[0];
    assert_eq!(line["method"], "Count");
    assert_eq!(line["grpc_type"], "server_stream");
    assert_eq!(line["resp_msgs"], 7);
    assert_eq!(line["status_source"], "trailers");
}

/// The whole line, as a scraper reads it: the go-grpc-prometheus name, every
/// label and no other, nothing of the stat name's encoding left over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_s_exposition_lines_read_exactly_as_go_grpc_prometheus_writes_them() {
    let upstream = Upstream::start().await;
    let envoy = start_envoy("exposition", upstream.addr, "{}").unwrap();
    let mut client = grpc_guard_demo::client(grpc_guard_demo::lazy_channel(&envoy.grpc_uri()).unwrap());
    client.echo(EchoRequest { message: "hi".into(), ..Default::default() }).await.unwrap();
    let labels = format!(r#"grpc_service="{DEMO_SERVICE}",grpc_method="Echo",grpc_type="unary""#);
    let exporter = r#"exporter="grpc-guard""#;
    let bucket = format!(r#"grpc_server_handling_milliseconds_bucket{{{labels},{exporter},le="1000"}} 1"#);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let text = loop {
        let text = envoy.prometheus().unwrap();
        if text.contains(&bucket) || std::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("grpc_server_")).collect();
    for want in [
        format!(r#"grpc_server_started_total{{{labels},{exporter}}} 1"#),
        format!(r#"grpc_server_handled_total{{{labels},grpc_code="OK",{exporter}}} 1"#),
        format!(r#"grpc_server_msg_received_total{{{labels},{exporter}}} 1"#),
        format!(r#"grpc_server_msg_sent_total{{{labels},{exporter}}} 1"#),
        bucket.clone(),
    ] {
        assert!(lines.contains(&want.as_str()), "missing `{want}` in:\n{}", lines.join("\n"));
    }
    assert!(
        text.lines().filter(|l| l.starts_with("# TYPE grpc_")).all(|l| !l.contains('=') && !l.contains("__")),
        "a metric name carries part of a label:\n{text}"
    );
}

/// A flood of made-up paths (`methods: ["*"]`, the default) takes no label:
/// a method earns its own only once the service answers it with something
/// other than UNIMPLEMENTED, so the real methods after the flood still get
/// theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_random_method_paths_take_no_label_from_the_real_methods() {
    const MAX_METHODS: usize = 5;
    let upstream = Upstream::start().await;
    let config = format!(r#"{{"metrics":{{"max_methods":{MAX_METHODS}}}}}"#);
    let envoy = start_envoy("cardinality", upstream.addr, &config).unwrap();
    let channel = grpc_guard_demo::lazy_channel(&envoy.grpc_uri()).unwrap();
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    for i in 0..1000u32 {
        // Well-formed and malformed paths alike; the server answers Unimplemented.
        let path = match i % 4 {
            0 => format!("/flood.v{i}.Svc/M{i}"),
            1 => format!("/flood.Svc/Method{i}"),
            2 => format!("/x{i}/y;grpc_code=OK"),
            _ => format!("/{i}"),
        };
        let Ok(path) = PathAndQuery::from_str(&path) else { continue };
        grpc.ready().await.unwrap();
        let codec = tonic_prost::ProstCodec::<EchoRequest, EchoReply>::default();
        let status = grpc.unary(tonic::Request::new(EchoRequest::default()), path, codec).await.unwrap_err();
        assert_eq!(status.code(), Code::Unimplemented);
    }
    let samples = scrape_until(&envoy, |s| {
        s.iter().filter(|x| x.name == "grpc_server_handled_total").map(|x| x.value).sum::<f64>() >= 1000.0
    })
    .await;
    let mut methods: Vec<&str> = samples
        .iter()
        .filter(|s| s.name.starts_with("grpc_server_"))
        .filter_map(|s| s.labels.get("grpc_method").map(String::as_str))
        .collect();
    methods.sort_unstable();
    methods.dedup();
    assert_eq!(methods, ["other"], "no made-up method took a label");
    let handled: f64 = samples.iter().filter(|s| s.name == "grpc_server_handled_total").map(|s| s.value).sum();
    assert_eq!(handled, 1000.0, "every call is still counted, folded or not");

    // The real methods, on either worker, still get theirs.
    let mut client = grpc_guard_demo::client(channel);
    for _ in 0..4 {
        client.echo(EchoRequest::default()).await.unwrap();
    }
    let mut stream = client.count(CountRequest { count: 2, ..Default::default() }).await.unwrap().into_inner();
    while stream.message().await.unwrap().is_some() {}
    let samples = scrape_until(&envoy, |s| {
        value(s, "grpc_server_handled_total", &[("grpc_method", "Count")]).is_some()
            && value(s, "grpc_server_handled_total", &[("grpc_method", "Echo")]) == Some(4.0)
    })
    .await;
    assert_eq!(
        value(&samples, "grpc_server_handled_total", &[("grpc_method", "Echo"), ("grpc_code", "OK")]),
        Some(4.0)
    );
    assert_eq!(
        value(&samples, "grpc_server_started_total", &[("grpc_method", "Echo")]),
        Some(4.0),
        "from its first call"
    );
    assert_eq!(
        value(&samples, "grpc_server_handled_total", &[("grpc_method", "Count"), ("grpc_code", "OK")]),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_logs_one_json_line_with_the_documented_fields() {
    let upstream = Upstream::start().await;
    let envoy = start_envoy("logs", upstream.addr, r#"{"log":{"ok_sample":1}}"#).unwrap();
    let channel = grpc_guard_demo::lazy_channel(&envoy.grpc_uri()).unwrap();
    let mut client = grpc_guard_demo::client(channel);
    let mut request =
        tonic::Request::new(EchoRequest { message: "log me".into(), reply_padding: 100, ..Default::default() });
    request.metadata_mut().insert("x-request-id", "req-\"42\"".parse().unwrap());
    // A client's second attempt, in a W3C trace.
    request.metadata_mut().insert("traceparent", TRACEPARENT.parse().unwrap());
    request.metadata_mut().insert("grpc-previous-rpc-attempts", "1".parse().unwrap());
    client.echo(request).await.unwrap();

    let logs = call_logs(&envoy, 1).await;
    assert_eq!(logs.len(), 1, "one line per call: {logs:?}");
    let line = &logs[0];
    for field in [
        "direction",
        "service",
        "method",
        "grpc_type",
        "grpc_code",
        "grpc_status",
        "status_source",
        "http_status",
        "duration_ms",
        "req_msgs",
        "req_bytes",
        "resp_msgs",
        "resp_bytes",
        "request_id",
        "trace_id",
        "previous_attempts",
    ] {
        assert!(line.get(field).is_some(), "missing field {field}: {line}");
    }
    assert_eq!(line["service"], DEMO_SERVICE);
    assert_eq!(line["method"], "Echo");
    assert_eq!(line["grpc_code"], "OK");
    assert_eq!(line["grpc_status"], 0);
    assert_eq!(line["http_status"], 200);
    assert_eq!(line["req_msgs"], 1);
    assert_eq!(line["resp_msgs"], 1);
    assert!(line["resp_bytes"].as_u64().unwrap() > 100, "{line}");
    assert_eq!(line["request_id"], "req-\"42\"");
    assert_eq!(line["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736", "the line joins its trace");
    assert_eq!(line["previous_attempts"], 1);
    let samples = parse_exposition(&envoy.prometheus().unwrap());
    assert_eq!(value(&samples, "grpc_server_retried_total", &[("grpc_method", "Echo")]), Some(1.0));
    assert_eq!(value(&samples, "grpc_server_started_total", &[("grpc_method", "Echo")]), Some(1.0));
}

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_every_failure_and_one_ok_call_in_a_hundred_is_logged_and_every_call_counted() {
    let upstream = Upstream::start().await;
    let envoy = start_envoy("logs-default", upstream.addr, "{}").unwrap();
    let channel = grpc_guard_demo::lazy_channel(&envoy.grpc_uri()).unwrap();
    let mut client = grpc_guard_demo::client(channel);
    for n in 0..200 {
        let request = EchoRequest { message: format!("call {n}"), ..Default::default() };
        client.echo(request).await.unwrap();
    }
    let failing = EchoRequest { message: "x".into(), fail_code: tonic::Code::NotFound as i32, ..Default::default() };
    assert!(client.echo(failing).await.is_err());
    let logs = call_logs(&envoy, 3).await;
    let ok = logs.iter().filter(|l| l["grpc_code"] == "OK").count();
    assert_eq!(ok, 2, "two OK calls of 200, spread evenly: {logs:?}");
    assert_eq!(logs.iter().filter(|l| l["grpc_code"] == "NotFound").count(), 1, "{logs:?}");
    let samples = scrape_until(&envoy, |s| {
        value(s, "grpc_server_handled_total", &[("grpc_code", "OK"), ("grpc_method", "Echo")]) == Some(200.0)
    })
    .await;
    assert_eq!(
        value(&samples, "grpc_server_handled_total", &[("grpc_code", "NotFound"), ("grpc_method", "Echo")]),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_grpc_request_passes_byte_for_byte_and_is_not_counted() {
    let plain = start_plain_http(200).await;
    let envoy = start_envoy("passthrough", plain, "{}").unwrap();
    let body: Vec<u8> = (0u8..=255).chain(*b"\x00\x00\x00\x00\x05hello").collect();
    let addr = envoy.params().listen_addr();
    let response = tokio::task::spawn_blocking(move || {
        let mut tcp = TcpStream::connect(addr).unwrap();
        let head = format!(
            "POST /upload/v1/blobs HTTP/1.1\r\nHost: x\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        tcp.write_all(head.as_bytes()).unwrap();
        tcp.write_all(&body).unwrap();
        let mut response = Vec::new();
        tcp.read_to_end(&mut response).unwrap();
        (response, body)
    })
    .await
    .unwrap();
    let (response, body) = response;
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&response[..split]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("x-seen-content-type: application/octet-stream"), "{head}");
    assert_eq!(&response[split..], &body[..], "body must come back byte for byte");

    let samples = parse_exposition(&envoy.prometheus().unwrap());
    assert!(samples.iter().all(|s| !s.name.starts_with("grpc_server_")), "non-gRPC traffic must not be counted");
    assert!(envoy.call_logs().is_empty(), "non-gRPC traffic must not be logged");
}

/// A server whose auth layer answers every path UNAUTHENTICATED before it
/// routes the call says nothing of the method: 50 made-up paths take no
/// label.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_server_says_before_routing_a_call_earns_a_made_up_path_no_label() {
    let (upstream, calls) = start_h2_upstream(Reads::Whole, std::time::Duration::ZERO, |_| {
        let mut trailers = hyper::HeaderMap::new();
        trailers.append("grpc-status", "16".parse().unwrap());
        hyper::Response::builder()
            .status(200)
            .header("content-type", "application/grpc")
            .body(frames_body(vec![hyper::body::Frame::trailers(trailers)]))
            .unwrap()
    })
    .await;
    let envoy = start_envoy("auth-layer", upstream, r#"{"metrics":{"max_methods":3}}"#).unwrap();
    let listen = envoy.params().listen_addr();
    let headers = [("content-type", "application/grpc"), ("te", "trailers")];
    for i in 0..50 {
        let answer = h2_post(listen, &format!("/made.Up/M{i}"), &headers, &grpc_frame(b"")).await;
        assert_eq!(answer.grpc_status().as_deref(), Some("16"));
    }
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 50);
    let samples = scrape_until(&envoy, |s| {
        value(s, "grpc_server_handled_total", &[("grpc_method", "other"), ("grpc_code", "Unauthenticated")])
            == Some(50.0)
    })
    .await;
    let methods: std::collections::BTreeSet<&str> = samples
        .iter()
        .filter(|s| s.name.starts_with("grpc_server_"))
        .filter_map(|s| s.labels.get("grpc_method").map(String::as_str))
        .collect();
    assert_eq!(methods, ["other"].into(), "no made-up path took a label");
}
