//! `make bench`: what grpc-guard costs, as ratios against the same Envoy with
//! no filter ("bare") and with Envoy's native `grpc_stats` filter, measured in
//! one run with the same load generator and the same upstream (DESIGN.md §7).
//!
//! Envoy runs with one worker pinned to one CPU; this process (load generator
//! and demo upstream, on one thread) should be pinned to the other
//! (`taskset -c 1`, as `make bench` does). Rounds interleave the variants so
//! drift on a noisy machine hits them alike; the report gives the median of
//! the rounds.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use grpc_guard_demo::bench::{self, median, Window};
use grpc_guard_demo::envoy::{Envoy, EnvoyParams, FilterArgs, HttpFilter};
use grpc_guard_demo::{lazy_channel, Observed};
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(version, about = "Measure grpc-guard against bare Envoy and Envoy's grpc_stats filter")]
struct Args {
    #[command(flatten)]
    filter: FilterArgs,
    /// CPUs Envoy is pinned to (taskset syntax).
    #[arg(long, default_value = "0")]
    envoy_cpus: String,
    /// Rounds; each runs every variant once.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds of each measured window.
    #[arg(long, default_value_t = 4)]
    seconds: u64,
    /// Concurrent callers in the closed loop.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// The fixed rate, as a fraction of bare Envoy's closed-loop throughput.
    #[arg(long, default_value_t = 0.4)]
    load_fraction: f64,
    #[arg(long, default_value = ".run/bench")]
    run_dir: PathBuf,
}

const VARIANTS: [HttpFilter; 3] = [HttpFilter::None, HttpFilter::GrpcStats, HttpFilter::GrpcGuard];

/// One variant's figures in one round.
#[derive(Clone, Debug, Default)]
struct Round {
    throughput: f64,
    closed_p50_us: f64,
    closed_p99_us: f64,
    fixed_p50_us: f64,
    fixed_p99_us: f64,
    cpu_us_per_call_fixed: f64,
    errors: u64,
}

fn cpu_per_call(before: Option<Duration>, after: Option<Duration>, w: &Window) -> f64 {
    match (before, after) {
        (Some(b), Some(a)) if w.calls > 0 => (a - b).as_secs_f64() * 1e6 / w.calls as f64,
        _ => f64::NAN,
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("grpc-guard-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let upstream: SocketAddr = listener.local_addr()?;
    tokio::spawn(grpc_guard_demo::serve(listener, Observed::default(), std::future::pending()));

    let window = Duration::from_secs(args.seconds);
    let mut results: Vec<Vec<Round>> = vec![Vec::new(); VARIANTS.len()];
    for round in 1..=args.rounds {
        let mut bare_throughput = None;
        for (i, variant) in VARIANTS.iter().enumerate() {
            let mut params =
                EnvoyParams::on_free_ports(upstream, args.filter.wasm.clone(), &args.filter.plugin_config)?;
            params.http_filter = *variant;
            let dir = args.run_dir.join(format!("{}-{round}", variant.name()));
            let envoy = Envoy::start_on(&args.filter.envoy, params, 1, &dir, Some(&args.envoy_cpus))?;
            let pid = envoy.pid();
            let channel = lazy_channel(&envoy.grpc_uri())?;
            // Warm-up: connections, V8 tiering, stat creation.
            bench::closed_loop(&channel, args.concurrency, Duration::from_secs(1)).await;

            let closed = bench::closed_loop(&channel, args.concurrency, window).await;
            let rate = args.load_fraction * *bare_throughput.get_or_insert(closed.throughput());
            let before_fixed = bench::process_cpu(pid);
            let fixed = bench::fixed_rate(&channel, rate, window).await;
            let after_fixed = bench::process_cpu(pid);
            let r = Round {
                throughput: closed.throughput(),
                closed_p50_us: closed.quantile_us(0.5),
                closed_p99_us: closed.quantile_us(0.99),
                fixed_p50_us: fixed.quantile_us(0.5),
                fixed_p99_us: fixed.quantile_us(0.99),
                cpu_us_per_call_fixed: cpu_per_call(before_fixed, after_fixed, &fixed),
                errors: closed.errors + fixed.errors,
            };
            eprintln!(
                "round {round} {:>10}: {:>8.0} calls/s  p50 {:>6.0} µs  p99 {:>6.0} µs  | at {:.0}/s: p50 {:>6.0} µs p99 {:>6.0} µs  Envoy CPU {:.1} µs/call  errors {}",
                variant.name(),
                r.throughput,
                r.closed_p50_us,
                r.closed_p99_us,
                rate,
                r.fixed_p50_us,
                r.fixed_p99_us,
                r.cpu_us_per_call_fixed,
                r.errors
            );
            results[i].push(r);
        }
    }
    report(&args, &results);
    Ok(())
}

fn report(args: &Args, results: &[Vec<Round>]) {
    let med = |i: usize, f: fn(&Round) -> f64| median(&mut results[i].iter().map(f).collect::<Vec<_>>());
    let bare = 0;
    println!(
        "\n## grpc-guard benchmark: median of {} rounds, {} s windows, {} callers, Envoy --concurrency 1 on CPU {}",
        args.rounds, args.seconds, args.concurrency, args.envoy_cpus
    );
    println!("plugin config: {}\n", args.filter.plugin_config);
    println!("| variant | calls/s | × bare | p50 µs | p99 µs | p50 at {:.0}% load µs | × bare | p99 at that load µs | Envoy CPU µs/call (fixed rate) | + vs bare |", args.load_fraction * 100.0);
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (i, variant) in VARIANTS.iter().enumerate() {
        println!(
            "| {} | {:.0} | {:.2} | {:.0} | {:.0} | {:.0} | {:.2} | {:.0} | {:.1} | {:+.1} |",
            variant.name(),
            med(i, |r| r.throughput),
            med(i, |r| r.throughput) / med(bare, |r| r.throughput),
            med(i, |r| r.closed_p50_us),
            med(i, |r| r.closed_p99_us),
            med(i, |r| r.fixed_p50_us),
            med(i, |r| r.fixed_p50_us) / med(bare, |r| r.fixed_p50_us),
            med(i, |r| r.fixed_p99_us),
            med(i, |r| r.cpu_us_per_call_fixed),
            med(i, |r| r.cpu_us_per_call_fixed) - med(bare, |r| r.cpu_us_per_call_fixed),
        );
    }
    let errors: u64 = results.iter().flatten().map(|r| r.errors).sum();
    println!("\nfailed calls: {errors}. CPU from /proc/PID/stat (10 ms ticks); ratios move between runs on a shared 2-core machine: compare within one run.");
}
