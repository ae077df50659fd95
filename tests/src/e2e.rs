//! The processes an end-to-end test starts: the demo gRPC service and a real
//! Envoy running the release `.wasm` with the shipped `envoy/envoy.yaml`.
//! Shared by the end-to-end tests (`tests/tests/e2e`) and the deployment
//! tests (`tests/tests/deploy`), so both run exactly what a user deploys.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use grpc_guard_demo::envoy::{Envoy, EnvoyError, EnvoyParams};
use grpc_guard_demo::{Observed, ServeOptions};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// Envoy worker threads: more than one, so per-worker VMs and shared data are
/// exercised as in production.
pub const CONCURRENCY: u32 = 2;

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The release filter: `GRPC_GUARD_WASM`, else what `make wasm` ships
/// (after wasm-opt), else cargo's own release build.
pub fn wasm_path() -> PathBuf {
    if let Some(p) = std::env::var_os("GRPC_GUARD_WASM") {
        return PathBuf::from(p);
    }
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"));
    let shipped = target.join("grpc-guard/grpc_guard.wasm");
    let path = if shipped.exists() { shipped } else { target.join("wasm32-wasip1/release/grpc_guard.wasm") };
    assert!(path.exists(), "{} is missing: run `make wasm` (or `make test`) first", path.display());
    path
}

/// The floor filter (`bench/floor`), which `make wasm` builds beside grpc-guard.
pub fn floor_wasm_path() -> PathBuf {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"));
    let path = target.join("wasm32-wasip1/release/grpc_guard_floor.wasm");
    assert!(path.exists(), "{} is missing: run `make wasm` (or `make test`) first", path.display());
    path
}

/// The Envoy that `make setup` installs into `.venv/`.
pub fn envoy_binary() -> PathBuf {
    let path = std::env::var_os("GRPC_GUARD_ENVOY")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv/bin/envoy"));
    assert!(path.exists(), "{} is missing: run `make setup` (or `make test`) first", path.display());
    path
}

/// A fresh directory for one test's Envoy config and logs.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("grpc-guard-e2e-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The demo gRPC service on a free loopback port, stopped on drop.
pub struct Upstream {
    pub addr: SocketAddr,
    pub observed: Observed,
    stop: Option<oneshot::Sender<()>>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        Upstream::start_with(ServeOptions::default()).await
    }

    pub async fn start_with(options: ServeOptions) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let observed = Observed::default();
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(grpc_guard_demo::serve_with(listener, observed.clone(), options, async move {
            let _ = stopped.await;
        }));
        Upstream { addr, observed, stop: Some(stop) }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Starts Envoy with grpc-guard configured by `plugin_config`, in front of `upstream`.
///
/// Ports are picked free and released before Envoy binds them, so a test
/// running beside this one can take one in between; Envoy then exits with
/// "Address already in use" and is started again on other ports.
pub fn start_envoy(name: &str, upstream: SocketAddr, plugin_config: &str) -> Result<Envoy, EnvoyError> {
    start_envoy_with(name, upstream, plugin_config, "")
}

/// [`start_envoy`], with the HTTP filters `filters_before` (YAML list items)
/// running before grpc-guard.
pub fn start_envoy_with(
    name: &str,
    upstream: SocketAddr,
    plugin_config: &str,
    filters_before: &str,
) -> Result<Envoy, EnvoyError> {
    start_envoy_changed(name, upstream, plugin_config, |params| params.filters_before = filters_before.to_owned())
}

/// [`start_envoy`], with the parameters changed by `change` (e.g. the etcd
/// members of `dedup.store: etcd`).
pub fn start_envoy_changed(
    name: &str,
    upstream: SocketAddr,
    plugin_config: &str,
    change: impl Fn(&mut EnvoyParams),
) -> Result<Envoy, EnvoyError> {
    let mut attempt = 0;
    loop {
        let mut params = EnvoyParams::on_free_ports(upstream, wasm_path(), plugin_config)?;
        change(&mut params);
        match Envoy::start(&envoy_binary(), params, CONCURRENCY, &scratch_dir(name)) {
            Err(EnvoyError::Exited { log_tail, .. }) if attempt < 3 && log_tail.contains("Address already in use") => {
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// The credentials of the tests' keyed calls: grpc-guard matches an
/// idempotency key only within one caller's scope, and refuses a key that
/// comes from nobody.
pub const CALLER: &str = "Bearer e2e-caller";

/// `message` as a request with the idempotency key `key`, from the caller
/// whose `authorization` is `credentials`.
pub fn keyed<T>(message: T, key: &str, credentials: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let metadata = request.metadata_mut();
    metadata.insert("idempotency-key", key.parse().expect("a test key is printable ASCII"));
    metadata.insert("authorization", credentials.parse().expect("test credentials are printable ASCII"));
    request
}

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
