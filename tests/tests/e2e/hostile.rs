//! Idempotency keys against callers and upstreams that no gRPC library
//! produces by default but HTTP/2 allows: request trailers, answers before
//! the request's end, varied authorities, repeated metadata, odd content
//! types, huge retries, and retries racing a key's expiry. Raw HTTP/2
//! (hyper) on either side where a tonic peer will not send the shape.

use std::sync::atomic::Ordering;
use std::time::Duration;

use grpc_guard_demo::pb::{EchoReply, EchoRequest};
use hyper::body::{Bytes, Frame};
use prost::Message as _;

use crate::support::*;

const ECHO_PATH: &str = "/grpcguard.demo.v1.Demo/Echo";
const ECHO_DEDUP: &str = r#"{"dedup":{"methods":["grpcguard.demo.v1.Demo/Echo"]}}"#;

fn echo_frame(message: &str, delay_ms: u32) -> Vec<u8> {
    grpc_frame(&EchoRequest { message: message.into(), delay_ms, ..Default::default() }.encode_to_vec())
}

fn keyed_headers<'a>(key: &'a str, caller: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![("content-type", "application/grpc"), ("te", "trailers"), ("idempotency-key", key), ("authorization", caller)]
}

/// One keyed call, sent whole.
async fn call(addr: std::net::SocketAddr, key: &str, frames: Vec<Frame<Bytes>>) -> H2Answer {
    let s = h2_stream(addr, None, ECHO_PATH, &keyed_headers(key, "Bearer a"), frames, true).await;
    s.answer.await.unwrap().expect("an answer")
}

/// A keyed retry sent whole, resent while the first call is still in
/// progress (ABORTED), as the README's client policy does: no fixed wait
/// decides what it gets.
async fn retry(addr: std::net::SocketAddr, key: &str, body: &[u8]) -> H2Answer {
    for _ in 0..40 {
        let answer = call(addr, key, vec![data(body.to_vec())]).await;
        if answer.grpc_status().as_deref() != Some("10") {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the first call with key {key} never settled")
}

fn replayed(answer: &H2Answer) -> bool {
    answer.header("grpc-guard-replayed").as_deref() == Some("true")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_request_ends_with_trailers_is_run_once_and_replayed() {
    let upstream = Upstream::start().await;
    let envoy = start_envoy("hostile-trailers", upstream.addr, ECHO_DEDUP).unwrap();
    let addr = envoy.params().listen_addr();
    let mut answers = Vec::new();
    for _ in 0..3 {
        let frames = vec![data(echo_frame("charge 10", 0)), trailers_frame(&[("x-client-trailer", "1")])];
        answers.push(call(addr, "order-t", frames).await);
    }
    assert_eq!(upstream.observed.executions("Echo"), 1, "{answers:#?}");
    assert!(!replayed(&answers[0]) && replayed(&answers[1]) && replayed(&answers[2]), "{answers:#?}");
    assert!(answers.iter().all(|a| a.grpc_status().as_deref() == Some("0")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_with_another_body_and_trailers_is_refused_at_its_end() {
    let upstream = Upstream::start().await;
    let envoy = start_envoy("hostile-trailers-retry", upstream.addr, ECHO_DEDUP).unwrap();
    let addr = envoy.params().listen_addr();
    call(addr, "order-r", vec![data(echo_frame("charge 10", 0))]).await;
    let retry =
        call(addr, "order-r", vec![data(echo_frame("charge 99999", 0)), trailers_frame(&[("x-client-trailer", "1")])])
            .await;
    assert_eq!(retry.grpc_status().as_deref(), Some("3"), "{retry:?}");
    assert_eq!(upstream.observed.executions("Echo"), 1);
}

/// An upstream that acts on the first DATA frame (grpc-go's unary path),
/// works for `work`, then answers OK.
async fn start_acting_upstream(work: Duration) -> (std::net::SocketAddr, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    start_h2_upstream(Reads::FirstFrame, work, |n| {
        let reply = grpc_frame(&EchoReply { message: "done".into(), execution: n }.encode_to_vec());
        let body = frames_body(vec![data(reply), trailers_frame(&[("grpc-status", "0")])]);
        hyper::Response::builder().status(200).header("content-type", "application/grpc").body(body).unwrap()
    })
    .await
}

/// An Echo request whose bulk, `padding` bytes, is a field the service
/// does not know and ignores.
fn padded_echo_frame(padding: usize) -> Vec<u8> {
    let mut message = EchoRequest { message: "ok".into(), ..Default::default() }.encode_to_vec();
    prost::encoding::bytes::encode(99, &vec![7u8; padding], &mut message);
    grpc_frame(&message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_answers_before_the_request_ends_has_its_answer_kept() {
    // Like grpc-go's unary path, this upstream runs the call once it has the
    // message, before the client's END_STREAM.
    let (addr, runs) = start_acting_upstream(Duration::ZERO).await;
    let envoy = start_envoy("hostile-early", addr, ECHO_DEDUP).unwrap();
    let listen = envoy.params().listen_addr();
    let first =
        h2_stream(listen, None, ECHO_PATH, &keyed_headers("k", "Bearer a"), vec![data(echo_frame("x", 0))], false)
            .await;
    let answer = tokio::time::timeout(Duration::from_secs(5), first.answer).await.unwrap().unwrap();
    assert_eq!(answer.unwrap().grpc_status().as_deref(), Some("0"));
    drop(first.open);
    let retry = retry(listen, "k", &echo_frame("x", 0)).await;
    assert!(replayed(&retry), "{retry:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the retry must not run again");
}

/// A greedy caller (one credential) holds eight slow keyed calls, each
/// under another `:authority`; then a victim calls.
async fn greedy_caller_then_victim(name: &str, config: &str) -> (u64, Vec<H2Answer>, u64) {
    let upstream = Upstream::start().await;
    let envoy = start_envoy(name, upstream.addr, config).unwrap();
    let addr = envoy.params().listen_addr();
    let mut held = Vec::new();
    for n in 0..8 {
        let authority = format!("tenant{n}.example");
        let key = format!("hold-{n}");
        let frames = vec![data(echo_frame("hold", 2000))];
        held.push(
            h2_stream(addr, Some(&authority), ECHO_PATH, &keyed_headers(&key, "Bearer greedy"), frames, true).await,
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let running = upstream.observed.executions("Echo");
    let mut victim = Vec::new();
    for _ in 0..2 {
        let frames = vec![data(echo_frame("charge victim", 0))];
        let s =
            h2_stream(addr, Some("svc.example"), ECHO_PATH, &keyed_headers("victim", "Bearer victim"), frames, true)
                .await;
        victim.push(s.answer.await.unwrap().unwrap());
    }
    for s in held {
        let _ = s.answer.await;
    }
    (running, victim, upstream.observed.executions("Echo") - running)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_authority_does_not_make_a_caller_someone_else() {
    let config = r#"{"dedup":{"methods":["grpcguard.demo.v1.Demo/Echo"],"max_entries":8}}"#;
    let (greedy, victim, victim_runs) = greedy_caller_then_victim("hostile-authority", config).await;
    assert_eq!(greedy, 2, "a caller holds a quarter of the bucket, whatever :authority it sends");
    assert_eq!(victim[0].grpc_status().as_deref(), Some("0"), "{victim:?}");
    assert!(replayed(&victim[1]));
    assert_eq!(victim_runs, 1);

    let forward = r#"{"dedup":{"methods":["grpcguard.demo.v1.Demo/Echo"],"max_entries":8,"when_full":"forward"}}"#;
    let (_, _, victim_runs) = greedy_caller_then_victim("hostile-authority-forward", forward).await;
    assert_eq!(victim_runs, 1, "the victim's retry never runs undeduplicated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_racing_a_running_calls_ttl_never_run_it_twice() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let upstream = Upstream::start().await;
    // The first call takes 3 s; the filter gives it the TTL, 1 s, as its
    // deadline; retries fire around that edge, before Envoy's cut settles.
    let config = r#"{"dedup":{"methods":["grpcguard.demo.v1.Demo/Echo"],"ttl":"1s"}}"#;
    let envoy = start_envoy("hostile-ttl-edge", upstream.addr, config).unwrap();
    let addr = envoy.params().listen_addr();
    for trial in 0..3u32 {
        let key = format!("edge-{trial}");
        let body = Bytes::from(echo_frame("charge 10", 3000));
        let mut senders = Vec::new();
        for _ in 0..4 {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
            tokio::spawn(connection);
            senders.push(sender);
        }
        let before = upstream.observed.executions("Echo");
        let first =
            h2_stream(addr, None, ECHO_PATH, &keyed_headers(&key, "Bearer a"), vec![Frame::data(body.clone())], true)
                .await;
        let t0 = tokio::time::Instant::now();
        tokio::time::sleep_until(t0 + Duration::from_millis(950)).await;
        let mut retries = Vec::new();
        let mut i = 0;
        while t0.elapsed() < Duration::from_millis(1300) {
            let mut sender = senders[i % senders.len()].clone();
            i += 1;
            let mut request = hyper::Request::builder().method("POST").uri(format!("http://{addr}{ECHO_PATH}"));
            for (name, value) in keyed_headers(&key, "Bearer a") {
                request = request.header(name, value);
            }
            let request = request.body(http_body_util::Full::new(body.clone())).unwrap();
            retries.push(tokio::spawn(async move { sender.send_request(request).await.is_ok() }));
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        for retry in retries {
            let _ = retry.await;
        }
        let _ = first.answer.await;
        assert_eq!(upstream.observed.executions("Echo") - before, 1, "trial {trial}: {i} retries");
    }
}

/// Answers a test upstream gives, and what a replay of them must keep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncommon_answers_are_replayed_as_they_were() {
    let reply = |n: u64| grpc_frame(&EchoReply { message: "done".into(), execution: n }.encode_to_vec());
    let grpc = || hyper::Response::builder().status(200).header("content-type", "application/grpc");

    // Two values of one header and of one trailer.
    let (addr, runs) = start_h2_upstream(Reads::Whole, Duration::ZERO, move |n| {
        let mut trailers = hyper::HeaderMap::new();
        trailers.append("grpc-status", "0".parse().unwrap());
        trailers.append("x-t", "1".parse().unwrap());
        trailers.append("x-t", "2".parse().unwrap());
        let body = frames_body(vec![data(reply(n)), Frame::trailers(trailers)]);
        grpc().header("x-multi", "a").header("x-multi", "b").body(body).unwrap()
    })
    .await;
    let envoy = start_envoy("hostile-repeated", addr, ECHO_DEDUP).unwrap();
    let listen = envoy.params().listen_addr();
    let first = call(listen, "k", vec![data(echo_frame("x", 0))]).await;
    let retry = call(listen, "k", vec![data(echo_frame("x", 0))]).await;
    let values = |a: &H2Answer, name: &str, trailers: bool| -> Vec<String> {
        let list = if trailers { &a.trailers } else { &a.headers };
        list.iter().filter(|(n, _)| n == name).map(|(_, v)| v.clone()).collect()
    };
    assert!(replayed(&retry));
    assert_eq!(values(&retry, "x-multi", false), values(&first, "x-multi", false));
    assert_eq!(values(&retry, "x-t", true), ["1", "2"]);
    assert_eq!(retry.body, first.body);
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // The status in the headers, trailers without one.
    let (addr, runs) = start_h2_upstream(Reads::Whole, Duration::ZERO, move |_| {
        let mut trailers = hyper::HeaderMap::new();
        trailers.append("x-t", "1".parse().unwrap());
        let body = frames_body(vec![Frame::trailers(trailers)]);
        grpc().header("grpc-status", "5").header("grpc-message", "no such order").body(body).unwrap()
    })
    .await;
    let envoy = start_envoy("hostile-status-then-trailers", addr, ECHO_DEDUP).unwrap();
    let listen = envoy.params().listen_addr();
    let first = call(listen, "k", vec![data(echo_frame("x", 0))]).await;
    let retry = call(listen, "k", vec![data(echo_frame("x", 0))]).await;
    assert_eq!(first.grpc_status().as_deref(), Some("5"));
    assert_eq!(retry.grpc_status().as_deref(), Some("5"), "{retry:?}");
    assert_eq!(retry.header("grpc-message").as_deref(), Some("no such order"));
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // An error whose metadata is not text: not kept rather than changed, and
    // never run again.
    let (addr, runs) = start_h2_upstream(Reads::Whole, Duration::ZERO, move |_| {
        let raw = hyper::header::HeaderValue::from_bytes(b"caf\xe9").unwrap();
        grpc().header("grpc-status", "5").header("x-raw", raw).body(frames_body([])).unwrap()
    })
    .await;
    let envoy = start_envoy("hostile-obs-text", addr, ECHO_DEDUP).unwrap();
    let listen = envoy.params().listen_addr();
    assert_eq!(call(listen, "k", vec![data(echo_frame("x", 0))]).await.grpc_status().as_deref(), Some("5"));
    let retry = call(listen, "k", vec![data(echo_frame("x", 0))]).await;
    assert_eq!(retry.grpc_status().as_deref(), Some("6"), "ALREADY_EXISTS: {retry:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_of_a_huge_request_is_replayed_without_being_held_in_memory() {
    let upstream = Upstream::start().await;
    let envoy = start_envoy("hostile-huge", upstream.addr, ECHO_DEDUP).unwrap();
    let addr = envoy.params().listen_addr();
    // A small message whose bulk is an unknown field (the service ignores
    // it): the OK answer is small and kept; the retry is 17 MiB.
    let body = padded_echo_frame(17 << 20);
    let first = call(addr, "big", vec![data(body.clone())]).await;
    let retry = call(addr, "big", vec![data(body)]).await;
    assert_eq!(first.grpc_status().as_deref(), Some("0"));
    assert!(replayed(&retry), "{:?}", (retry.status, &retry.headers, &retry.trailers));
    assert_eq!(retry.body, first.body);
    assert_eq!(upstream.observed.executions("Echo"), 1);
}

/// Envoy takes only `application/grpc` and `application/grpc+…` (as
/// written) for gRPC; grpc-guard guards the other spellings gRPC servers
/// execute too, and its answers carry their status in `grpc-status`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_type_envoy_does_not_take_for_grpc_still_gets_grpc_answers() {
    let upstream = Upstream::start().await;
    let config = r#"{"dedup":{"methods":["grpcguard.demo.v1.Demo/Echo"],"require_key":true}}"#;
    let envoy = start_envoy("hostile-content-type", upstream.addr, config).unwrap();
    let addr = envoy.params().listen_addr();
    for content_type in ["application/grpc", "Application/GRPC", "application/grpc;charset=utf-8"] {
        let headers = [("content-type", content_type), ("te", "trailers")];
        let s = h2_stream(addr, None, ECHO_PATH, &headers, vec![data(echo_frame("x", 0))], true).await;
        let answer = s.answer.await.unwrap().unwrap();
        assert_eq!(answer.grpc_status().as_deref(), Some("3"), "{content_type}: {answer:?}");
        assert!(answer.header("grpc-message").is_some_and(|m| m.contains("idempotency-key")), "{answer:?}");
    }
    assert_eq!(upstream.observed.executions("Echo"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_compressed_otherwise_is_a_different_request_and_never_runs() {
    use grpc_guard_demo::pb::demo_client::DemoClient;
    use tonic::codec::CompressionEncoding;
    let upstream = Upstream::start().await;
    let envoy = start_envoy("hostile-gzip-retry", upstream.addr, ECHO_DEDUP).unwrap();
    let channel = grpc_guard_demo::lazy_channel(&envoy.grpc_uri()).unwrap();
    let message = EchoRequest { message: "create order 1 ".repeat(20), ..Default::default() };
    let mut plain = DemoClient::new(channel.clone());
    let mut gzip = DemoClient::new(channel).send_compressed(CompressionEncoding::Gzip);
    let caller = grpc_guard_tests::e2e::CALLER;
    assert!(plain.echo(grpc_guard_tests::e2e::keyed(message.clone(), "gz", caller)).await.is_ok());
    let retry = gzip.echo(grpc_guard_tests::e2e::keyed(message, "gz", caller)).await;
    assert_eq!(retry.map_err(|s| s.code()).err(), Some(tonic::Code::InvalidArgument), "other bytes, another request");
    assert_eq!(upstream.observed.executions("Echo"), 1);
}

/// Waits until the upstream has counted `n` requests.
async fn until_runs(runs: &std::sync::atomic::AtomicU64, n: u64) {
    for _ in 0..100 {
        if runs.load(Ordering::SeqCst) >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the upstream never got the request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_after_a_whole_message_and_a_stray_byte_keeps_the_key() {
    // The upstream acts on the message; the next message's first byte
    // rode in the same DATA frame. The client gives up before the answer.
    let (up, runs) = start_acting_upstream(Duration::from_secs(30)).await;
    let envoy = start_envoy("hostile-stray-byte", up, ECHO_DEDUP).unwrap();
    let addr = envoy.params().listen_addr();
    let mut chunk = echo_frame("charge 10", 0);
    chunk.push(0);
    let first = h2_stream(addr, None, ECHO_PATH, &keyed_headers("stray", "Bearer a"), vec![data(chunk)], false).await;
    until_runs(&runs, 1).await;
    first.answer.abort();
    drop(first.open);
    // Refused without running: the same request again is told the first
    // may have run; this one, without the stray byte, is another request.
    let same = retry(addr, "stray", &[echo_frame("charge 10", 0), vec![0]].concat()).await;
    assert_eq!(same.grpc_status().as_deref(), Some("9"), "may have run: {same:?}");
    let retry = call(addr, "stray", vec![data(echo_frame("charge 10", 0))]).await;
    assert_eq!(retry.grpc_status().as_deref(), Some("3"), "{retry:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the retry must not run again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_guards_own_refusal_after_a_message_went_on_keeps_the_key() {
    // The first message went on and the upstream acted on it; then the
    // request broke a rule (a frame that is not gRPC, a message over the
    // limit) and grpc-guard answered the client itself.
    let config = r#"{"dedup":{"methods":["grpcguard.demo.v1.Demo/Echo"]},"limits":{"max_request_message_bytes":64}}"#;
    for (name, second) in [("bad-frame", vec![0xff, 0, 0, 0, 0]), ("too-large", echo_frame(&"x".repeat(100), 0))] {
        let (up, runs) = start_acting_upstream(Duration::from_secs(2)).await;
        let envoy = start_envoy(&format!("hostile-refused-after-{name}"), up, config).unwrap();
        let addr = envoy.params().listen_addr();
        let first = h2_stream(
            addr,
            None,
            ECHO_PATH,
            &keyed_headers("g", "Bearer a"),
            vec![data(echo_frame("charge 10", 0))],
            false,
        )
        .await;
        until_runs(&runs, 1).await;
        first.open.as_ref().unwrap().send(data(second)).unwrap();
        let answer = first.answer.await.unwrap().expect("an answer");
        assert!(matches!(answer.grpc_status().as_deref(), Some("8" | "13")), "{name}: {answer:?}");
        // Refused without running. (It is not the request the first call
        // sent, which had more after the message: "reused with a different
        // request".)
        let retry = retry(addr, "g", &echo_frame("charge 10", 0)).await;
        assert_eq!(retry.grpc_status().as_deref(), Some("3"), "{name}: {retry:?}");
        assert_eq!(runs.load(Ordering::SeqCst), 1, "{name}: the retry must not run again");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_from_the_headers_alone_leaves_the_key_free_for_the_whole_request() {
    // Like grpc-go for a method it does not know: UNIMPLEMENTED at once,
    // before the body is in. Nothing ran; the same request again gets the
    // same answer, not "reused with a different request".
    let (up, runs) = start_h2_upstream(Reads::Nothing, Duration::ZERO, |_| {
        hyper::Response::builder()
            .status(200)
            .header("content-type", "application/grpc")
            .header("grpc-status", "12")
            .header("grpc-message", "unknown method")
            .body(frames_body([]))
            .unwrap()
    })
    .await;
    let envoy = start_envoy("hostile-headers-only-answer", up, ECHO_DEDUP).unwrap();
    let addr = envoy.params().listen_addr();
    let whole = echo_frame(&"order 1 ".repeat(10), 0);
    let first =
        h2_stream(addr, None, ECHO_PATH, &keyed_headers("e", "Bearer a"), vec![data(whole[..20].to_vec())], false)
            .await;
    let answer = first.answer.await.unwrap().expect("an answer");
    assert_eq!(answer.grpc_status().as_deref(), Some("12"));
    let _ = first.open.unwrap().send(data(whole[20..].to_vec()));
    let retry = retry(addr, "e", &whole).await;
    assert_eq!(retry.grpc_status().as_deref(), Some("12"), "{retry:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 2, "asked again, as nothing ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tonics_too_large_answer_leaves_the_key_free_for_the_same_request() {
    // tonic answers OUT_OF_RANGE from a message's prefix when the message
    // is over its decoding limit, while the body still streams.
    let upstream = Upstream::start().await;
    let envoy = start_envoy("hostile-tonic-too-large", upstream.addr, ECHO_DEDUP).unwrap();
    let addr = envoy.params().listen_addr();
    let body = padded_echo_frame(grpc_guard_demo::MAX_MESSAGE_BYTES + (1 << 20));
    let first = call(addr, "oor", vec![data(body.clone())]).await;
    let retry = call(addr, "oor", vec![data(body)]).await;
    assert_eq!(first.grpc_status().as_deref(), Some("11"), "{first:?}");
    assert_eq!(retry.grpc_status().as_deref(), Some("11"), "the same answer again: {retry:?}");
    assert_eq!(upstream.observed.executions("Echo"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_that_names_the_service_another_way_is_still_a_retry() {
    let upstream = Upstream::start().await;
    let envoy = start_envoy("hostile-same-key-other-authority", upstream.addr, ECHO_DEDUP).unwrap();
    let addr = envoy.params().listen_addr();
    let mut answers = Vec::new();
    for authority in ["orders", "orders.shop.svc.cluster.local"] {
        let frames = vec![data(echo_frame("charge 10", 0))];
        let s = h2_stream(addr, Some(authority), ECHO_PATH, &keyed_headers("auth-k", "Bearer a"), frames, true).await;
        answers.push(s.answer.await.unwrap().expect("an answer"));
    }
    assert!(replayed(&answers[1]), "{answers:?}");
    assert_eq!(upstream.observed.executions("Echo"), 1, "same key, caller and method ran twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_that_declares_its_content_length_is_replayed() {
    // The retry's body is emptied on its way to the replay hop; a declared
    // length left in place would have the hop wait for bytes never sent.
    let upstream = Upstream::start().await;
    let envoy = start_envoy("hostile-content-length", upstream.addr, ECHO_DEDUP).unwrap();
    let addr = envoy.params().listen_addr();
    let body = echo_frame("charge 10", 0);
    let length = body.len().to_string();
    let mut headers = keyed_headers("cl", "Bearer a");
    headers.push(("content-length", &length));
    let mut answers = Vec::new();
    for _ in 0..2 {
        let s = h2_stream(addr, None, ECHO_PATH, &headers, vec![data(body.clone())], true).await;
        let answer = tokio::time::timeout(Duration::from_secs(5), s.answer).await.expect("an answer in time");
        answers.push(answer.unwrap().expect("an answer"));
    }
    assert_eq!(answers[0].grpc_status().as_deref(), Some("0"), "{answers:?}");
    assert!(replayed(&answers[1]), "{answers:?}");
    assert_eq!(upstream.observed.executions("Echo"), 1);
}
