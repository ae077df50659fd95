//! Istio's metrics merging with an application that has its own
//! go-grpc-prometheus metrics. istio-agent serves one scrape on
//! `:15020/stats/prometheus` (pilot/cmd/pilot-agent/status/server.go,
//! handleStats): its own metrics, then Envoy's `/stats/prometheus`, then the
//! application's `/metrics`, concatenated without parsing, under the
//! application's content type. The application's series have grpc-guard's
//! names and labels, so without the `exporter` label one side's samples would
//! be dropped as duplicates. Here a loopback server concatenates, at each
//! scrape, a real Envoy's exposition after known calls and an application's
//! in go-grpc-prometheus' format (its own `# HELP` and `# TYPE` lines, the
//! same `# TYPE` lines Envoy wrote), and a real Prometheus scrapes it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use grpc_guard_demo::pb::EchoRequest;

use crate::prometheus::{query, start_prometheus_with_jobs};
use crate::support::*;

const SERVICE: &str = "grpcguard.demo.v1.Demo";
/// The application counts this many OK calls of Echo per scrape, and a tenth
/// as many NotFound: far more than grpc-guard sees in the test, so the sides
/// cannot be mistaken for each other.
const APP_OK_PER_SCRAPE: u64 = 1000;

/// What an application instrumented with go-grpc-prometheus serves on
/// `/metrics` after `scrapes` scrapes: client_golang's text format (HELP and
/// TYPE per family, labels sorted by name), or with `openmetrics` its
/// OpenMetrics form (families named without `_total`, `# EOF` at the end).
fn app_exposition(scrapes: u64, openmetrics: bool) -> String {
    let ok = APP_OK_PER_SCRAPE * scrapes;
    let not_found = ok / 10;
    let labels = |code: Option<&str>| {
        let code = code.map(|c| format!("grpc_code=\"{c}\",")).unwrap_or_default();
        format!(r#"{{{code}grpc_method="Echo",grpc_service="{SERVICE}",grpc_type="unary"}}"#)
    };
    let family = |name: &str, help: &str, samples: &[(String, u64)]| {
        let family = if openmetrics { name.trim_end_matches("_total") } else { name };
        let mut text = format!("# HELP {family} {help}\n# TYPE {family} counter\n");
        for (labels, value) in samples {
            text.push_str(&format!("{name}{labels} {value}\n"));
        }
        text
    };
    [
        family(
            "grpc_server_handled_total",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            &[(labels(Some("NotFound")), not_found), (labels(Some("OK")), ok)],
        ),
        family(
            "grpc_server_msg_received_total",
            "Total number of RPC stream messages received on the server.",
            &[(labels(None), ok + not_found)],
        ),
        family(
            "grpc_server_msg_sent_total",
            "Total number of gRPC stream messages sent by the server.",
            &[(labels(None), ok)],
        ),
        family(
            "grpc_server_started_total",
            "Total number of RPCs started on the server.",
            &[(labels(None), ok + not_found)],
        ),
        if openmetrics { "# EOF\n".to_owned() } else { String::new() },
    ]
    .concat()
}

/// What istio-agent serves for the merged scrape at `path`: Envoy's
/// exposition, then the application's, under the application's content type.
/// `/stats/prometheus`: a text-format application (client_golang's default);
/// `/openmetrics`: one that answers OpenMetrics (`EnableOpenMetrics`);
/// `/without-exporter`: text, with Envoy's `exporter` label taken out, as if
/// grpc-guard did not write it.
fn merged_exposition(path: &str, envoy: &str, scrapes: u64) -> (&'static str, String) {
    const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
    const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    match path {
        "/openmetrics" => (OPENMETRICS, format!("{envoy}{}", app_exposition(scrapes, true))),
        "/without-exporter" => {
            (TEXT, format!("{}{}", envoy.replace(r#",exporter="grpc-guard""#, ""), app_exposition(scrapes, false)))
        }
        _ => (TEXT, format!("{envoy}{}", app_exposition(scrapes, false))),
    }
}

/// A loopback server that answers every request as istio-agent's merged
/// endpoint does ([`merged_exposition`]), with Envoy's exposition fetched at
/// each request; the application's counters grow with every scrape.
struct MergedEndpoint {
    addr: SocketAddr,
    scrapes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MergedEndpoint {
    fn start(envoy_admin: SocketAddr) -> MergedEndpoint {
        let listener = TcpListener::bind(("127.0.0.1", free_port())).expect("binding the merged endpoint");
        let addr = listener.local_addr().unwrap();
        let scrapes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, done) = (scrapes.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if done.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut stream) = stream else { continue };
                let Some(path) = read_request_path(&mut stream) else { continue };
                let envoy = http_get(&format!("http://{envoy_admin}/stats/prometheus"), &[])
                    .map(|(_, body)| String::from_utf8(body).unwrap())
                    .unwrap_or_default();
                let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                let (content_type, body) = merged_exposition(&path, &envoy, n);
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(body.as_bytes()));
            }
        });
        MergedEndpoint { addr, scrapes, stop, thread: Some(thread) }
    }
}

impl Drop for MergedEndpoint {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads an HTTP/1.1 request up to its blank line; its path.
fn read_request_path(stream: &mut TcpStream) -> Option<String> {
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).ok()?;
    head.split(' ').nth(1).map(str::to_owned)
}

/// The one value of an instant query that must return exactly one series.
fn single(base: &str, expr: &str) -> f64 {
    let result = query(base, expr);
    assert_eq!(result.len(), 1, "{expr}: {result:?}");
    result[0].1
}

/// Polls `expr` until it returns `want` (10 s at most).
fn wait_for(base: &str, expr: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while query(base, expr).first().map(|(_, v)| *v) != Some(want) {
        assert!(Instant::now() < deadline, "{expr} never reached {want}: {:?}", query(base, expr));
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The series of `expr` by `exporter` ("" for the application's): how many.
fn series_by_exporter(base: &str, expr: &str) -> Vec<(String, f64)> {
    let mut sides: Vec<(String, f64)> = query(base, &format!("count by (exporter) ({expr})"))
        .into_iter()
        .map(|(labels, n)| (labels["exporter"].as_str().unwrap_or("").to_owned(), n))
        .collect();
    sides.sort_by(|a, b| a.0.cmp(&b.0));
    sides
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merged_scrape_keeps_grpc_guard_s_series_apart_from_the_application_s_go_grpc_prometheus_ones() {
    let dir = scratch_dir("merged");
    let upstream = grpc_guard_tests::e2e::Upstream::start().await;
    let envoy = grpc_guard_tests::e2e::start_envoy("deploy-merged", upstream.addr, "{}").unwrap();
    let mut client = grpc_guard_demo::client(grpc_guard_demo::lazy_channel(&envoy.grpc_uri()).unwrap());
    let echo = |fail_code: tonic::Code| EchoRequest {
        message: "m".into(),
        fail_code: fail_code as i32,
        ..EchoRequest::default()
    };
    client.echo(echo(tonic::Code::Ok)).await.unwrap();

    let merged = MergedEndpoint::start(envoy.params().admin_addr());
    let target = merged.addr;
    let jobs: String =
        [("text", "/stats/prometheus"), ("openmetrics", "/openmetrics"), ("without_exporter", "/without-exporter")]
            .iter()
            .map(|(job, path)| {
                format!("- job_name: {job}\n  metrics_path: {path}\n  static_configs:\n  - targets: ['{target}']\n")
            })
            .collect();
    let (prometheus, base) = start_prometheus_with_jobs(&dir, &[], &jobs);
    let guard_ok = r#"grpc_server_handled_total{job="text",exporter="grpc-guard",grpc_method="Echo",grpc_code="OK"}"#;
    tokio::task::block_in_place(|| wait_for(&base, guard_ok, 1.0));
    // Calls after Prometheus saw the first: six OK, two NotFound.
    for _ in 0..6 {
        client.echo(echo(tonic::Code::Ok)).await.unwrap();
    }
    for _ in 0..2 {
        assert_eq!(client.echo(echo(tonic::Code::NotFound)).await.unwrap_err().code(), tonic::Code::NotFound);
    }
    tokio::task::block_in_place(|| {
        wait_for(&base, guard_ok, 7.0);
        // A few more scrapes of each job, for the rates.
        let seen = merged.scrapes.load(Ordering::SeqCst);
        while merged.scrapes.load(Ordering::SeqCst) < seen + 9 {
            std::thread::sleep(Duration::from_millis(200));
        }
    });

    // Prometheus took each whole concatenation, repeated `# TYPE` lines
    // included, in the text format and in OpenMetrics.
    for job in ["text", "openmetrics", "without_exporter"] {
        assert_eq!(single(&base, &format!(r#"up{{job="{job}"}}"#)), 1.0, "{job}: {}", prometheus.log_text());
    }
    // Both sides are stored, told apart by `exporter`: OK and NotFound each.
    for job in ["text", "openmetrics"] {
        let echo_series = format!(r#"grpc_server_handled_total{{job="{job}",grpc_method="Echo"}}"#);
        let sides = series_by_exporter(&base, &echo_series);
        assert_eq!(sides, [(String::new(), 2.0), ("grpc-guard".to_owned(), 2.0)], "{job}");
        // grpc-guard's own count, exactly: 7 OK and 2 NotFound.
        let by_method =
            format!(r#"sum by (grpc_method) (grpc_server_handled_total{{job="{job}",exporter="grpc-guard"}})"#);
        assert_eq!(single(&base, &by_method), 9.0, "{by_method}");
    }
    // A mixin-style rate, on each side and on both: the sum over both
    // counts every call twice (grpc-guard's count and the application's).
    let rate = |selector: &str| {
        format!(r#"sum by (grpc_method) (rate(grpc_server_handled_total{{job="text"{selector}}}[1m]))"#)
    };
    let (guard, app, both) = (rate(r#",exporter="grpc-guard""#), rate(r#",exporter="""#), rate(""));
    let (guard_value, app_value) = (single(&base, &guard), single(&base, &app));
    println!("calls per second on Echo: grpc-guard {guard_value}, application {app_value}");
    assert!(guard_value > 0.0 && guard_value < 10.0, "grpc-guard's rate is its own few calls: {guard_value}");
    assert!(app_value > 100.0 * guard_value, "the application's rate: {app_value}");
    // One query, so all three are evaluated at one instant.
    let double_count = single(&base, &format!("{both} - {guard} - {app}"));
    assert!(double_count.abs() < 1e-6, "both sides summed is their sum: {both} - {guard} - {app} = {double_count}");

    // Without the label the two sides are one series: Prometheus keeps the
    // first sample of the scrape (grpc-guard's, Envoy comes first) and drops
    // the application's without failing the scrape.
    let without = series_by_exporter(&base, r#"grpc_server_handled_total{job="without_exporter",grpc_method="Echo"}"#);
    assert_eq!(without, [(String::new(), 2.0)], "one series per code");
    let ok = r#"grpc_server_handled_total{job="without_exporter",grpc_method="Echo",grpc_code="OK"}"#;
    assert_eq!(single(&base, ok), 7.0, "the application's count is lost");
    drop(prometheus);
    drop(merged);
    drop(envoy);
    drop(upstream);
}
