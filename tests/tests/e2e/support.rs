//! Reading the Prometheus exposition the way a scraper does, and the upstreams
//! only these tests need; the demo upstream and Envoy come from
//! `grpc_guard_tests::e2e`, shared with the deployment tests.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use grpc_guard_demo::envoy::Envoy;
pub use grpc_guard_tests::e2e::*;
use tokio::net::TcpListener;

/// Scrapes until `check` holds (histograms appear at Envoy's next stats flush,
/// counters at once) or 10 s pass; returns the last scrape either way.
pub async fn scrape_until(envoy: &Envoy, check: impl Fn(&[Sample]) -> bool) -> Vec<Sample> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let samples = parse_exposition(&envoy.prometheus().unwrap());
        if check(&samples) || Instant::now() > deadline {
            return samples;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// grpc-guard's JSON log lines, once `n` of them are there (or after 10 s).
pub async fn call_logs(envoy: &Envoy, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines = envoy.call_logs();
        if lines.len() >= n || Instant::now() > deadline {
            return lines
                .iter()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l}")))
                .collect();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub const DEMO_SERVICE: &str = "grpcguard.demo.v1.Demo";

/// A plain HTTP/2 (h2c) upstream built on hyper that answers every request
/// with `status`, echoing the request body, for the cases a gRPC server never
/// produces: an HTTP error without `grpc-status`, and non-gRPC traffic.
pub async fn start_plain_http(status: u16) -> SocketAddr {
    start_plain_http_after(status, std::time::Duration::ZERO).await
}

/// Like [`start_plain_http`], answering only after `delay`: an upstream that
/// ignores `grpc-timeout`, as many servers do, so only Envoy can end the call.
pub async fn start_plain_http_after(status: u16, delay: std::time::Duration) -> SocketAddr {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<Incoming>| async move {
                    let seen_type = req.headers().get("content-type").cloned();
                    let body = req.into_body().collect().await?.to_bytes();
                    tokio::time::sleep(delay).await;
                    let mut response = hyper::Response::builder().status(status).header("x-upstream", "plain-http");
                    if let Some(ct) = seen_type {
                        response = response.header("x-seen-content-type", ct);
                    }
                    Ok::<_, hyper::Error>(response.body(Full::new(body)).unwrap())
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    addr
}

/// gRPC PROTOCOL-HTTP2 `Length-Prefixed-Message`, uncompressed.
pub fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    out.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// What a raw HTTP/2 request got back.
#[derive(Debug)]
pub struct H2Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub trailers: Vec<(String, String)>,
}

impl H2Answer {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
    }

    /// `grpc-status` from the trailers, or from the headers of a
    /// trailers-only answer.
    pub fn grpc_status(&self) -> Option<String> {
        self.trailers.iter().find(|(n, _)| n == "grpc-status").map(|(_, v)| v.clone()).or(self.header("grpc-status"))
    }
}

/// A POST over HTTP/2 (prior knowledge, no TLS) with exactly these headers
/// and body: what a gRPC client library will not send.
pub async fn h2_post(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &[u8]) -> H2Answer {
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(connection);
    let mut request = hyper::Request::builder().method("POST").uri(format!("http://{addr}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response =
        sender.send_request(request.body(Full::new(hyper::body::Bytes::from(body.to_vec()))).unwrap()).await.unwrap();
    let pairs = |map: &hyper::HeaderMap| -> Vec<(String, String)> {
        map.iter().map(|(n, v)| (n.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned())).collect()
    };
    let status = response.status().as_u16();
    let headers = pairs(response.headers());
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().map(pairs).unwrap_or_default();
    H2Answer { status, headers, body: collected.to_bytes().to_vec(), trailers }
}

/// An HTTP/2 upstream that reads each request whole, starts a gRPC answer
/// and then resets the stream: the call may well have run. Counts requests.
pub async fn start_resetting_upstream() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use http_body_util::BodyExt;
    use hyper::body::{Bytes, Frame, Incoming};
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use std::pin::Pin;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Poll};

    /// A body that fails at once: hyper resets the stream.
    struct Reset;
    impl hyper::body::Body for Reset {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            Poll::Ready(Some(Err(std::io::Error::other("the upstream gives up mid-answer"))))
        }
    }

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicU64::new(0));
    let counted = requests.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<Incoming>| {
                    let counted = counted.clone();
                    async move {
                        req.into_body().collect().await?;
                        counted.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, hyper::Error>(
                            hyper::Response::builder()
                                .status(200)
                                .header("content-type", "application/grpc")
                                .body(Reset)
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (addr, requests)
}

/// RFC 4648 §5 base64url, unpadded, as JWTs and JWKs use it.
pub fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// An HS256 JWT (RFC 7519) from `issuer` for `subject`, signed with `key`
/// (HMAC-SHA256, RFC 2104).
pub fn hs256_jwt(key: &[u8], issuer: &str, subject: &str) -> String {
    let header = base64url(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = base64url(format!(r#"{{"iss":"{issuer}","sub":"{subject}","exp":4102444800}}"#).as_bytes());
    let signing_input = format!("{header}.{claims}");
    format!("{signing_input}.{}", base64url(&hmac_sha256(key, signing_input.as_bytes())))
}

/// HMAC-SHA256 (RFC 2104) with a key of at most 64 bytes.
pub fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut block = [0u8; 64];
    block[..key.len()].copy_from_slice(key);
    let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new().chain_update(pad(0x36)).chain_update(data).finalize();
    Sha256::new().chain_update(pad(0x5c)).chain_update(inner).finalize().to_vec()
}

#[test]
fn base64url_and_hmac_match_published_vectors() {
    assert_eq!(base64url(b"f"), "Zg");
    assert_eq!(base64url(b"fo"), "Zm8");
    assert_eq!(base64url(b"foobar"), "Zm9vYmFy");
    // RFC 7515 appendix A.1's payload encoding.
    assert_eq!(base64url(&[123, 34, 105, 115, 115, 34]), "eyJpc3Mi");
    // RFC 4231 test case 2.
    let mac: String =
        hmac_sha256(b"Jefe", b"what do ya want for nothing?").iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(mac, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
}

/// A request body fed frame by frame (data or trailers) from a channel;
/// dropping the sender ends the stream.
pub struct ChannelBody(pub tokio::sync::mpsc::UnboundedReceiver<hyper::body::Frame<hyper::body::Bytes>>);

impl hyper::body::Body for ChannelBody {
    type Data = hyper::body::Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<hyper::body::Bytes>, std::convert::Infallible>>> {
        self.0.poll_recv(cx).map(|f| f.map(Ok))
    }
}

/// A body of these frames, then its end.
pub fn frames_body(frames: impl IntoIterator<Item = hyper::body::Frame<hyper::body::Bytes>>) -> ChannelBody {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    for frame in frames {
        let _ = tx.send(frame);
    }
    ChannelBody(rx)
}

/// One raw HTTP/2 request in flight: `frames` are sent at once; with `end`
/// the stream then ends, otherwise `open` keeps it open until dropped.
pub struct Streamed {
    pub open: Option<tokio::sync::mpsc::UnboundedSender<hyper::body::Frame<hyper::body::Bytes>>>,
    pub answer: tokio::task::JoinHandle<Option<H2Answer>>,
}

pub async fn h2_stream(
    addr: SocketAddr,
    authority: Option<&str>,
    path: &str,
    headers: &[(&str, &str)],
    frames: Vec<hyper::body::Frame<hyper::body::Bytes>>,
    end: bool,
) -> Streamed {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(connection);
    let host = authority.map(str::to_owned).unwrap_or_else(|| addr.to_string());
    let mut request = hyper::Request::builder().method("POST").uri(format!("http://{host}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    for frame in frames {
        tx.send(frame).unwrap();
    }
    let open = if end { None } else { Some(tx) };
    let request = request.body(ChannelBody(rx)).unwrap();
    let answer = tokio::spawn(async move {
        use http_body_util::BodyExt;
        let response = sender.send_request(request).await.ok()?;
        let pairs = |map: &hyper::HeaderMap| -> Vec<(String, String)> {
            map.iter().map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().escape_ascii().to_string())).collect()
        };
        let status = response.status().as_u16();
        let headers = pairs(response.headers());
        let collected = response.into_body().collect().await.ok()?;
        let trailers = collected.trailers().map(pairs).unwrap_or_default();
        Some(H2Answer { status, headers, body: collected.to_bytes().to_vec(), trailers })
    });
    Streamed { open, answer }
}

/// Bytes as a DATA frame of a raw HTTP/2 body.
pub fn data(bytes: Vec<u8>) -> hyper::body::Frame<hyper::body::Bytes> {
    hyper::body::Frame::data(hyper::body::Bytes::from(bytes))
}

/// Request trailers as a body frame.
pub fn trailers_frame(pairs: &[(&str, &str)]) -> hyper::body::Frame<hyper::body::Bytes> {
    let mut map = hyper::HeaderMap::new();
    for (name, value) in pairs {
        map.append(hyper::header::HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
    }
    hyper::body::Frame::trailers(map)
}

/// How much of a request an [`start_h2_upstream`] reads before it counts
/// the request and answers.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Reads {
    /// None of the body: it answers from the headers.
    Nothing,
    /// The first DATA frame, as grpc-go's unary path runs on the message.
    FirstFrame,
    /// The whole body.
    Whole,
}

/// Serves each connection accepted on a free loopback port with `serve`,
/// which is handed the request counter both upstreams return.
async fn accept_counted<F, Fut>(serve: F) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicU64>)
where
    F: Fn(tokio::net::TcpStream, std::sync::Arc<std::sync::atomic::AtomicU64>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = requests.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(serve(tcp, counted.clone()));
        }
    });
    (addr, requests)
}

/// An HTTP/2 upstream that answers every request with what `respond` builds
/// from the request's count (1 for the first) after reading what `reads`
/// says and working for `work`; counts requests.
pub async fn start_h2_upstream<F>(
    reads: Reads,
    work: Duration,
    respond: F,
) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicU64>)
where
    F: Fn(u64) -> hyper::Response<ChannelBody> + Send + Sync + Clone + 'static,
{
    use http_body_util::BodyExt;
    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use std::sync::atomic::Ordering;

    accept_counted(move |tcp, counted| {
        let respond = respond.clone();
        async move {
            let service = service_fn(move |req: hyper::Request<Incoming>| {
                let (counted, respond) = (counted.clone(), respond.clone());
                async move {
                    let mut body = req.into_body();
                    match reads {
                        Reads::Nothing => {}
                        Reads::FirstFrame => {
                            let _ = body.frame().await;
                        }
                        Reads::Whole => {
                            let _ = body.collect().await;
                        }
                    }
                    let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
                    tokio::time::sleep(work).await;
                    Ok::<_, std::convert::Infallible>(respond(n))
                }
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        }
    })
    .await
}

/// Asserts that grpc-guard's VM never trapped in `envoy`. What Envoy 1.40
/// writes when it does (seen with a probe module whose
/// `proxy_on_request_headers` panics):
///
/// ```text
/// [critical][wasm] ... wasm log grpc_guard grpc_guard grpc_guard: panicked at ...
/// [error][wasm] [source/extensions/common/wasm/wasm_vm.cc:38] Function: proxy_on_request_headers failed: Uncaught RuntimeError: unreachable
/// ```
///
/// (the first from the Rust SDK's panic hook, the second from the VM), and
/// from then on that worker answers every call `grpc-status: 14` with
/// response details `wasm_fail_stream` in the access log. The filter itself
/// logs at error level only for a configuration it refuses, which a running
/// Envoy has not.
pub fn assert_no_vm_trap(envoy: &Envoy) {
    let traps = vm_traps(envoy);
    assert!(traps.is_empty(), "the filter's VM trapped:\n{}", traps.join("\n"));
}

/// The lines of Envoy's logs that show a VM trap ([`assert_no_vm_trap`]).
pub fn vm_traps(envoy: &Envoy) -> Vec<String> {
    let vm = envoy.log_lines().filter(|l| {
        l.contains("[critical][wasm]")
            || l.contains("[error][wasm]")
            || (l.contains("Function: ") && l.contains(" failed"))
            || l.contains("Uncaught RuntimeError")
    });
    let failed_streams = envoy.access_log_lines().into_iter().filter(|l| l.contains("wasm_fail"));
    vm.chain(failed_streams).collect()
}

/// grpc-guard's JSON log lines with the Envoy thread that wrote each: the
/// worker that served the call.
pub fn call_logs_by_worker(envoy: &Envoy) -> Vec<(String, serde_json::Value)> {
    const MARKER: &str = "wasm log grpc_guard grpc_guard grpc_guard: {";
    envoy
        .log_lines()
        .filter_map(|line| {
            let json = &line[line.find(MARKER)? + MARKER.len() - 1..];
            // `[date][thread][level][logger] ...`
            let thread = line.split("][").nth(1)?.to_owned();
            Some((thread, serde_json::from_str(json).unwrap_or_else(|e| panic!("log line is not JSON ({e}): {json}"))))
        })
        .collect()
}

/// Ordinary tonic Echo calls, each on a new connection (so the kernel
/// spreads them over Envoy's workers), until every worker has answered at
/// least one OK and at least four calls were made. A worker whose VM
/// trapped answers every later call UNAVAILABLE. Needs `log.ok_sample: 1`:
/// the log line tells which worker answered. `after` names what came before,
/// for the failure message.
pub async fn assert_workers_serve(envoy: &Envoy, after: &str) {
    if let Err(e) = workers_serve(envoy, after).await {
        panic!("{e}");
    }
}

/// [`assert_workers_serve`], telling what went wrong instead of panicking.
pub async fn workers_serve(envoy: &Envoy, after: &str) -> Result<(), String> {
    use grpc_guard_demo::pb::EchoRequest;
    let mut workers = std::collections::BTreeSet::new();
    for i in 0..32 {
        let id = format!("alive-{}-{i}", after.replace(|c: char| !c.is_ascii_alphanumeric(), "-"));
        let mut client =
            grpc_guard_demo::connect(&envoy.grpc_uri()).await.map_err(|e| format!("after {after}: {e}"))?;
        let mut request = tonic::Request::new(EchoRequest { message: "alive?".into(), ..Default::default() });
        request.metadata_mut().insert("x-request-id", id.parse().expect("ASCII"));
        if let Err(status) = client.echo(request).await {
            return Err(format!("after {after}: ordinary call {i} failed: {status:?}"));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let worker = loop {
            let line = call_logs_by_worker(envoy).into_iter().find(|(_, l)| l["request_id"] == id.as_str());
            if let Some((worker, line)) = line {
                if line["grpc_code"] != "OK" {
                    return Err(format!("after {after}: ordinary call {i} was logged {line}"));
                }
                break worker;
            }
            if Instant::now() > deadline {
                return Err(format!("after {after}: ordinary call {i} was never logged"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        workers.insert(worker);
        if workers.len() == CONCURRENCY as usize && i >= 3 {
            return Ok(());
        }
    }
    Err(format!("after {after}: 32 new connections reached only the workers {workers:?}"))
}

/// grpc-guard's counters in one scrape, each under a short readable name:
/// `handled{Echo,InvalidArgument}` for
/// `grpc_server_handled_total{grpc_method="Echo",grpc_code="InvalidArgument",…}`,
/// `bad_frames` for `grpc_guard_bad_frames_total`.
pub fn guard_counters(samples: &[Sample]) -> BTreeMap<String, f64> {
    samples
        .iter()
        .filter_map(|s| {
            let family = s.name.strip_suffix("_total")?;
            let family = family.strip_prefix("grpc_server_").or_else(|| family.strip_prefix("grpc_guard_"))?;
            let labels: Vec<&str> =
                ["grpc_method", "grpc_code"].iter().filter_map(|l| s.labels.get(*l).map(String::as_str)).collect();
            let name = if labels.is_empty() { family.to_owned() } else { format!("{family}{{{}}}", labels.join(",")) };
            Some((name, s.value))
        })
        .collect()
}

/// What changed between two [`guard_counters`]: `"handled{Echo,OK} +1"`, sorted.
pub fn counter_changes(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> Vec<String> {
    after
        .iter()
        .filter_map(|(name, value)| {
            let change = value - before.get(name).copied().unwrap_or(0.0);
            (change != 0.0).then(|| format!("{name} {change:+}"))
        })
        .collect()
}

/// What a raw HTTP/2 call ([`h2_call`]) got back: the response head if one
/// came, the body, the trailers, and the reset that ended it, if any.
#[derive(Debug, Default)]
pub struct RawAnswer {
    pub status: Option<u16>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub trailers: Vec<(String, String)>,
    /// The HTTP/2 error code of a reset (`CANCEL`, `INTERNAL_ERROR`, …), or
    /// what else ended the stream early.
    pub reset: Option<String>,
}

impl RawAnswer {
    /// Every value of `name`, trailers first, joined by `,`.
    pub fn values(&self, name: &str) -> Option<String> {
        let values: Vec<&str> =
            self.trailers.iter().chain(&self.headers).filter(|(n, _)| n == name).map(|(_, v)| v.as_str()).collect();
        (!values.is_empty()).then(|| values.join(","))
    }

    /// What the client got, in a few words: `HTTP 200, grpc-status 3`,
    /// `HTTP 431`, `HTTP 200, then reset (INTERNAL_ERROR)`, `reset (CANCEL)`.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if let Some(status) = self.status {
            parts.push(format!("HTTP {status}"));
        }
        if let Some(grpc) = self.values("grpc-status") {
            parts.push(format!("grpc-status {grpc}"));
        }
        match (&self.reset, parts.is_empty()) {
            (Some(reset), true) => format!("reset ({reset})"),
            (Some(reset), false) => format!("{}, then reset ({reset})", parts.join(", ")),
            (None, _) => parts.join(", "),
        }
    }
}

fn header_pairs(map: &hyper::HeaderMap) -> Vec<(String, String)> {
    map.iter().map(|(n, v)| (n.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned())).collect()
}

fn h2_reason(e: &h2::Error) -> String {
    match e.reason() {
        Some(reason) => format!("{reason:?}"),
        None => e.to_string(),
    }
}

/// One HTTP/2 stream opened at the h2 level: what the test sends on it
/// (`body`: DATA frames, END_STREAM, RST_STREAM) and what comes back.
pub struct RawCall {
    pub body: h2::SendStream<hyper::body::Bytes>,
    pub answer: tokio::task::JoinHandle<RawAnswer>,
}

/// Opens a POST stream to `path` on a new connection with exactly these
/// headers (values as bytes: obs-text is allowed, control bytes are not
/// encodable), END_STREAM not sent.
pub async fn h2_call(addr: SocketAddr, path: &str, headers: &[(&str, Vec<u8>)]) -> RawCall {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut sender = sender.ready().await.unwrap();
    let mut request = hyper::Request::builder().method("POST").uri(format!("http://{addr}{path}"));
    for (name, value) in headers {
        request = request.header(*name, hyper::header::HeaderValue::from_bytes(value).unwrap());
    }
    let (response, body) = sender.send_request(request.body(()).unwrap(), false).unwrap();
    let answer = tokio::spawn(async move {
        let mut answer = RawAnswer::default();
        let response = match response.await {
            Ok(response) => response,
            Err(e) => {
                answer.reset = Some(h2_reason(&e));
                return answer;
            }
        };
        answer.status = Some(response.status().as_u16());
        answer.headers = header_pairs(response.headers());
        let mut stream = response.into_body();
        while let Some(chunk) = stream.data().await {
            match chunk {
                Ok(bytes) => {
                    let _ = stream.flow_control().release_capacity(bytes.len());
                    answer.body.extend_from_slice(&bytes);
                }
                Err(e) => {
                    answer.reset = Some(h2_reason(&e));
                    return answer;
                }
            }
        }
        match stream.trailers().await {
            Ok(trailers) => answer.trailers = trailers.as_ref().map(header_pairs).unwrap_or_default(),
            Err(e) => answer.reset = Some(h2_reason(&e)),
        }
        answer
    });
    RawCall { body, answer }
}

/// Reads a request body whole (as far as its END_STREAM), giving flow
/// control back as it goes.
pub async fn read_h2_body(body: &mut h2::RecvStream) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
    }
    out
}

/// Closes the TCP connection of the request it was handed with: an
/// upstream that goes away mid-call.
#[derive(Clone)]
pub struct Hangup(std::sync::Arc<tokio::sync::Notify>);

impl Hangup {
    pub fn now(&self) {
        self.0.notify_one();
    }
}

/// An HTTP/2 upstream at the h2 level, for answers hyper will not give: a
/// 1xx before the answer, a reset or a dropped connection at a chosen
/// point. `handle` gets each request, its response handle and a [`Hangup`]
/// for its connection. Counts requests.
pub async fn start_raw_upstream<F, Fut>(handle: F) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicU64>)
where
    F: Fn(hyper::Request<h2::RecvStream>, h2::server::SendResponse<hyper::body::Bytes>, Hangup) -> Fut
        + Clone
        + Send
        + Sync
        + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    accept_counted(move |tcp, counted| {
        let handle = handle.clone();
        async move {
            let Ok(mut connection) = h2::server::handshake(tcp).await else { return };
            let hangup = Hangup(Arc::new(tokio::sync::Notify::new()));
            loop {
                tokio::select! {
                    next = connection.accept() => match next {
                        Some(Ok((request, respond))) => {
                            counted.fetch_add(1, Ordering::SeqCst);
                            tokio::spawn(handle(request, respond, hangup.clone()));
                        }
                        _ => break,
                    },
                    // Dropping the connection closes the socket: no
                    // GOAWAY, no RST_STREAM, just gone.
                    _ = hangup.0.notified() => break,
                }
            }
        }
    })
    .await
}

/// What a connection written byte by byte got back for one request.
#[derive(Debug, PartialEq, Eq)]
pub enum RawOutcome {
    /// Response headers came for the stream.
    Answered,
    /// RST_STREAM with this error code.
    StreamReset(u32),
    /// GOAWAY with this error code, or the socket closed with no answer.
    ConnectionClosed,
}

/// Writes one HTTP/2 request by hand, header block and all (HPACK literals,
/// no Huffman): header values that no HTTP/2 library will encode, such as
/// control bytes. Returns what came back for the stream, and the peer's
/// SETTINGS_MAX_CONCURRENT_STREAMS if it sent one.
pub async fn h2_handwritten(addr: SocketAddr, headers: &[(&[u8], &[u8])], body: &[u8]) -> (RawOutcome, Option<u32>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn integer(out: &mut Vec<u8>, mut n: usize) {
        // RFC 7541 §5.1 with a 7-bit prefix, H bit clear.
        if n < 127 {
            out.push(n as u8);
            return;
        }
        out.push(127);
        n -= 127;
        while n >= 128 {
            out.push((n % 128) as u8 | 0x80);
            n /= 128;
        }
        out.push(n as u8);
    }
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.extend([kind, flags]);
        out.extend(stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }
    let mut block = Vec::new();
    for (name, value) in headers {
        // RFC 7541 §6.2.2: literal header field without indexing, new name.
        block.push(0);
        integer(&mut block, name.len());
        block.extend_from_slice(name);
        integer(&mut block, value.len());
        block.extend_from_slice(value);
    }
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend(frame(4, 0, 0, &[]));
    bytes.extend(frame(1, 0x4, 1, &block));
    bytes.extend(frame(0, 0x1, 1, body));
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(&bytes).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 16384];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut max_streams = None;
    loop {
        let mut at = 0;
        while seen.len() >= at + 9 {
            let len = usize::from(seen[at]) << 16 | usize::from(seen[at + 1]) << 8 | usize::from(seen[at + 2]);
            if seen.len() < at + 9 + len {
                break;
            }
            let (kind, flags) = (seen[at + 3], seen[at + 4]);
            let stream = u32::from_be_bytes(seen[at + 5..at + 9].try_into().unwrap()) & 0x7fff_ffff;
            let payload = &seen[at + 9..at + 9 + len];
            let code = || u32::from_be_bytes(payload[..4].try_into().unwrap());
            match (kind, stream) {
                (4, 0) if flags & 1 == 0 => {
                    for setting in payload.chunks_exact(6) {
                        if setting[..2] == [0, 3] {
                            max_streams = Some(u32::from_be_bytes(setting[2..].try_into().unwrap()));
                        }
                    }
                }
                (1, 1) => return (RawOutcome::Answered, max_streams),
                (3, 1) => return (RawOutcome::StreamReset(code()), max_streams),
                (7, 0) => return (RawOutcome::ConnectionClosed, max_streams),
                _ => {}
            }
            at += 9 + len;
        }
        seen.drain(..at);
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => seen.extend_from_slice(&buf[..n]),
            Ok(_) => return (RawOutcome::ConnectionClosed, max_streams),
            Err(_) => panic!("no answer, reset or close in 5 s"),
        }
    }
}
