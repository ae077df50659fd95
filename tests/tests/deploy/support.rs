//! Paths, YAML, external tools and child processes for the deployment tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use grpc_guard_demo::envoy::{EnvoyParams, HttpFilter, TEMPLATE};
pub use grpc_guard_tests::e2e::workspace_root;
use grpc_guard_tests::e2e::{envoy_binary, wasm_path};

/// A file of the workspace, e.g. `istio/base/wasmplugin.yaml`.
pub fn repo_file(relative: &str) -> PathBuf {
    workspace_root().join(relative)
}

pub fn read(relative: &str) -> String {
    let path = repo_file(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The one YAML document in a workspace file.
pub fn yaml(relative: &str) -> serde_yaml::Value {
    serde_yaml::from_str(&read(relative)).unwrap_or_else(|e| panic!("{relative} is not YAML: {e}"))
}

/// `value[a][b]…` for a path `a.b…` (`\\.` for a dot inside a key, numbers
/// index lists), failing with the path when a key is missing.
pub fn at<'a>(value: &'a serde_yaml::Value, file: &str, path: &str) -> &'a serde_yaml::Value {
    let mut node = value;
    for key in path.replace("\\.", "\0").split('.') {
        let key = key.replace('\0', ".");
        node = match key.parse::<usize>() {
            Ok(i) => node.get(i),
            Err(_) => node.get(&key),
        }
        .unwrap_or_else(|| panic!("{file}: `{path}` is required (missing at `{key}`)"));
    }
    node
}

pub fn str_at<'a>(value: &'a serde_yaml::Value, file: &str, path: &str) -> &'a str {
    at(value, file, path).as_str().unwrap_or_else(|| panic!("{file}: `{path}` must be a string"))
}

pub fn to_json(value: &serde_yaml::Value) -> serde_json::Value {
    serde_json::to_value(value).expect("YAML value converts to JSON")
}

/// envoy/envoy.yaml as `make render` writes it, parsed.
pub fn envoy_config() -> serde_yaml::Value {
    let params = EnvoyParams {
        listen_port: 10000,
        admin_port: 9901,
        upstream: "127.0.0.1:50051".parse().unwrap(),
        down_port: 50099,
        wasm: "/etc/grpc-guard/grpc_guard.wasm".into(),
        plugin_config: "{}".into(),
        http_filter: HttpFilter::GrpcGuard,
        filters_before: String::new(),
        set_request_headers: Vec::new(),
        access_log: true,
        hold_headers: true,
        failure_policy: grpc_guard_demo::envoy::FAILURE_POLICY.to_owned(),
        etcd: Vec::new(),
    };
    serde_yaml::from_str(&params.render(TEMPLATE).unwrap()).expect("rendered envoy.yaml is YAML")
}

/// A real Envoy (two workers) running the filter configured by
/// `plugin_config`, in front of `upstream`, with envoy/envoy.yaml changed by
/// `edit`; killed on drop.
pub fn start_edited_envoy(
    name: &str,
    upstream: std::net::SocketAddr,
    plugin_config: &str,
    edit: impl Fn(&mut serde_yaml::Value),
) -> (Server, EnvoyParams) {
    let dir = scratch_dir(name);
    let mut attempt = 0;
    loop {
        let params = EnvoyParams::on_free_ports(upstream, wasm_path(), plugin_config).unwrap();
        let mut config: serde_yaml::Value = serde_yaml::from_str(&params.render(TEMPLATE).unwrap()).unwrap();
        edit(&mut config);
        let path = dir.join("envoy.yaml");
        std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();
        let mut command = Command::new(envoy_binary());
        command.arg("-c").arg(&path).args(["--concurrency", "2", "--disable-hot-restart", "--log-level", "info"]);
        let ready = format!("http://{}/ready", params.admin_addr());
        match Server::try_start("envoy", &mut command, &dir, &ready, Duration::from_secs(60)) {
            Ok(envoy) => return (envoy, params),
            // A port picked free can be taken before Envoy binds it.
            Err(e) if attempt < 3 && e.contains("Address already in use") => attempt += 1,
            Err(e) => panic!("{e}"),
        }
    }
}

/// The grpc-guard metric selectors in a PromQL expression that do not pick
/// grpc-guard's own series with `exporter="grpc-guard"` (README "Metrics":
/// an application's go-grpc-prometheus series share the names).
pub fn selectors_without_exporter(expr: &str) -> Vec<String> {
    let mut missing = Vec::new();
    let mut rest = expr;
    while let Some(start) = ["grpc_server_", "grpc_client_"].iter().filter_map(|p| rest.find(p)).min() {
        let after = &rest[start..];
        let name_len = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
        let selector = match after[name_len..].strip_prefix('{') {
            Some(labels) => &after[..name_len + 1 + labels.find('}').map_or(labels.len(), |end| end + 1)],
            None => &after[..name_len],
        };
        if !selector.contains(r#"exporter="grpc-guard""#) {
            missing.push(selector.to_owned());
        }
        rest = &after[selector.len()..];
    }
    missing
}

/// The example install, istio/overlays/example.
pub const EXAMPLE: &str = "istio/overlays/example";

/// What `kubectl kustomize DIR` renders, one value per object; why not, with
/// kustomize's own message.
pub fn kustomize(dir: &Path) -> Result<Vec<serde_yaml::Value>, String> {
    let out = Command::new(tool("kubectl")).arg("kustomize").arg(dir).output().expect("running kubectl kustomize");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8(out.stdout).unwrap();
    // kustomize separates the objects with `---` lines.
    Ok(text
        .split("\n---\n")
        .map(|doc| {
            serde_yaml::from_str(doc).unwrap_or_else(|e| panic!("kubectl kustomize wrote no YAML ({e}):\n{doc}"))
        })
        .collect())
}

/// istio/overlays/example as `kubectl apply -k` would apply it (rendered
/// once per test run).
pub fn example_install() -> &'static [serde_yaml::Value] {
    static RENDERED: std::sync::OnceLock<Vec<serde_yaml::Value>> = std::sync::OnceLock::new();
    RENDERED
        .get_or_init(|| kustomize(&repo_file(EXAMPLE)).unwrap_or_else(|e| panic!("kubectl kustomize {EXAMPLE}:\n{e}")))
}

/// The one object of `kind` among `objects`.
pub fn object<'a>(objects: &'a [serde_yaml::Value], kind: &str) -> &'a serde_yaml::Value {
    let found: Vec<&serde_yaml::Value> = objects.iter().filter(|o| o["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind} among the rendered objects");
    found[0]
}

/// Runs istio/schema-check/validate.mjs on `docs`; its exit status and output.
pub fn schema_check(docs: &[serde_json::Value]) -> (bool, String) {
    let node_modules = repo_file(".venv/schema-check/node_modules");
    assert!(
        node_modules.join("@kubernetes-models/istio").is_dir(),
        "{} is missing: run `make setup` (scripts/setup.d/deploy.sh installs the published CRD schemas from npm)",
        node_modules.display()
    );
    let mut child = Command::new(tool("node"))
        .arg(repo_file("istio/schema-check/validate.mjs"))
        .arg(&node_modules)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting node");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(serde_json::to_string(docs).unwrap().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// The Debian package that brings each tool (scripts/setup.d/deploy.sh).
const TOOLS: &[(&str, &str)] = &[
    ("promtool", "prometheus"),
    ("prometheus", "prometheus"),
    ("umoci", "umoci"),
    ("skopeo", "skopeo"),
    ("docker-registry", "docker-registry"),
    ("jq", "jq"),
    ("node", "nodejs"),
    ("kubectl", "kubectl"),
];

/// A tool on PATH, or a failure that says how to install it.
pub fn tool(name: &str) -> PathBuf {
    let package = TOOLS.iter().find(|(t, _)| *t == name).map_or(name, |(_, p)| p);
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|dir| dir.join(name)).find(|p| p.is_file()))
        .unwrap_or_else(|| {
            panic!("`{name}` is not installed: run `make setup` (scripts/setup.sh installs the Debian package `{package}`)")
        })
}

/// Runs a command to completion; fails with its output unless it succeeded.
pub fn run_ok(command: &mut Command) -> Output {
    let out = command.output().unwrap_or_else(|e| panic!("running {command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A fresh directory for one test's files (configs, storage, logs), kept
/// after the run for a look after a failure.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("grpc-guard-deploy-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A loopback port that was free a moment ago, never one this process
/// handed out before (the Envoys' own picker).
pub fn free_port() -> u16 {
    grpc_guard_demo::envoy::free_port().unwrap()
}

/// A server process started by a test, killed when the test ends, pass or fail.
pub struct Server {
    child: Child,
    log: PathBuf,
}

impl Server {
    /// Starts `command` with its output in `dir/<name>.log` and waits until
    /// `ready_url` answers 200 (10 s at most).
    pub fn start(name: &str, command: &mut Command, dir: &Path, ready_url: &str) -> Server {
        Server::try_start(name, command, dir, ready_url, Duration::from_secs(10)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Server::start`], waiting up to `timeout`; why not, with the log.
    pub fn try_start(
        name: &str,
        command: &mut Command,
        dir: &Path,
        ready_url: &str,
        timeout: Duration,
    ) -> Result<Server, String> {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = command
            .stdin(std::process::Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({command:?}): {e}"));
        let mut server = Server { child, log };
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!("{name} exited with {status} before it was ready:\n{}", server.log_text()));
            }
            if http_get(ready_url, &[]).is_ok() {
                return Ok(server);
            }
            if Instant::now() > deadline {
                return Err(format!("{name} not ready at {ready_url} after {timeout:?}:\n{}", server.log_text()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain-HTTP GET on loopback: status 200's headers and body, or why not.
pub fn http_get(url: &str, headers: &[(&str, &str)]) -> Result<(ureq::http::HeaderMap, Vec<u8>), String> {
    let agent: ureq::Agent = ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(10))).build().into();
    let mut request = agent.get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let mut response = request.call().map_err(|e| format!("GET {url}: {e}"))?;
    let body = response
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_vec()
        .map_err(|e| format!("GET {url}: reading the body: {e}"))?;
    Ok((response.headers().clone(), body))
}
