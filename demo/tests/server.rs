//! The demo server as a real tonic client sees it, over loopback.

mod common;

use std::time::Duration;

use common::RunningServer;
use grpc_guard_demo::pb::{CollectRequest, CountRequest, EchoRequest};
use grpc_guard_demo::{connect, lazy_channel, scenario, scenario::Scenario};
use tonic::{Code, Request};

#[tokio::test]
async fn echo_ok_returns_the_message_and_counts_one_execution() {
    let server = RunningServer::start().await;
    let mut client = connect(&server.uri()).await.unwrap();

    let reply = client.echo(EchoRequest { message: "hi".into(), ..EchoRequest::default() }).await.unwrap().into_inner();

    assert_eq!(reply.message, "hi");
    assert_eq!(reply.execution, 1);
    assert_eq!(server.observed.executions("Echo"), 1);
    assert_eq!(server.observed.completions("Echo"), 1);
    assert_eq!(server.observed.executions("Count"), 0);
}

#[tokio::test]
async fn every_fail_code_comes_back_unchanged_with_a_message_naming_it() {
    let server = RunningServer::start().await;
    let mut client = connect(&server.uri()).await.unwrap();

    for fail_code in 1..=16 {
        let status = client.echo(EchoRequest { fail_code, ..EchoRequest::default() }).await.unwrap_err();
        let code = Code::from(fail_code);
        assert_eq!(status.code(), code);
        assert_eq!(status.message(), format!("demo failure: {code:?}"));
    }
    assert_eq!(server.observed.executions("Echo"), 16);
}

#[tokio::test]
async fn reply_padding_lengthens_the_reply_by_that_many_bytes() {
    let server = RunningServer::start().await;
    let mut client = connect(&server.uri()).await.unwrap();

    let reply = client
        .echo(EchoRequest { message: "x".into(), reply_padding: 5 * 1024 * 1024, ..EchoRequest::default() })
        .await
        .unwrap()
        .into_inner();

    assert_eq!(reply.message.len(), 1 + 5 * 1024 * 1024);
}

#[tokio::test]
async fn a_call_past_its_deadline_is_executed_but_never_completed() {
    let server = RunningServer::start().await;
    let mut client = connect(&server.uri()).await.unwrap();
    let mut request = Request::new(EchoRequest { delay_ms: 2_000, ..EchoRequest::default() });
    request.set_timeout(Duration::from_millis(50));

    let status = client.echo(request).await.unwrap_err();

    assert!(matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled), "{status:?}");
    assert_eq!(server.observed.executions("Echo"), 1);
    assert_eq!(server.observed.completions("Echo"), 0);
}

#[tokio::test]
async fn count_streams_n_messages_then_ends_with_the_requested_code() {
    let server = RunningServer::start().await;
    let mut client = connect(&server.uri()).await.unwrap();

    let mut stream = client
        .count(CountRequest { count: 4, interval_ms: 1, fail_code: Code::Aborted as i32 })
        .await
        .unwrap()
        .into_inner();
    let mut received = Vec::new();
    let end = loop {
        match stream.message().await {
            Ok(Some(reply)) => received.push(reply.n),
            Ok(None) => break Code::Ok,
            Err(status) => break status.code(),
        }
    };

    assert_eq!(received, [1, 2, 3, 4]);
    assert_eq!(end, Code::Aborted);
    assert_eq!(server.observed.executions("Count"), 1);
}

#[tokio::test]
async fn collect_sums_every_value_sent() {
    let server = RunningServer::start().await;
    let mut client = connect(&server.uri()).await.unwrap();
    let values = tokio_stream::iter([3, 4, 5].map(|value| CollectRequest { value }));

    let reply = client.collect(values).await.unwrap().into_inner();

    assert_eq!((reply.sum, reply.count), (12, 3));
    assert_eq!(server.observed.completions("Collect"), 1);
}

#[tokio::test]
async fn last_grpc_timeout_reflects_the_client_deadline_and_is_none_without_one() {
    let server = RunningServer::start().await;
    let mut client = connect(&server.uri()).await.unwrap();

    let mut request = Request::new(EchoRequest::default());
    request.set_timeout(Duration::from_secs(2));
    request.metadata_mut().insert("x-demo-tag", "deadline".parse().unwrap());
    client.echo(request).await.unwrap();
    assert_eq!(server.observed.last_grpc_timeout().as_deref(), Some("2000000u"));
    assert_eq!(server.observed.last_metadata("x-demo-tag").as_deref(), Some("deadline"));

    client.echo(EchoRequest::default()).await.unwrap();
    assert_eq!(server.observed.last_grpc_timeout(), None);
}

#[tokio::test]
async fn the_mix_scenario_gets_every_expected_code_straight_from_the_server() {
    let server = RunningServer::start().await;
    let channel = lazy_channel(&server.uri()).unwrap();

    for planned in Scenario::Mix.calls() {
        let outcome = scenario::run(&channel, planned, None).await;
        assert!(outcome.is_expected(), "{outcome}");
    }
}

#[tokio::test]
async fn the_down_scenario_sees_unavailable_when_nothing_listens() {
    let server = RunningServer::start().await;
    let uri = server.uri();
    drop(server);
    // Let the stopped server release its port before the calls.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let channel = lazy_channel(&uri).unwrap();

    for planned in Scenario::Down.calls() {
        let outcome = scenario::run(&channel, planned, Some(Duration::from_secs(2))).await;
        assert!(outcome.is_expected(), "{outcome}");
    }
}

#[tokio::test]
async fn a_target_without_scheme_is_rejected_before_any_call() {
    let error = lazy_channel("127.0.0.1:50051").unwrap_err();

    assert!(error.to_string().contains("http://"), "{error}");
}
