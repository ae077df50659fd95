//! The browser page in headless Chromium, driven over W3C WebDriver the way a
//! user drives it: type into the form, pick platforms, click the scenario
//! button, and check that every number the page shows equals the CLI's
//! `--json` for the same inputs. Keeps a screenshot in
//! `.run/cost-model/screenshot.png`.
//!
//! Needs Debian's `chromium` and `chromium-driver` and `wasm-bindgen`
//! (`bash scripts/setup.sh` installs them); builds the page itself.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine;
use grpc_guard_cost_model::usd;
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
const SETUP_HINT: &str = "run `bash scripts/setup.sh` (or `make setup`) to install it";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn on_path(tool: &str) -> bool {
    Command::new(tool).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
}

/// Builds the page with the same script as `make web`.
fn build_page(out: &Path) {
    let script = repo_root().join("cost-model/web/build.sh");
    let status = Command::new("bash").arg(&script).arg(out).status().expect("run cost-model/web/build.sh");
    assert!(status.success(), "building the page failed: cost-model/web/build.sh {}", out.display());
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

// --- A static file server on a free loopback port, stopped on drop.

struct StaticServer {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StaticServer {
    fn start(root: PathBuf) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the page server");
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = stream {
                    serve(stream, &root);
                }
            }
        });
        StaticServer { port, stop, thread: Some(thread) }
    }
}

impl Drop for StaticServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port)); // wakes the accept loop
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(stream: TcpStream, root: &Path) {
    let mut reader = BufReader::new(&stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut line = String::new();
    while reader.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
        line.clear();
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("/").split('?').next().unwrap_or("/");
    let path = if path == "/" { "/index.html" } else { path };
    let file = (!path.contains("..")).then(|| root.join(path.trim_start_matches('/')));
    let (status, body) = match file.and_then(|f| std::fs::read(f).ok()) {
        Some(body) => ("200 OK", body),
        None => ("404 Not Found", b"not found".to_vec()),
    };
    let content_type = match path.rsplit('.').next() {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript",
        Some("css") => "text/css",
        Some("wasm") => "application/wasm",
        _ => "application/octet-stream",
    };
    let mut stream = &stream;
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(&body);
}

// --- A minimal W3C WebDriver client over plain HTTP/1.1.

struct Driver {
    port: u16,
    process: Child,
    session: Option<String>,
    profile: PathBuf,
}

const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Driver {
    fn start(profile: PathBuf, log: &Path) -> Self {
        let port = free_port();
        let log_file = std::fs::File::create(log).expect("chromedriver log");
        let process = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start chromedriver ({e}): {SETUP_HINT}"));
        let mut driver = Driver { port, process, session: None, profile };
        let deadline = Instant::now() + Duration::from_secs(20);
        while driver.http("GET", "/status", None).ok().and_then(|v| v["value"]["ready"].as_bool()) != Some(true) {
            assert!(Instant::now() < deadline, "chromedriver did not become ready; see {}", log.display());
            std::thread::sleep(Duration::from_millis(100));
        }
        std::fs::create_dir_all(&driver.profile).unwrap();
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    format!("--user-data-dir={}", driver.profile.display()),
                    "--window-size=1300,1500", "--lang=en-US",
                ]
            }
        }}});
        let created = driver.http("POST", "/session", Some(capabilities)).expect("create a WebDriver session");
        let id = created["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {created}"));
        driver.session = Some(id.to_owned());
        driver
    }

    fn http(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).map_err(|e| e.to_string())?;
        stream.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.port,
            body.len()
        )
        .map_err(|e| e.to_string())?;
        // chromedriver keeps the connection open whatever the request says:
        // read the head, then exactly Content-Length bytes.
        let mut reader = BufReader::new(stream);
        let mut length = 0;
        let mut line = String::new();
        loop {
            line.clear();
            reader.read_line(&mut line).map_err(|e| e.to_string())?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().map_err(|_| format!("bad Content-Length: {header}"))?;
                }
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).map_err(|e| e.to_string())?;
        let body = String::from_utf8_lossy(&body);
        let value: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if value["value"]["error"].is_string() {
            return Err(format!("{method} {path}: {}", value["value"]));
        }
        Ok(value)
    }

    /// A command on the session; its `value`.
    fn call(&self, method: &str, command: &str, body: Option<Value>) -> Value {
        let session = self.session.as_deref().expect("a session");
        let path = format!("/session/{session}{command}");
        self.http(method, &path, body).unwrap_or_else(|e| panic!("{e}"))["value"].take()
    }

    fn goto(&self, url: &str) {
        self.call("POST", "/url", Some(json!({ "url": url })));
    }

    fn script(&self, script: &str) -> Value {
        self.call("POST", "/execute/sync", Some(json!({ "script": script, "args": [] })))
    }

    fn find(&self, css: &str) -> String {
        let found = self.call("POST", "/element", Some(json!({ "using": "css selector", "value": css })));
        found[ELEMENT_KEY].as_str().unwrap_or_else(|| panic!("no element {css}")).to_owned()
    }

    fn click(&self, css: &str) {
        let element = self.find(css);
        self.call("POST", &format!("/element/{element}/click"), Some(json!({})));
    }

    /// Clears a field and types `text` into it, key by key.
    fn type_into(&self, css: &str, text: &str) {
        let element = self.find(css);
        self.call("POST", &format!("/element/{element}/clear"), Some(json!({})));
        self.call("POST", &format!("/element/{element}/value"), Some(json!({ "text": text })));
    }

    fn screenshot(&self, path: &Path) {
        let png = self.call("GET", "/screenshot", None);
        let bytes = base64::engine::general_purpose::STANDARD.decode(png.as_str().expect("base64 PNG")).unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    /// Waits until `script` returns true.
    fn wait_for(&self, script: &str, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.script(script) != Value::Bool(true) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            let _ = self.http("DELETE", &format!("/session/{session}"), None);
        }
        let _ = self.process.kill();
        let _ = self.process.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

// --- What the page shows, against what the CLI prints.

fn cli_json(args: &[&str]) -> Value {
    let out: Output = Command::new(env!("CARGO_BIN_EXE_grpc-guard-cost"))
        .args(args)
        .arg("--json")
        .output()
        .expect("run grpc-guard-cost");
    assert!(out.status.success(), "grpc-guard-cost {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Every `[data-value]` element's id and value, and the totals as shown.
const READ_PAGE: &str = r#"
    const values = {};
    for (const el of document.querySelectorAll('[data-value]')) values[el.id] = Number(el.dataset.value);
    return { values, rest_total_text: document.getElementById('rest-total').textContent,
             grpc_total_text: document.getElementById('grpc-total').textContent,
             errors: [...document.querySelectorAll('.error')].map(e => e.textContent).join(''),
             curves: document.querySelectorAll('#chart svg polyline').length };
"#;

/// The page's figure ids and where the CLI's JSON has each.
fn expected_figures(cli: &Value) -> Vec<(String, Option<f64>)> {
    let mut figures = vec![
        ("rest-total".to_owned(), cli["rest"]["breakdown"]["total"].as_f64()),
        ("grpc-total".to_owned(), cli["grpc"]["breakdown"]["total"].as_f64()),
        ("ratio".to_owned(), cli["ratio"].as_f64()),
        ("break-even".to_owned(), cli["break_even"]["rps"].as_f64()),
        ("ratio-4".to_owned(), cli["ratio_falls_to"][0]["at"]["rps"].as_f64()),
        ("ratio-2".to_owned(), cli["ratio_falls_to"][1]["at"]["rps"].as_f64()),
    ];
    for side in ["rest", "grpc"] {
        let o = &cli[side];
        for (id, value) in [
            ("compute_active", &o["breakdown"]["compute_active"]),
            ("compute_idle", &o["breakdown"]["compute_idle"]),
            ("requests", &o["breakdown"]["requests"]),
            ("fixed", &o["breakdown"]["fixed"]),
            ("free_tier", &o["breakdown"]["free_tier"]),
            ("total", &o["breakdown"]["total"]),
            ("active_instance_hours", &o["usage"]["active_instance_hours"]),
            ("idle_instance_hours", &o["usage"]["idle_instance_hours"]),
            ("cold_starts", &o["cold_starts"]["per_month"]),
            ("cold_share", &o["cold_starts"]["request_share"]),
            ("added_latency_ms", &o["cold_starts"]["mean_added_latency_ms"]),
            ("reconnects", &o["forced_reconnects_per_month"]),
        ] {
            figures.push((format!("{side}-{id}"), value.as_f64()));
        }
    }
    figures
}

/// The page and the CLI agree to 1e-9 relative (the browser's `exp` and
/// `ln` may differ from the C library's in the last bit), and the totals
/// read exactly as the CLI's table prints them.
fn page_matches(page: &Value, cli: &Value) -> Result<(), String> {
    if !page["errors"].as_str().unwrap_or("").is_empty() {
        return Err(format!("the page shows an error: {}", page["errors"]));
    }
    for (id, expected) in expected_figures(cli) {
        let shown = page["values"][&id].as_f64();
        let same = match (shown, expected) {
            (Some(a), Some(b)) => (a - b).abs() <= 1e-9 * b.abs().max(1e-6),
            (None, None) => true,
            _ => false,
        };
        if !same {
            return Err(format!("{id}: page {shown:?}, CLI {expected:?}"));
        }
    }
    for side in ["rest", "grpc"] {
        let text = page[format!("{side}_total_text")].as_str().unwrap_or("");
        let cli_text = usd(cli[side]["breakdown"]["total"].as_f64().unwrap());
        if text != cli_text {
            return Err(format!("{side} total reads {text:?}, the CLI's {cli_text:?}"));
        }
    }
    if page["curves"] != 2 {
        return Err(format!("the chart has {} curves", page["curves"]));
    }
    Ok(())
}

/// Polls the page until it matches the CLI (typing fires one update per key).
fn assert_page_matches(driver: &Driver, cli: &Value, case: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let page = driver.script(READ_PAGE);
        match page_matches(&page, cli) {
            Ok(()) => return,
            Err(why) if Instant::now() > deadline => panic!("{case}: the page disagrees with the CLI: {why}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

#[test]
fn the_page_shows_the_clis_numbers_for_what_the_user_types() {
    for tool in ["chromedriver", "wasm-bindgen"] {
        assert!(on_path(tool), "{tool} is not installed: {SETUP_HINT}");
    }
    assert!(Path::new(CHROMIUM).exists(), "{CHROMIUM} is not installed: {SETUP_HINT}");

    let root = repo_root();
    let artifacts = root.join(".run/cost-model");
    let site = artifacts.join("web");
    build_page(&site);
    let server = StaticServer::start(site);
    let profile = std::env::temp_dir().join(format!("grpc-guard-cost-chromium-{}", std::process::id()));
    let driver = Driver::start(profile, &artifacts.join("chromedriver.log"));

    driver.goto(&format!("http://127.0.0.1:{}/", server.port));
    driver.wait_for("return document.body.dataset.ready === '1'", "the page to load its wasm");

    // 1. Typed inputs, traffic per month, a different platform for each option.
    driver.click("#traffic-unit option[value=month]");
    for (field, text) in [
        ("#rps", "7500000"),
        ("#duration_ms", "250"),
        ("#concurrency", "40"),
        ("#vcpu", "2"),
        ("#gib", "4"),
        ("#grpc_min_replicas", "3"),
        ("#streams", "1.5"),
        ("#stream_lifetime_s", "1800"),
        ("#cold_start_s", "4"),
        ("#profile", "1,1,1,1,1,1,2,4,6,8,8,8,8,8,8,8,6,4,2,2,1,1,1,1"),
    ] {
        driver.type_into(field, text);
    }
    driver.click("#rest_preset option[value=cloud-run-request]");
    driver.click("#grpc_preset option[value=gke-autopilot]");
    let cli = cli_json(&[
        "--requests-per-month",
        "7500000",
        "--duration-ms",
        "250",
        "--concurrency",
        "40",
        "--vcpu",
        "2",
        "--gib",
        "4",
        "--grpc-min-replicas",
        "3",
        "--streams",
        "1.5",
        "--stream-lifetime-s",
        "1800",
        "--cold-start-s",
        "4",
        "--profile",
        "1,1,1,1,1,1,2,4,6,8,8,8,8,8,8,8,6,4,2,2,1,1,1,1",
        "--rest-preset",
        "cloud-run-request",
        "--grpc-preset",
        "gke-autopilot",
    ]);
    assert!(cli["break_even"]["rps"].is_f64(), "this case should cross: {}", cli["break_even"]);
    assert_page_matches(&driver, &cli, "typed inputs");

    // 2. The guide's scenario, one click; the screenshot shows it.
    driver.click("#load-guide");
    assert_page_matches(&driver, &cli_json(&["--scenario", "guide"]), "the guide's scenario");
    driver.screenshot(&artifacts.join("screenshot.png"));

    // 3. A bad value: the error sits beside its field and the results go stale.
    driver.type_into("#grpc_min_replicas", "0");
    driver.wait_for(
        "return document.getElementById('err-grpc_min_replicas').textContent.includes('must be at least 1') \
         && document.getElementById('results').classList.contains('stale') \
         && document.getElementById('grpc_min_replicas').classList.contains('invalid')",
        "the error beside --grpc-min-replicas",
    );
    driver.type_into("#rps", "fast");
    driver.wait_for(
        "return document.getElementById('err-rps').textContent === 'must be a number'",
        "the error beside the traffic field",
    );
    driver.screenshot(&artifacts.join("screenshot-error.png"));
}
