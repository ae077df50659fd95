//! `make soak`: mixed traffic at a fixed rate through a real Envoy (two
//! workers) running the release filter in front of the demo service, with the
//! upstream restarted halfway. At the end it checks what a long run must
//! keep: Envoy's memory flat, every call counted once under the code its
//! client got, and every idempotency key executed at most once.
//!
//! The mix, per 20 calls: 10 plain `Echo`s; 2 that fail with a code the
//! service is asked for; 2 that outlive the injected deadline; 3 keyed calls
//! (a first call, a retry while it runs, a retry after it); 1 that the client
//! cancels; 2 server streams.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use grpc_guard::status::GrpcStatus;
use grpc_guard_demo::envoy::{Envoy, EnvoyError, EnvoyParams};
use grpc_guard_demo::pb::{CountRequest, EchoRequest};
use grpc_guard_demo::{Observed, ServeOptions};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::Code;

use crate::e2e::{parse_exposition, CALLER};

/// What a soak runs.
#[derive(Clone, Debug)]
pub struct Options {
    pub duration: Duration,
    /// Calls started per second (open loop: a slow call does not slow the rate).
    pub rate: u32,
    pub envoy: PathBuf,
    pub wasm: PathBuf,
    /// Envoy's config and logs.
    pub dir: PathBuf,
}

/// What a soak saw.
#[derive(Debug, Default)]
pub struct Report {
    /// Envoy's median RSS over the first and the last window, bytes.
    pub rss_first: u64,
    pub rss_last: u64,
    /// The length of those windows.
    pub window: Duration,
    /// Calls by (method, code) as their clients saw them.
    pub sent: BTreeMap<(String, String), u64>,
    /// `grpc_server_handled_total` by (method, code) at the end.
    pub counted: BTreeMap<(String, String), u64>,
    /// Distinct idempotency keys sent, and the most executions of any.
    pub keys: usize,
    pub most_executions_of_a_key: u64,
    pub keyed_calls: u64,
}

impl Report {
    /// What broke a promise; empty when the soak passed.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let (first, last) = (self.rss_first as f64, self.rss_last as f64);
        if first <= 0.0 || (last - first).abs() > first * 0.05 {
            problems.push(format!(
                "Envoy RSS moved {:+.1} % between the first and the last {} s ({} -> {} KiB)",
                (last - first) / first * 100.0,
                self.window.as_secs(),
                self.rss_first / 1024,
                self.rss_last / 1024
            ));
        }
        if self.sent != self.counted {
            problems.push(format!(
                "clients' calls by method and code differ from grpc_server_handled_total: sent {:?}, counted {:?}",
                self.sent, self.counted
            ));
        }
        if self.most_executions_of_a_key > 1 {
            problems.push(format!("a key ran {} times", self.most_executions_of_a_key));
        }
        problems
    }

    /// The figures, as a Markdown table.
    pub fn table(&self) -> String {
        let mut out = format!(
            "Envoy RSS: first {} s {} KiB, last {} s {} KiB ({:+.1} %)\n\n| method | code | clients got | counted |\n|---|---|---:|---:|\n",
            self.window.as_secs(),
            self.rss_first / 1024,
            self.window.as_secs(),
            self.rss_last / 1024,
            (self.rss_last as f64 - self.rss_first as f64) / self.rss_first.max(1) as f64 * 100.0
        );
        let mut keys: Vec<&(String, String)> = self.sent.keys().chain(self.counted.keys()).collect();
        keys.sort();
        keys.dedup();
        for key in keys {
            out.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                key.0,
                key.1,
                self.sent.get(key).copied().unwrap_or(0),
                self.counted.get(key).copied().unwrap_or(0)
            ));
        }
        out.push_str(&format!(
            "\nIdempotency keys: {} keys in {} keyed calls, at most {} execution(s) of any key upstream\n",
            self.keys, self.keyed_calls, self.most_executions_of_a_key
        ));
        out
    }
}

/// The demo service on a fixed address, restartable.
struct Service {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl Service {
    async fn start(addr: SocketAddr, observed: Observed) -> Result<Service, SoakError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| SoakError::Io(format!("binding the demo service to {addr}"), e))?;
        let addr = listener.local_addr().map_err(|e| SoakError::Io("reading its address".into(), e))?;
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(grpc_guard_demo::serve_with(listener, observed.clone(), ServeOptions::default(), async move {
            let _ = stopped.await;
        }));
        Ok(Service { addr, stop: Some(stop) })
    }

    fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Why a soak could not run (not what it found: that is [`Report::problems`]).
#[derive(Debug, thiserror::Error)]
pub enum SoakError {
    #[error(transparent)]
    Envoy(#[from] EnvoyError),
    #[error(transparent)]
    Demo(#[from] grpc_guard_demo::DemoError),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

type Tally = Arc<Mutex<BTreeMap<(String, String), u64>>>;

fn note(tally: &Tally, method: &str, code: Code) {
    let name = GrpcStatus::from_code(code as u32).map_or("?", GrpcStatus::go_name);
    let mut tally = tally.lock().unwrap_or_else(|p| p.into_inner());
    *tally.entry((method.to_owned(), name.to_owned())).or_insert(0) += 1;
}

/// Runs the soak and reports; errors are the harness's own (Envoy would not
/// start, a port was taken).
pub async fn run(options: &Options) -> Result<Report, SoakError> {
    let observed = Observed::default();
    let any_port = SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0));
    let mut service = Service::start(any_port, observed.clone()).await?;
    // Keys live for a sixth of the run (at most 30 s): the table fills and
    // then turns over, so the last window holds as many as the first.
    let ttl = (options.duration / 6).clamp(Duration::from_secs(2), Duration::from_secs(30));
    let config = format!(
        r#"{{"deadline":{{"default":"150ms"}},
            "metrics":{{"method_types":{{"grpcguard.demo.v1.Demo/Count":"server_stream"}}}},
            "dedup":{{"methods":["grpcguard.demo.v1.Demo/Echo"],"ttl":"{}ms","max_entries":8192,"caller_share":1.0}}}}"#,
        ttl.as_millis()
    );
    let mut params = EnvoyParams::on_free_ports(service.addr, options.wasm.clone(), &config)?;
    // One line per call for hours is the access log's job elsewhere: off, as
    // Istio ships it.
    params.access_log = false;
    let envoy = Envoy::start(&options.envoy, params, 2, &options.dir)?;
    let channel = grpc_guard_demo::lazy_channel(&envoy.grpc_uri())?;

    let tally: Tally = Arc::default();
    let keys = Arc::new(Mutex::new(0u64));
    let mut rss: Vec<(Duration, u64)> = Vec::new();
    let started = Instant::now();
    let mut restart = None;
    let mut keyed_calls = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1) / options.rate.max(1));
    let mut next_rss = Duration::ZERO;
    let mut n: u64 = 0;
    let mut calls = Vec::new();
    while started.elapsed() < options.duration {
        tick.tick().await;
        let now = started.elapsed();
        if now >= next_rss {
            if let Some(bytes) = grpc_guard_demo::bench::process_rss(envoy.pid()) {
                rss.push((now, bytes));
            }
            next_rss += Duration::from_secs(1);
        }
        if restart.is_none() && now >= options.duration / 2 {
            // The upstream goes away for a second, calls going on meanwhile,
            // and comes back on its port.
            service.stop();
            let (addr, observed) = (service.addr, observed.clone());
            restart = Some(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                Service::start(addr, observed).await
            }));
        }
        let client = grpc_guard_demo::client(channel.clone());
        let tally = tally.clone();
        let kind = n % 20;
        n += 1;
        if (14..=16).contains(&kind) {
            keyed_calls += 1;
        }
        let key_number = {
            let mut k = keys.lock().unwrap_or_else(|p| p.into_inner());
            if kind == 14 {
                *k += 1;
            }
            *k
        };
        calls.push(tokio::spawn(async move { one_call(client, kind, key_number, &tally).await }));
        calls.retain(|c| !c.is_finished());
    }
    for call in calls {
        let _ = call.await;
    }
    // The restarted service lives until here (held in its task's output).
    let _restarted = match restart {
        Some(task) => Some(task.await.map_err(|e| SoakError::Io("restarting the service".into(), e.into()))??),
        None => None,
    };
    // Calls Envoy is still ending (a cancel's reset) settle within a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let window = (options.duration / 6).clamp(Duration::from_secs(5), Duration::from_secs(60));
    let median = |from: Duration, to: Duration| {
        let mut v: Vec<u64> = rss.iter().filter(|(t, _)| *t >= from && *t < to).map(|(_, b)| *b).collect();
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    };
    // The first window starts once the table has filled (one TTL in).
    let first = ttl.max(window);
    let end = started.elapsed();
    let mut report = Report {
        rss_first: median(first, first + window),
        rss_last: median(end.saturating_sub(window), end),
        window,
        sent: tally.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        ..Report::default()
    };
    let samples = parse_exposition(&envoy.prometheus()?);
    for s in samples.iter().filter(|s| s.name == "grpc_server_handled_total") {
        let method = s.labels.get("grpc_method").cloned().unwrap_or_default();
        let code = s.labels.get("grpc_code").cloned().unwrap_or_default();
        *report.counted.entry((method, code)).or_insert(0) += s.value as u64;
    }
    let by_key = observed.executions_by_key();
    report.keys = *keys.lock().unwrap_or_else(|p| p.into_inner()) as usize;
    report.most_executions_of_a_key = by_key.values().copied().max().unwrap_or(0);
    report.keyed_calls = keyed_calls;
    Ok(report)
}

/// One call of the mix; what its client got goes into `tally`.
async fn one_call(
    mut client: grpc_guard_demo::pb::demo_client::DemoClient<tonic::transport::Channel>,
    kind: u64,
    key_number: u64,
    tally: &Tally,
) {
    let echo = |message: &str| EchoRequest { message: message.into(), ..Default::default() };
    let code = |r: Result<tonic::Response<grpc_guard_demo::pb::EchoReply>, tonic::Status>| {
        r.map_or_else(|s| s.code(), |_| Code::Ok)
    };
    match kind {
        0..=9 => note(tally, "Echo", code(client.echo(echo("plain")).await)),
        10 | 11 => {
            let failing = [Code::NotFound, Code::Internal, Code::PermissionDenied, Code::DataLoss];
            let asked = failing[(key_number as usize + kind as usize) % failing.len()];
            let request = EchoRequest { fail_code: asked as i32, ..echo("fail") };
            note(tally, "Echo", code(client.echo(request).await));
        }
        12 | 13 => {
            // Outlives the 150 ms deadline grpc-guard injects.
            let request = EchoRequest { delay_ms: 400, ..echo("slow") };
            note(tally, "Echo", code(client.echo(request).await));
        }
        14..=16 => {
            // The key's first call, a retry while it runs, a retry after it.
            let wait = [0, 20, 300][(kind - 14) as usize];
            tokio::time::sleep(Duration::from_millis(wait)).await;
            let mut request = tonic::Request::new(EchoRequest { delay_ms: 60, ..echo(&format!("pay {key_number}")) });
            let metadata = request.metadata_mut();
            if let (Ok(key), Ok(caller)) = (format!("soak-{key_number}").parse(), CALLER.parse()) {
                metadata.insert("idempotency-key", key);
                metadata.insert("authorization", caller);
            }
            note(tally, "Echo", code(client.echo(request).await));
        }
        17 => {
            // The client gives up after 60 ms (the call would take a second).
            let request = EchoRequest { delay_ms: 1000, ..echo("cancel") };
            match tokio::time::timeout(Duration::from_millis(60), client.echo(request)).await {
                Ok(result) => note(tally, "Echo", code(result)),
                Err(_) => note(tally, "Echo", Code::Cancelled),
            }
        }
        _ => {
            let result = async {
                let mut stream = client.count(CountRequest { count: 3, ..Default::default() }).await?.into_inner();
                while stream.message().await?.is_some() {}
                Ok::<(), tonic::Status>(())
            }
            .await;
            note(tally, "Count", result.map_or_else(|s| s.code(), |()| Code::Ok));
        }
    }
}
