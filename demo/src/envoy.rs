//! Runs the real Envoy with grpc-guard from `envoy/envoy.yaml`: renders the
//! template, starts the process, waits until it is ready, reads its admin
//! endpoint and its logs, and stops it when dropped. Used by `make run` and by
//! the end-to-end tests, so both run exactly the configuration a user deploys.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use thiserror::Error;

/// The shipped Envoy configuration template.
pub const TEMPLATE: &str = include_str!("../../envoy/envoy.yaml");

/// Marker Envoy puts in front of every message a wasm plugin logs.
const WASM_LOG_MARKER: &str = "wasm log grpc_guard grpc_guard grpc_guard: ";

#[derive(Debug, Error)]
pub enum EnvoyError {
    #[error("envoy template placeholder {0} was left unfilled")]
    Unfilled(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("envoy exited with {status} before it was ready; last log lines:\n{log_tail}")]
    Exited { status: String, log_tail: String },
    #[error("envoy was not ready after {0:?}; last log lines:\n{1}")]
    NotReady(Duration, String),
    #[error("admin endpoint {path}: {reason}")]
    Admin { path: String, reason: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> EnvoyError {
    let what = what.into();
    move |source| EnvoyError::Io { what, source }
}

/// Which HTTP filter sits before the router: grpc-guard as shipped, or, for
/// the benchmark's baselines, Envoy's native `grpc_stats` or nothing at all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HttpFilter {
    #[default]
    GrpcGuard,
    GrpcStats,
    None,
}

impl HttpFilter {
    pub fn name(self) -> &'static str {
        match self {
            HttpFilter::GrpcGuard => "grpc-guard",
            HttpFilter::GrpcStats => "grpc_stats",
            HttpFilter::None => "bare",
        }
    }
}

const FILTER_BEGIN: &str = "          # grpc-guard filter: begin";
const FILTER_END: &str = "          # grpc-guard filter: end\n";

/// Envoy's native gRPC statistics filter with per-method stats: the cost a
/// user pays today for gRPC metrics without grpc-guard.
const GRPC_STATS_FILTER: &str = "          - name: envoy.filters.http.grpc_stats
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig
              emit_filter_state: true
              stats_for_all_methods: true
";

/// The values filled into the template.
#[derive(Clone, Debug)]
pub struct EnvoyParams {
    pub listen_port: u16,
    pub admin_port: u16,
    pub upstream: SocketAddr,
    /// A port where nothing listens, for the demo's "upstream down" route.
    pub down_port: u16,
    pub wasm: PathBuf,
    /// The filter's JSON configuration.
    pub plugin_config: String,
    pub http_filter: HttpFilter,
    /// HTTP filters (YAML list items, indented as the template's) that run
    /// before grpc-guard, e.g. a JWT check whose result the filter reads.
    pub filters_before: String,
    /// Request headers Envoy sets before any filter runs (values may use
    /// Envoy's formatter, e.g. `%UNIQUE_ID%`).
    pub set_request_headers: Vec<(String, String)>,
    /// The gRPC listener's access log (one line per call on Envoy's
    /// standard output). `make bench` turns it off, as Istio ships.
    pub access_log: bool,
    /// Envoy lets the filter hold a call's headers while its body still
    /// reaches it (`allow_on_headers_stop_iteration`); off, the filter is
    /// loaded as Istio's WasmPlugin loads it.
    pub hold_headers: bool,
    /// The plugin's `failure_policy`, as in the template unless changed.
    pub failure_policy: String,
    /// etcd members: when set, the cluster of `envoy/etcd-cluster.yaml`
    /// (`grpc_guard_etcd`) is added with them as its endpoints.
    pub etcd: Vec<SocketAddr>,
}

impl EnvoyParams {
    /// Parameters on free loopback ports for an upstream at `upstream`.
    pub fn on_free_ports(upstream: SocketAddr, wasm: PathBuf, plugin_config: &str) -> Result<EnvoyParams, EnvoyError> {
        Ok(EnvoyParams {
            listen_port: free_port()?,
            admin_port: free_port()?,
            upstream,
            down_port: free_port()?,
            wasm,
            plugin_config: plugin_config.to_owned(),
            http_filter: HttpFilter::GrpcGuard,
            filters_before: String::new(),
            set_request_headers: Vec::new(),
            access_log: true,
            hold_headers: true,
            failure_policy: FAILURE_POLICY.to_owned(),
            etcd: Vec::new(),
        })
    }

    pub fn listen_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.listen_port))
    }

    pub fn admin_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.admin_port))
    }

    /// The template with every placeholder filled.
    pub fn render(&self, template: &str) -> Result<String, EnvoyError> {
        // The plugin configuration sits in a single-quoted YAML scalar, where a
        // quote is written twice.
        let plugin_config = self.plugin_config.replace('\'', "''");
        let values = [
            ("{{LISTEN_PORT}}", self.listen_port.to_string()),
            ("{{ADMIN_PORT}}", self.admin_port.to_string()),
            ("{{UPSTREAM_HOST}}", self.upstream.ip().to_string()),
            ("{{UPSTREAM_PORT}}", self.upstream.port().to_string()),
            ("{{DOWN_PORT}}", self.down_port.to_string()),
            ("{{WASM_PATH}}", self.wasm.display().to_string()),
            ("{{PLUGIN_CONFIG}}", plugin_config),
        ];
        let mut out = match self.http_filter {
            HttpFilter::GrpcGuard => template.to_owned(),
            HttpFilter::GrpcStats => swap_filter(template, GRPC_STATS_FILTER)?,
            HttpFilter::None => swap_filter(template, "")?,
        };
        if !self.access_log {
            let cut = out.find(ACCESS_LOG).zip(out.find(ROUTE_CONFIG)).filter(|(from, to)| from < to);
            let (from, to) = cut.ok_or_else(|| EnvoyError::Unfilled("the gRPC listener's access log".to_owned()))?;
            out.replace_range(from..to, "");
        }
        if self.failure_policy != FAILURE_POLICY {
            let from = format!("failure_policy: {FAILURE_POLICY}\n");
            let at = out.find(&from).ok_or_else(|| EnvoyError::Unfilled(from.trim().to_owned()))?;
            out.replace_range(at..at + from.len(), &format!("failure_policy: {}\n", self.failure_policy));
        }
        if !self.hold_headers {
            let at = out.find(HOLD_HEADERS).ok_or_else(|| EnvoyError::Unfilled(HOLD_HEADERS.trim().to_owned()))?;
            out.replace_range(at..at + HOLD_HEADERS.len(), "");
        }
        if !self.filters_before.is_empty() {
            let at =
                out.find(FILTER_BEGIN).ok_or_else(|| EnvoyError::Unfilled("grpc-guard filter block".to_owned()))?;
            out.insert_str(at, &self.filters_before);
        }
        if !self.set_request_headers.is_empty() {
            let at = out.find(STAT_PREFIX).ok_or_else(|| EnvoyError::Unfilled("the gRPC listener".to_owned()))?
                + STAT_PREFIX.len();
            out.insert_str(at, &early_header_mutation(&self.set_request_headers));
        }
        if !self.etcd.is_empty() {
            let at = out.find(CLUSTERS).ok_or_else(|| EnvoyError::Unfilled("clusters".to_owned()))? + CLUSTERS.len();
            out.insert_str(at, &self.etcd_cluster());
        }
        for (key, value) in values {
            out = out.replace(key, &value);
        }
        match out.find("{{") {
            Some(at) => Err(EnvoyError::Unfilled(out[at..].chars().take_while(|c| *c != '}').collect())),
            None => Ok(out),
        }
    }
}

impl EnvoyParams {
    /// `envoy/etcd-cluster.yaml` with the members as its endpoints.
    fn etcd_cluster(&self) -> String {
        let endpoints: String = self
            .etcd
            .iter()
            .map(|m| {
                format!(
                    "        - endpoint:\n            address:\n              socket_address: {{ address: {}, port_value: {} }}\n",
                    m.ip(),
                    m.port()
                )
            })
            .collect();
        ETCD_CLUSTER.replace("{{ETCD_ENDPOINTS}}\n", &endpoints)
    }
}

/// The etcd cluster's definition (`dedup.store: etcd`).
pub const ETCD_CLUSTER: &str = include_str!("../../envoy/etcd-cluster.yaml");

/// Where the template's clusters begin.
const CLUSTERS: &str = "\n  clusters:\n";

/// The plugin's failure policy in the template.
pub const FAILURE_POLICY: &str = "FAIL_RELOAD";

/// The setting that lets the filter hold headers while reading the body.
const HOLD_HEADERS: &str = "                allow_on_headers_stop_iteration: true\n";

/// The gRPC listener's access log and what follows it in the template.
const ACCESS_LOG: &str = "          access_log:\n";
const ROUTE_CONFIG: &str = "          route_config:\n";

/// The gRPC listener's connection manager in the template.
const STAT_PREFIX: &str = "          stat_prefix: grpc_ingress\n";

/// Envoy's early header mutation (before routing and every filter) setting
/// `headers`.
fn early_header_mutation(headers: &[(String, String)]) -> String {
    let mut out = String::from(
        "          early_header_mutation_extensions:
          - name: envoy.http.early_header_mutation.header_mutation
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation
              mutations:
",
    );
    for (name, value) in headers {
        out.push_str(&format!(
            "              - append:
                  header: {{ key: {name:?}, value: {value:?} }}
                  append_action: OVERWRITE_IF_EXISTS_OR_ADD
"
        ));
    }
    out
}

/// The template with the grpc-guard filter block replaced by `replacement`.
fn swap_filter(template: &str, replacement: &str) -> Result<String, EnvoyError> {
    let missing = || EnvoyError::Unfilled("grpc-guard filter block markers".to_owned());
    let begin = template.find(FILTER_BEGIN).ok_or_else(missing)?;
    let end = template.find(FILTER_END).ok_or_else(missing)? + FILTER_END.len();
    Ok(format!("{}{replacement}{}", &template[..begin], &template[end..]))
}

/// The flags of every command that runs Envoy with grpc-guard
/// (`grpc-guard-run`, `grpc-guard-bench`).
#[derive(Clone, Debug, clap::Args)]
pub struct FilterArgs {
    /// The Envoy binary (`make setup` installs it into .venv/bin/envoy).
    #[arg(long, default_value = ".venv/bin/envoy")]
    pub envoy: PathBuf,
    /// The filter's release .wasm (`make wasm`).
    #[arg(long)]
    pub wasm: PathBuf,
    /// The filter's JSON configuration (README: Configuration).
    #[arg(long, default_value = "{}")]
    pub plugin_config: String,
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> Result<u16, EnvoyError> {
    // Below Linux's ephemeral range (32768-60999 by default): a port the
    // kernel hands out for port 0 can go to an outgoing connection (h2load's,
    // Envoy's own) between this check and Envoy's bind, which then fails.
    // One walk through the range per process, from a start of its own: the
    // ports one process hands out never repeat (7,919 is prime to 12,000), so
    // two of its Envoys cannot be given one port. Envoy binds listeners with
    // SO_REUSEPORT: two on one port would both start and share its traffic.
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let start = *START.get_or_init(|| {
        u64::from(std::process::id()).wrapping_mul(2_654_435_761)
            ^ u64::from(
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos()),
            )
    });
    for _ in 0..256 {
        let n = u64::from(NEXT.fetch_add(1, Ordering::Relaxed));
        let port = 20_000 + ((start % 12_000 + n * 7_919) % 12_000) as u16;
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return Ok(port);
        }
    }
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io("binding a free port"))?;
    Ok(listener.local_addr().map_err(io("reading a bound port"))?.port())
}

/// A running Envoy, killed on drop.
pub struct Envoy {
    child: Child,
    params: EnvoyParams,
    dir: PathBuf,
}

impl Envoy {
    /// Writes the rendered config and starts `binary` with `concurrency` worker
    /// threads; waits until `/ready` answers, or fails with the log's tail.
    pub fn start(binary: &Path, params: EnvoyParams, concurrency: u32, dir: &Path) -> Result<Envoy, EnvoyError> {
        Envoy::start_on(binary, params, concurrency, dir, None)
    }

    /// Like [`Envoy::start`], with Envoy pinned to the CPUs in `cpus`
    /// (`taskset` syntax, e.g. "0") when given: benchmarks keep Envoy and the
    /// load apart.
    pub fn start_on(
        binary: &Path,
        params: EnvoyParams,
        concurrency: u32,
        dir: &Path,
        cpus: Option<&str>,
    ) -> Result<Envoy, EnvoyError> {
        fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        let config = dir.join("envoy.yaml");
        fs::write(&config, params.render(TEMPLATE)?).map_err(io(format!("writing {}", config.display())))?;
        let stdout = fs::File::create(dir.join("access.log")).map_err(io("creating access.log"))?;
        let stderr = fs::File::create(dir.join("envoy.log")).map_err(io("creating envoy.log"))?;
        let mut command = match cpus {
            Some(cpus) => {
                let mut c = Command::new("taskset");
                c.args(["-c", cpus]).arg(binary);
                c
            }
            None => Command::new(binary),
        };
        let child = command
            .arg("-c")
            .arg(&config)
            .args(["--concurrency", &concurrency.to_string()])
            .arg("--disable-hot-restart")
            .args(["--log-level", "info"])
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(io(format!("starting {}", binary.display())))?;
        let mut envoy = Envoy { child, params, dir: dir.to_owned() };
        envoy.wait_ready(Duration::from_secs(60))?;
        Ok(envoy)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), EnvoyError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(EnvoyError::Exited { status: status.to_string(), log_tail: self.log_tail(20) });
            }
            if self.admin_get("/ready").is_ok_and(|body| body.trim() == "LIVE") {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(EnvoyError::NotReady(timeout, self.log_tail(20)));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process id of Envoy (or of `taskset`, which execs Envoy in place).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn params(&self) -> &EnvoyParams {
        &self.params
    }

    /// `http://127.0.0.1:LISTEN_PORT`, for gRPC clients.
    pub fn grpc_uri(&self) -> String {
        format!("http://{}", self.params.listen_addr())
    }

    /// GET on the admin endpoint; the body of a 200 answer.
    pub fn admin_get(&self, path: &str) -> Result<String, EnvoyError> {
        let err = |reason: String| EnvoyError::Admin { path: path.to_owned(), reason };
        let mut stream = TcpStream::connect(self.params.admin_addr()).map_err(|e| err(e.to_string()))?;
        stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| err(e.to_string()))?;
        write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .map_err(|e| err(e.to_string()))?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).map_err(|e| err(e.to_string()))?;
        let text = String::from_utf8_lossy(&response);
        let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| err("no HTTP header end".into()))?;
        if !head.starts_with("HTTP/1.1 200") {
            return Err(err(head.lines().next().unwrap_or_default().to_owned()));
        }
        let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
        Ok(if chunked { dechunk(body) } else { body.to_owned() })
    }

    /// The Prometheus exposition Envoy serves.
    pub fn prometheus(&self) -> Result<String, EnvoyError> {
        self.admin_get("/stats/prometheus")
    }

    /// Every JSON line grpc-guard logged so far.
    pub fn call_logs(&self) -> Vec<String> {
        self.log_lines().filter_map(|l| l.split_once(WASM_LOG_MARKER).map(|(_, json)| json.to_owned())).collect()
    }

    /// Envoy's own log (stderr).
    pub fn log_lines(&self) -> impl Iterator<Item = String> {
        fs::read_to_string(self.dir.join("envoy.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect::<Vec<_>>()
            .into_iter()
    }

    /// The access log (stdout).
    pub fn access_log_lines(&self) -> Vec<String> {
        fs::read_to_string(self.dir.join("access.log")).unwrap_or_default().lines().map(str::to_owned).collect()
    }

    fn log_tail(&self, n: usize) -> String {
        let lines: Vec<String> = self.log_lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Decodes an HTTP/1.1 chunked body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> EnvoyParams {
        EnvoyParams {
            listen_port: 1,
            admin_port: 2,
            upstream: "127.0.0.1:3".parse().unwrap(),
            down_port: 4,
            wasm: "/x/grpc_guard.wasm".into(),
            plugin_config: r#"{"log":{"request_id_header":"it's"}}"#.into(),
            http_filter: HttpFilter::GrpcGuard,
            filters_before: String::new(),
            set_request_headers: Vec::new(),
            access_log: true,
            hold_headers: true,
            failure_policy: FAILURE_POLICY.to_owned(),
            etcd: Vec::new(),
        }
    }

    #[test]
    fn baselines_swap_the_filter_block_and_keep_the_router() {
        let mut p = params();
        p.http_filter = HttpFilter::GrpcStats;
        let yaml = p.render(TEMPLATE).unwrap();
        assert!(yaml.contains("envoy.filters.http.grpc_stats"));
        assert!(!yaml.contains("envoy.wasm.runtime.v8"));
        assert!(yaml.contains("envoy.filters.http.router"));
        p.http_filter = HttpFilter::None;
        let yaml = p.render(TEMPLATE).unwrap();
        assert!(!yaml.contains("grpc_stats") && !yaml.contains("wasm.v3.Wasm"));
        assert!(yaml.contains("envoy.filters.http.router"));
    }

    #[test]
    fn template_renders_with_every_placeholder_filled() {
        let yaml = params().render(TEMPLATE).unwrap();
        assert!(!yaml.contains("{{"));
        assert!(yaml.contains(r#"value: '{"log":{"request_id_header":"it''s"}}'"#));
        assert!(yaml.contains("port_value: 2 }"));
    }

    #[test]
    fn unknown_placeholder_is_reported() {
        let err = params().render("a: {{NOPE}}").unwrap_err();
        assert!(err.to_string().contains("{{NOPE"), "{err}");
    }

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), "abcde");
    }
}
