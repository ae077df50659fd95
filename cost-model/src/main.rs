//! `grpc-guard-cost`: the cost model on the command line. It parses flags,
//! reads the pricing file, and prints what the library computes.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, ValueEnum};
use grpc_guard_cost_model::{
    answer, chart_svg, find_preset, number, parse_pricing, presets, rps_from_monthly, to_csv, usd, Answer, Billing,
    InputError, Inputs, OptionCost, Pricing, SweepRange, DEFAULT_SWEEP_POINTS, MAX_RPS,
};

const ABOUT: &str = "What gRPC's always-on replicas cost against REST scaled to zero, per month.";

const LONG_ABOUT: &str = "\
What gRPC's always-on replicas cost against REST scaled to zero, per month.

Both options serve the same traffic on instances of the same size. REST scales
to zero when idle and pays cold starts in latency; gRPC keeps --grpc-min-replicas
running because clients hold long-lived HTTP/2 connections and streams, and an
open stream keeps a request-billed instance active for its whole life. The
model prices compute (active and idle), requests, a fixed fee and the free tier,
and finds the traffic where the two totals meet and where gRPC's premium falls
to 4x and 2x. A month is 730 hours; prices come from --preset or --pricing FILE.";

const AFTER_HELP: &str = "\
Examples:
  grpc-guard-cost --scenario guide              the guide's $20 vs $150 example, with its assumptions
  grpc-guard-cost --rps 5 --duration-ms 120 --vcpu 1 --gib 1 --preset cloud-run-request
  grpc-guard-cost --rest-preset cloud-run-request --grpc-preset gke-autopilot --json
  grpc-guard-cost --scenario guide --csv --chart cost.svg    the sweep as CSV, and as a chart
  grpc-guard-cost --list-presets                every preset with its source and price date

Exit status: 0 on success, 2 for an invalid flag or input (the message names the
flag), 1 when a file cannot be read or written.";

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ScenarioName {
    /// REST on Cloud Run scaled to zero vs gRPC with 2 replicas holding watch streams.
    Guide,
}

#[derive(Debug, Parser)]
#[command(name = "grpc-guard-cost", version, about = ABOUT, long_about = LONG_ABOUT, after_help = AFTER_HELP)]
#[command(allow_negative_numbers = true)]
struct Cli {
    /// Start from a documented scenario; flags given as well override its values
    #[arg(long, value_enum, help_heading = "Workload")]
    scenario: Option<ScenarioName>,
    /// Mean traffic, requests per second
    #[arg(long, default_value_t = defaults().rps, help_heading = "Workload")]
    rps: f64,
    /// Mean traffic, requests per 730-hour month (instead of --rps)
    #[arg(long, value_name = "N", conflicts_with = "rps", help_heading = "Workload")]
    requests_per_month: Option<f64>,
    /// How traffic spreads over the day: 24 comma-separated weights, hour 0 first (default: flat)
    #[arg(long, value_name = "W0,..,W23", help_heading = "Workload")]
    profile: Option<String>,
    /// Mean time a request keeps an instance busy, milliseconds
    #[arg(long, default_value_t = defaults().duration_ms, help_heading = "Workload")]
    duration_ms: f64,
    /// Requests (or streams) one instance serves at once
    #[arg(long, default_value_t = defaults().concurrency, help_heading = "Workload")]
    concurrency: f64,
    /// vCPUs per instance
    #[arg(long, default_value_t = defaults().vcpu, help_heading = "Workload")]
    vcpu: f64,
    /// GiB of memory per instance
    #[arg(long, default_value_t = defaults().gib, help_heading = "Workload")]
    gib: f64,
    /// Replicas the gRPC option keeps running (at least 1)
    #[arg(long, default_value_t = defaults().grpc_min_replicas, help_heading = "Workload")]
    grpc_min_replicas: f64,
    /// Mean number of long-lived gRPC streams open at any time
    #[arg(long, default_value_t = defaults().streams, help_heading = "Workload")]
    streams: f64,
    /// How long a client keeps a stream open, seconds (default: until the platform's timeout)
    #[arg(long, value_name = "S", help_heading = "Workload")]
    stream_lifetime_s: Option<f64>,
    /// Seconds a request waits when REST has scaled to zero
    #[arg(long, default_value_t = defaults().cold_start_s, help_heading = "Workload")]
    cold_start_s: f64,

    /// Platform for both options (see --list-presets)
    #[arg(long, value_name = "NAME", help_heading = "Prices")]
    preset: Option<String>,
    /// Platform for the REST option (overrides --preset)
    #[arg(long, value_name = "NAME", help_heading = "Prices")]
    rest_preset: Option<String>,
    /// Platform for the gRPC option (overrides --preset)
    #[arg(long, value_name = "NAME", help_heading = "Prices")]
    grpc_preset: Option<String>,
    /// JSON pricing: one object or an array, in presets.json's format. Its entries join the
    /// presets (replacing one of the same name); a file with one entry is used for both options
    /// unless a preset flag says otherwise
    #[arg(long, value_name = "FILE", help_heading = "Prices")]
    pricing: Option<PathBuf>,
    /// List the presets with their prices, sources and dates, and exit
    #[arg(long, help_heading = "Prices")]
    list_presets: bool,

    /// Print everything as JSON: report, assumptions, sweep and inputs
    #[arg(long, conflicts_with = "csv", help_heading = "Output")]
    json: bool,
    /// Print the sweep over traffic as CSV
    #[arg(long, help_heading = "Output")]
    csv: bool,
    /// Write the sweep as an SVG chart to FILE
    #[arg(long, value_name = "FILE", help_heading = "Output")]
    chart: Option<PathBuf>,
    /// Lowest traffic of the sweep, req/s (default: 1/100 of --rps, widened to show the crossings)
    #[arg(long, value_name = "RPS", help_heading = "Output")]
    sweep_from: Option<f64>,
    /// Highest traffic of the sweep, req/s (default: 100 × --rps, widened to show the crossings)
    #[arg(long, value_name = "RPS", help_heading = "Output")]
    sweep_to: Option<f64>,
    /// Points in the sweep
    #[arg(long, default_value_t = DEFAULT_SWEEP_POINTS, help_heading = "Output")]
    sweep_points: usize,
}

fn defaults() -> Inputs {
    Inputs::default()
}

/// Why the CLI stopped: the message names the flag or file.
enum Failure {
    /// A flag or input the model cannot use: exit 2, as clap does.
    Usage(String),
    /// A file that cannot be read or written: exit 1.
    Io(String),
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match run(&cli, &matches) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            eprintln!("error: {message}\n\nFor more information, try '--help'.");
            ExitCode::from(2)
        }
        Err(Failure::Io(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: &Cli, matches: &ArgMatches) -> Result<(), Failure> {
    let (catalogue, from_file) = catalogue(cli.pricing.as_deref())?;
    if cli.list_presets {
        print!("{}", preset_list(&catalogue));
        return Ok(());
    }
    let inputs = inputs(cli, matches, &catalogue, &from_file)?;
    let range = sweep_range(cli, inputs.rps);
    let answer = answer(&inputs, range).map_err(|e| usage(&e, cli))?;

    if let Some(path) = &cli.chart {
        let svg = chart_svg(&inputs, &answer.sweep, &answer.report);
        std::fs::write(path, svg).map_err(|e| Failure::Io(format!("--chart {}: {e}", path.display())))?;
    }
    if cli.json {
        let json = serde_json::to_string_pretty(&answer).map_err(|e| Failure::Io(e.to_string()))?;
        println!("{json}");
    } else if cli.csv {
        print!("{}", to_csv(&answer.sweep));
    } else {
        print!("{}", table(&answer));
        if let Some(path) = &cli.chart {
            println!("\nChart: {}", path.display());
        }
    }
    Ok(())
}

/// The presets, with the pricing file's entries joined in; also returns the
/// file's entries on their own.
fn catalogue(file: Option<&Path>) -> Result<(Vec<Pricing>, Vec<Pricing>), Failure> {
    let mut catalogue = presets();
    let Some(path) = file else { return Ok((catalogue, Vec::new())) };
    let text = std::fs::read_to_string(path).map_err(|e| Failure::Io(format!("--pricing {}: {e}", path.display())))?;
    let entries = parse_pricing(&text).map_err(|e| Failure::Usage(format!("--pricing {}: {e}", path.display())))?;
    for entry in &entries {
        match catalogue.iter_mut().find(|p| p.name == entry.name) {
            Some(existing) => *existing = entry.clone(),
            None => catalogue.push(entry.clone()),
        }
    }
    Ok((catalogue, entries))
}

/// The inputs: the scenario (or the defaults), then every flag given.
fn inputs(cli: &Cli, matches: &ArgMatches, catalogue: &[Pricing], from_file: &[Pricing]) -> Result<Inputs, Failure> {
    let mut inputs = match cli.scenario {
        Some(ScenarioName::Guide) => grpc_guard_cost_model::guide().inputs,
        None => defaults(),
    };
    // A flag counts when typed, or when there is no scenario to keep.
    let given = |id: &str| cli.scenario.is_none() || matches.value_source(id) == Some(ValueSource::CommandLine);
    for (id, value, field) in [
        ("rps", cli.rps, &mut inputs.rps),
        ("duration_ms", cli.duration_ms, &mut inputs.duration_ms),
        ("concurrency", cli.concurrency, &mut inputs.concurrency),
        ("vcpu", cli.vcpu, &mut inputs.vcpu),
        ("gib", cli.gib, &mut inputs.gib),
        ("grpc_min_replicas", cli.grpc_min_replicas, &mut inputs.grpc_min_replicas),
        ("streams", cli.streams, &mut inputs.streams),
        ("cold_start_s", cli.cold_start_s, &mut inputs.cold_start_s),
    ] {
        if given(id) {
            *field = value;
        }
    }
    if let Some(monthly) = cli.requests_per_month {
        inputs.rps = rps_from_monthly(monthly).map_err(|e| usage(&e, cli))?;
    }
    if cli.stream_lifetime_s.is_some() {
        inputs.stream_lifetime_s = cli.stream_lifetime_s;
    }
    if let Some(text) = &cli.profile {
        inputs.profile = Some(parse_profile(text)?);
    }

    // Presets: a flag, else a one-entry pricing file, else the starting
    // point's platform as the catalogue has it (a file may replace it).
    let only_entry = match from_file {
        [one] => Some(one.name.as_str()),
        _ => None,
    };
    let pick = |flag: &str, chosen: Option<&String>, current: &Pricing| -> Result<Pricing, Failure> {
        let name = chosen.map(String::as_str).or(cli.preset.as_deref()).or(only_entry).unwrap_or(&current.name);
        let flag = if chosen.is_some() || cli.preset.is_none() { flag } else { "--preset" };
        find_preset(catalogue, name, flag).map_err(|e| Failure::Usage(e.to_string()))
    };
    inputs.rest_pricing = pick("--rest-preset", cli.rest_preset.as_ref(), &inputs.rest_pricing)?;
    inputs.grpc_pricing = pick("--grpc-preset", cli.grpc_preset.as_ref(), &inputs.grpc_pricing)?;
    Ok(inputs)
}

fn parse_profile(text: &str) -> Result<Vec<f64>, Failure> {
    text.split(',')
        .enumerate()
        .map(|(hour, w)| {
            w.trim()
                .parse::<f64>()
                .map_err(|_| Failure::Usage(format!("--profile: hour {hour}: `{}` is not a number", w.trim())))
        })
        .collect()
}

/// The sweep the flags ask for; `None` leaves it to the library.
fn sweep_range(cli: &Cli, rps: f64) -> Option<SweepRange> {
    if cli.sweep_from.is_none() && cli.sweep_to.is_none() && cli.sweep_points == DEFAULT_SWEEP_POINTS {
        return None;
    }
    let centre = if rps > 0.0 { rps } else { 1.0 };
    Some(SweepRange {
        from_rps: cli.sweep_from.unwrap_or(centre / 100.0),
        to_rps: cli.sweep_to.unwrap_or((centre * 100.0).min(MAX_RPS)),
        points: cli.sweep_points,
    })
}

/// An input error, told with the flag the user typed.
fn usage(error: &InputError, cli: &Cli) -> Failure {
    let field = error.field.as_str();
    let flag = if let Some(hour) = field.strip_prefix("profile[").and_then(|h| h.strip_suffix(']')) {
        format!("--profile: hour {hour}")
    } else if field == "rps" && cli.requests_per_month.is_some() {
        "--requests-per-month".to_owned()
    } else if let Some(rest) = field.strip_prefix("rest_pricing.") {
        format!("--rest-preset: {rest}")
    } else if let Some(rest) = field.strip_prefix("grpc_pricing.") {
        format!("--grpc-preset: {rest}")
    } else {
        format!("--{}", field.replace('_', "-"))
    };
    Failure::Usage(format!("{flag}: {}", error.problem))
}

fn preset_list(catalogue: &[Pricing]) -> String {
    let mut out = String::new();
    for p in catalogue {
        let unit = match p.compute_unit {
            grpc_guard_cost_model::ComputeUnit::Second => "s",
            grpc_guard_cost_model::ComputeUnit::Hour => "h",
        };
        let billing = match p.billing {
            Billing::Request => "request-billed",
            Billing::Instance => "instance-billed",
        };
        out.push_str(&format!("{}\n  {} ({billing})\n", p.name, p.title));
        out.push_str(&format!(
            "  ${} per vCPU-{unit}, ${} per GiB-{unit} active; ${} / ${} idle; ${} per million requests\n",
            p.vcpu_price,
            p.gib_price,
            p.idle_vcpu_price.unwrap_or(p.vcpu_price),
            p.idle_gib_price.unwrap_or(p.gib_price),
            p.per_million_requests
        ));
        out.push_str(&format!(
            "  free: {} vCPU-s, {} GiB-s, {} requests; keep warm {} s; request timeout {}\n",
            number(p.free_vcpu_seconds),
            number(p.free_gib_seconds),
            number(p.free_requests),
            number(p.keep_warm_s),
            p.request_timeout_s.map_or("none".to_owned(), |t| format!("{} s", number(t)))
        ));
        out.push_str(&format!("  prices of {}: {}\n", p.price_date, p.source));
        if !p.notes.is_empty() {
            out.push_str(&format!("  {}\n", p.notes));
        }
        out.push('\n');
    }
    out
}

/// One row of the table: how an option's cell reads.
type Cell<'a> = &'a dyn Fn(&OptionCost) -> String;

fn table(answer: &Answer) -> String {
    let r = &answer.report;
    let (rest, grpc) = (&r.rest, &r.grpc);
    let mut out = format!(
        "REST scaled to zero vs gRPC with {} always-on replicas, at {} req/s ({} requests/month)\n\n",
        number(grpc.min_replicas),
        number(r.traffic.rps),
        number(r.traffic.requests_per_month.round())
    );
    let rows: [(&str, Cell); 14] = [
        ("platform", &|o| o.platform.clone()),
        ("compute, active", &|o| usd(o.breakdown.compute_active)),
        ("compute, idle", &|o| usd(o.breakdown.compute_idle)),
        ("requests", &|o| usd(o.breakdown.requests)),
        ("fixed", &|o| usd(o.breakdown.fixed)),
        ("free tier", &|o| usd(o.breakdown.free_tier)),
        ("total per month", &|o| usd(o.breakdown.total)),
        ("", &|_| String::new()),
        ("active instance-hours", &|o| number(o.usage.active_instance_hours.round())),
        ("idle instance-hours", &|o| number(o.usage.idle_instance_hours.round())),
        ("cold starts per month", &|o| number(o.cold_starts.per_month.round())),
        ("requests that wait a cold start", &|o| format!("{:.2} %", o.cold_starts.request_share * 100.0)),
        ("mean added latency", &|o| format!("{:.1} ms", o.cold_starts.mean_added_latency_ms)),
        ("stream reconnects per month", &|o| number(o.forced_reconnects_per_month.round())),
    ];
    out.push_str(&format!("{:<32}{:>22}{:>22}\n", "", "REST, scale to zero", "gRPC, always on"));
    for (label, cell) in rows {
        out.push_str(format!("{label:<32}{:>22}{:>22}", cell(rest), cell(grpc)).trim_end());
        out.push('\n');
    }
    out.push('\n');
    out.push_str(&match r.ratio {
        Some(ratio) => format!("gRPC costs {ratio:.2}× REST at this traffic.\n"),
        None => "REST costs nothing at this traffic.\n".to_owned(),
    });
    out.push_str(&match r.break_even {
        Some(at) => format!(
            "Break-even: {} req/s ({} requests/month).\n",
            number(at.rps),
            number(at.requests_per_month.round())
        ),
        None => format!("Break-even: none up to {} req/s.\n", number(MAX_RPS)),
    });
    for mark in &r.ratio_falls_to {
        out.push_str(&match mark.at {
            Some(at) => format!(
                "The ratio falls to {}× at {} req/s ({} requests/month).\n",
                mark.ratio,
                number(at.rps),
                number(at.requests_per_month.round())
            ),
            None => format!("The ratio stays above {}× up to {} req/s.\n", mark.ratio, number(MAX_RPS)),
        });
    }
    out.push_str("\nAssumptions:\n");
    for line in &answer.assumptions {
        out.push_str(&format!("  - {line}\n"));
    }
    out
}
