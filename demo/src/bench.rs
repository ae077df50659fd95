//! The measuring half of `make bench`: h2load (nghttp2's HTTP/2 load
//! generator) driving unary Echo calls through Envoy, and what the bench reads
//! of each process from `/proc`. Timing lives here and only here: tests never
//! assert wall-clock figures.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use prost::Message;

use crate::pb::EchoRequest;

/// The message of every benchmark call: 64 bytes of text, a 71-byte gRPC
/// frame on the wire, as in DESIGN.md §7.
pub fn echo_request() -> EchoRequest {
    EchoRequest { message: "x".repeat(64), ..EchoRequest::default() }
}

/// [`echo_request`] as the request body h2load sends: one uncompressed gRPC
/// frame.
pub fn echo_frame() -> Vec<u8> {
    let message = echo_request().encode_to_vec();
    let mut frame = vec![0];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    frame
}

/// One h2load run: what to send, how hard.
#[derive(Clone, Debug)]
pub struct Load {
    pub url: String,
    pub body: std::path::PathBuf,
    pub headers: Vec<String>,
    pub connections: usize,
    pub streams: usize,
    pub duration: Duration,
    /// Requests per second in all (open loop); `None`: as fast as Envoy answers
    /// (closed loop).
    pub rate: Option<f64>,
    /// Where h2load writes one line per request (its latency).
    pub log: std::path::PathBuf,
}

/// What one h2load run saw.
#[derive(Clone, Debug, Default)]
pub struct Window {
    pub done: u64,
    /// Requests answered 2xx (gRPC errors ride on 200s: see the upstream's
    /// count for those).
    pub succeeded: u64,
    pub elapsed: Duration,
    /// Latency of each request, microseconds, sorted.
    pub latencies_us: Vec<u32>,
    /// CPU the load side (h2load and this process, which serves the
    /// upstream) used, as a share of one CPU.
    pub load_cpu_share: f64,
}

impl Window {
    pub fn throughput(&self) -> f64 {
        self.done as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `q` quantile (0..=1) of the latencies, microseconds.
    pub fn quantile_us(&self, q: f64) -> f64 {
        quantile_us(&self.latencies_us, q)
    }
}

/// The `q` quantile (0..=1) of sorted latencies, microseconds; NaN for none.
pub fn quantile_us(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() - 1) as f64 * q).round() as usize;
    f64::from(sorted[rank.min(sorted.len() - 1)])
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("running h2load (Debian package nghttp2-client): {0}")]
    Spawn(#[from] std::io::Error),
    #[error("h2load failed ({status}): {output}")]
    Failed { status: String, output: String },
    #[error("h2load printed no `{what}` line: {output}")]
    Output { what: &'static str, output: String },
}

impl Load {
    /// Runs h2load once and reads what it reports.
    pub fn run(&self) -> Result<Window, BenchError> {
        let mut command = Command::new("h2load");
        command
            .args(["-c", &self.connections.to_string(), "-m", &self.streams.to_string()])
            .args(["-D", &format!("{}", self.duration.as_secs().max(1))])
            .arg("-d")
            .arg(&self.body)
            .arg("--log-file")
            .arg(&self.log);
        if let Some(rate) = self.rate {
            // --rps is per connection.
            let per_connection = (rate / self.connections as f64).round().max(1.0);
            command.args(["--rps", &format!("{per_connection}")]);
        }
        for header in &self.headers {
            command.args(["-H", header]);
        }
        command.arg(&self.url);
        // h2load appends to its log file: each window reads only its own.
        let _ = std::fs::remove_file(&self.log);
        let cpu_before = own_and_children_cpu();
        let started = Instant::now();
        let output = command.output()?;
        let elapsed = started.elapsed();
        let load_cpu = match (cpu_before, own_and_children_cpu()) {
            (Some(b), Some(a)) => (a - b).as_secs_f64() / elapsed.as_secs_f64(),
            _ => f64::NAN,
        };
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        if !output.status.success() {
            return Err(BenchError::Failed { status: output.status.to_string(), output: text });
        }
        let requests = text
            .lines()
            .find(|l| l.starts_with("requests:"))
            .ok_or_else(|| BenchError::Output { what: "requests:", output: text.clone() })?;
        // "requests: 100 total, 100 started, 100 done, 98 succeeded, 2 failed, ..."
        let count = |word: &str| -> u64 {
            requests
                .split(',')
                .find_map(|part| {
                    let mut tokens = part.split_whitespace().rev();
                    (tokens.next()? == word).then(|| tokens.next()?.parse().ok()).flatten()
                })
                .unwrap_or(0)
        };
        let mut latencies_us: Vec<u32> = std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.split('\t').nth(2)?.trim().parse().ok())
            .collect();
        latencies_us.sort_unstable();
        Ok(Window {
            done: count("done"),
            succeeded: count("succeeded"),
            elapsed: self.duration,
            latencies_us,
            load_cpu_share: load_cpu,
        })
    }
}

/// User + system CPU time a process has used so far (Linux `/proc`).
pub fn process_cpu(pid: u32) -> Option<Duration> {
    let fields = stat_fields(&Path::new("/proc").join(pid.to_string()).join("stat"))?;
    // utime and stime are the 14th and 15th fields of the line, in clock
    // ticks (USER_HZ, 100 per second on every mainstream Linux build).
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// CPU time of this process and of the children it has waited for.
fn own_and_children_cpu() -> Option<Duration> {
    let fields = stat_fields(Path::new("/proc/self/stat"))?;
    let ticks: u64 = fields.get(11..15)?.iter().map(|f| f.parse::<u64>().unwrap_or(0)).sum();
    Some(Duration::from_millis(ticks * 10))
}

/// The fields of a `/proc/PID/stat` line after the command name.
fn stat_fields(path: &Path) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(path).ok()?;
    Some(stat.rsplit_once(')')?.1.split_whitespace().map(str::to_owned).collect())
}

/// Resident memory of a process, bytes (`VmRSS`).
pub fn process_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("status")).ok()?;
    let kib: u64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

/// Median of a few values (rounds), NaN for none.
pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_the_sorted_latencies() {
        let sorted = [1, 2, 3, 4, 5];
        assert_eq!(quantile_us(&sorted, 0.5), 3.0);
        assert_eq!(quantile_us(&sorted, 0.0), 1.0);
        assert_eq!(quantile_us(&sorted, 1.0), 5.0);
        assert!(quantile_us(&[], 0.5).is_nan());
    }

    #[test]
    fn echo_frame_is_a_71_byte_grpc_frame() {
        let frame = echo_frame();
        assert_eq!(frame.len(), 71);
        assert_eq!(frame[..5], [0, 0, 0, 0, 66]);
    }

    #[test]
    fn process_figures_parse_this_process() {
        assert!(process_cpu(std::process::id()).is_some());
        assert!(process_cpu(u32::MAX).is_none());
        assert!(process_rss(std::process::id()).is_some_and(|rss| rss > 0));
        assert!(own_and_children_cpu().is_some());
    }

    #[test]
    fn median_of_rounds() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert!(median(&mut []).is_nan());
    }
}
