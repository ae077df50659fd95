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

/// One sample of the exposition: name, labels, value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the Prometheus text format (the subset Envoy writes).
pub fn parse_exposition(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}')?)),
                None => (series, BTreeMap::new()),
            };
            Some(Sample { name: name.to_owned(), labels, value })
        })
        .collect()
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let end = after.find('"').unwrap_or(after.len());
        labels.insert(key.trim_start_matches(',').to_owned(), after[..end].to_owned());
        rest = &after[(end + 1).min(after.len())..];
    }
    labels
}

/// The value of the series `name` whose labels include all of `labels`.
pub fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .map(|s| s.value)
}

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
