//! Reading the Prometheus exposition the way a scraper does, and the upstreams
//! only these tests need; the demo upstream and Envoy come from
//! `grpc_guard_tests::e2e`, shared with the deployment tests.

#![allow(dead_code)]

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
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicU64::new(0));
    let counted = requests.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (counted, respond) = (counted.clone(), respond.clone());
            tokio::spawn(async move {
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
            });
        }
    });
    (addr, requests)
}
