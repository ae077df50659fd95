//! `make run`: grpc-guard in a real Envoy in front of the demo gRPC service,
//! with demo traffic, and what grpc-guard saw of it.
//!
//! Starts the demo service and Envoy (the shipped `envoy/envoy.yaml` with the
//! release `.wasm`), sends the `mix` scenario and a call to an upstream that is
//! down, prints the per-method Prometheus lines and sample JSON log lines, then
//! keeps serving until Ctrl-C (or `--seconds`). `render` prints the Envoy
//! config instead, for running Envoy yourself (`docker run`).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use grpc_guard_demo::envoy::{Envoy, EnvoyParams, FilterArgs, HttpFilter, TEMPLATE};
use grpc_guard_demo::scenario::{self, Scenario};
use grpc_guard_demo::{lazy_channel, Observed};
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(version, about = "Run grpc-guard in a local Envoy in front of the demo gRPC service")]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    filter: FilterArgs,
    /// Envoy's gRPC listener port on 127.0.0.1.
    #[arg(long, default_value_t = 10000)]
    listen_port: u16,
    /// Envoy's admin port on 127.0.0.1 (/stats/prometheus).
    #[arg(long, default_value_t = 9901)]
    admin_port: u16,
    /// The demo gRPC service's port on 127.0.0.1.
    #[arg(long, default_value_t = 50051)]
    upstream_port: u16,
    /// A port where nothing listens, for the "upstream down" demo route.
    #[arg(long, default_value_t = 50099)]
    down_port: u16,
    /// An etcd member's client address (repeat for each member): adds the
    /// `grpc_guard_etcd` cluster, for `dedup.store: "etcd"`.
    #[arg(long = "etcd")]
    etcd: Vec<SocketAddr>,
    /// Envoy worker threads.
    #[arg(long, default_value_t = 2)]
    concurrency: u32,
    /// Stop after serving this many seconds; by default serve until Ctrl-C.
    #[arg(long)]
    seconds: Option<u64>,
    /// Where Envoy's rendered config and logs go.
    #[arg(long, default_value = ".run")]
    run_dir: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Print the rendered Envoy configuration (for `docker run envoyproxy/envoy`).
    Render,
}

impl Args {
    fn params(&self) -> EnvoyParams {
        EnvoyParams {
            listen_port: self.listen_port,
            admin_port: self.admin_port,
            upstream: SocketAddr::from((Ipv4Addr::LOCALHOST, self.upstream_port)),
            down_port: self.down_port,
            wasm: self.filter.wasm.clone(),
            plugin_config: self.filter.plugin_config.clone(),
            http_filter: HttpFilter::GrpcGuard,
            filters_before: String::new(),
            set_request_headers: Vec::new(),
            access_log: true,
            hold_headers: true,
            failure_policy: grpc_guard_demo::envoy::FAILURE_POLICY.to_owned(),
            etcd: self.etcd.clone(),
        }
    }
}

/// Calls that answered HTTP 200 and the non-OK gRPC codes among them: the
/// failures an HTTP-only dashboard does not see.
fn hidden_failures(logs: &[String]) -> (usize, Vec<String>) {
    let lines: Vec<serde_json::Value> = logs.iter().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let http_ok: Vec<&serde_json::Value> = lines.iter().filter(|v| v["http_status"] == 200).collect();
    let failed = http_ok
        .iter()
        .filter(|v| v["grpc_code"] != "OK")
        .map(|v| v["grpc_code"].as_str().unwrap_or("?").to_owned())
        .collect();
    (http_ok.len(), failed)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::Render) = args.command {
        return match args.params().render(TEMPLATE) {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("grpc-guard-run: {e}");
                ExitCode::from(2)
            }
        };
    }
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("grpc-guard-run: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let upstream_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, args.upstream_port));
    let listener = TcpListener::bind(upstream_addr)
        .await
        .map_err(|e| format!("demo service cannot listen on {upstream_addr}: {e} (use --upstream-port)"))?;
    let observed = Observed::default();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(grpc_guard_demo::serve(listener, observed.clone(), async move {
        let _ = stopped.await;
    }));
    println!("== demo gRPC service on {upstream_addr}");

    let params = args.params();
    let envoy = Envoy::start(&args.filter.envoy, params.clone(), args.concurrency, &args.run_dir)?;
    println!(
        "== Envoy {} with grpc-guard ({}), config {}",
        params.listen_addr(),
        args.filter.wasm.display(),
        args.run_dir.join("envoy.yaml").display()
    );

    println!("\n== demo traffic through Envoy");
    let channel = lazy_channel(&envoy.grpc_uri())?;
    let mut unexpected = 0;
    for planned in Scenario::Mix.calls().into_iter().chain(Scenario::Down.calls().into_iter().take(1)) {
        let outcome = scenario::run(&channel, planned, None).await;
        println!("  {outcome}");
        if !outcome.is_expected() {
            unexpected += 1;
        }
    }

    println!("\n== every guard at work (envoy/demo-plugin-config.json)");
    for shown in grpc_guard_demo::tour::guards(&channel, || observed.executions("Echo")).await {
        println!("  {shown}");
    }

    // Histograms reach /stats/prometheus at Envoy's next stats flush (1 s).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    println!(
        "\n== what grpc-guard counted: http://{}/stats/prometheus (buckets and sums left out)",
        params.admin_addr()
    );
    for line in envoy.prometheus()?.lines() {
        if line.starts_with("grpc_") && !line.contains("_bucket{") && !line.contains("_sum{") {
            println!("  {line}");
        }
    }
    println!(
        "\n== what grpc-guard logged (one JSON line per call; Envoy log: {})",
        args.run_dir.join("envoy.log").display()
    );
    for line in envoy.call_logs().iter().take(6) {
        println!("  {line}");
    }
    let logs = envoy.call_logs();
    println!("  … {} lines in all", logs.len());
    let (http_ok, failed) = hidden_failures(&logs);
    println!(
        "\n== HTTP said 200 for {http_ok} of {} calls; gRPC said {} of those failed: {}",
        logs.len(),
        failed.len(),
        failed.join(", ")
    );
    println!("\n== the upstream executed Echo {} times", observed.executions("Echo"));

    println!(
        "\n== serving: gRPC on {listen}, admin on http://{admin}\n  try:  {client} --target http://{listen}\n        curl -s http://{admin}/stats/prometheus | grep ^grpc_\n        grpcurl -plaintext -import-path demo/proto -proto demo.proto -d '{{\"message\":\"hi\",\"fail_code\":5}}' {listen} grpcguard.demo.v1.Demo/Echo",
        listen = params.listen_addr(),
        admin = params.admin_addr(),
        client = std::env::current_exe()?.with_file_name("demo-client").display(),
    );
    match args.seconds {
        Some(s) => {
            println!("  (stopping after {s} s)");
            tokio::time::sleep(Duration::from_secs(s)).await;
        }
        None => {
            println!("  Ctrl-C to stop");
            tokio::signal::ctrl_c().await?;
        }
    }
    drop(envoy);
    let _ = stop.send(());
    let _ = server.await;
    if unexpected > 0 {
        return Err(format!("{unexpected} demo calls got an unexpected status (see above)").into());
    }
    Ok(())
}
