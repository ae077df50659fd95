//! Load generation and the figures `make bench` reports: throughput and
//! latency percentiles of unary Echo calls through Envoy, and the CPU time
//! Envoy spent per call. Timing lives here and only here: tests never assert
//! wall-clock figures.

use std::path::Path;
use std::time::{Duration, Instant};

use tokio::time::MissedTickBehavior;
use tonic::transport::Channel;

use crate::pb::EchoRequest;

/// The message of every benchmark call: 64 bytes of text, a 71-byte gRPC
/// frame on the wire, as in DESIGN.md §7.
pub fn echo_request() -> EchoRequest {
    EchoRequest { message: "x".repeat(64), ..EchoRequest::default() }
}

/// What one measured window saw.
#[derive(Clone, Debug, Default)]
pub struct Window {
    pub calls: u64,
    pub errors: u64,
    pub elapsed: Duration,
    /// Latency of each successful call, microseconds, sorted.
    pub latencies_us: Vec<u32>,
}

impl Window {
    pub fn throughput(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `q` quantile (0..=1) of the latencies, in microseconds.
    pub fn quantile_us(&self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let rank = ((self.latencies_us.len() - 1) as f64 * q).round() as usize;
        f64::from(self.latencies_us[rank.min(self.latencies_us.len() - 1)])
    }

    fn finish(mut self, elapsed: Duration) -> Window {
        self.elapsed = elapsed;
        self.latencies_us.sort_unstable();
        self
    }
}

async fn one_call(channel: &Channel) -> Result<u32, tonic::Status> {
    let mut client = crate::client(channel.clone());
    let started = Instant::now();
    client.echo(echo_request()).await?;
    Ok(u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX))
}

/// Closed loop: `concurrency` callers, each starting its next call when the
/// last one returns, for `duration`.
pub async fn closed_loop(channel: &Channel, concurrency: usize, duration: Duration) -> Window {
    let started = Instant::now();
    let until = started + duration;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let channel = channel.clone();
        tasks.push(tokio::spawn(async move {
            let mut w = Window::default();
            while Instant::now() < until {
                match one_call(&channel).await {
                    Ok(us) => {
                        w.calls += 1;
                        w.latencies_us.push(us);
                    }
                    Err(_) => w.errors += 1,
                }
            }
            w
        }));
    }
    let mut total = Window::default();
    for task in tasks {
        if let Ok(w) = task.await {
            total.calls += w.calls;
            total.errors += w.errors;
            total.latencies_us.extend(w.latencies_us);
        }
    }
    total.finish(started.elapsed())
}

/// Open loop: calls started at a fixed `rate` per second for `duration`,
/// whether or not earlier ones have returned, so latency is measured at a
/// load the proxy does not choose.
pub async fn fixed_rate(channel: &Channel, rate: f64, duration: Duration) -> Window {
    let period = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut tasks = Vec::new();
    while started.elapsed() < duration {
        ticker.tick().await;
        let channel = channel.clone();
        tasks.push(tokio::spawn(async move { one_call(&channel).await }));
    }
    let mut w = Window::default();
    for task in tasks {
        match task.await {
            Ok(Ok(us)) => {
                w.calls += 1;
                w.latencies_us.push(us);
            }
            _ => w.errors += 1,
        }
    }
    w.finish(started.elapsed())
}

/// User + system CPU time a process has used so far (Linux `/proc`).
pub fn process_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line, in clock ticks.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // Linux reports these in USER_HZ, 100 per second on every mainstream build.
    Some(Duration::from_millis(ticks * 10))
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
        let w = Window { latencies_us: vec![5, 1, 3, 2, 4], ..Window::default() }.finish(Duration::from_secs(1));
        assert_eq!(w.quantile_us(0.5), 3.0);
        assert_eq!(w.quantile_us(0.0), 1.0);
        assert_eq!(w.quantile_us(1.0), 5.0);
    }

    #[test]
    fn echo_request_is_a_71_byte_frame() {
        use prost::Message;
        assert_eq!(echo_request().encoded_len() + 5, 71);
    }

    #[test]
    fn process_cpu_parses_this_process_stat() {
        assert!(process_cpu(std::process::id()).is_some());
        assert!(process_cpu(u32::MAX).is_none());
    }

    #[test]
    fn median_of_rounds() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert!(median(&mut []).is_nan());
    }
}
