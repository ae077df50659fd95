//! How many instances a platform runs for Poisson traffic.
//!
//! Requests arrive as a Poisson process at rate λ and each stays in flight for
//! a mean time d, so the number in flight at a random moment is Poisson with
//! mean m = λd (the M/G/∞ queue; only the mean of d matters). An autoscaler
//! that packs `c` requests per instance needs ⌈(S + N)/c⌉ instances when `S`
//! long-lived streams are open too. The expected number it runs above a floor
//! of `R` instances is
//!
//! ```text
//! E[(⌈(S + N)/c⌉ − R)⁺] = Σ_{j ≥ R} P(S + N > j·c)
//! ```
//!
//! which is what [`instances_above`] computes. At low traffic it tends to
//! 1 − e^{−m} (one instance, busy whenever any request is), at high traffic to
//! (S + m)/c: the two regimes a "requests × duration / concurrency" estimate
//! gets wrong by up to a factor of `c`.

/// The distribution of a Poisson variable, tabulated where it has mass.
struct PoissonTail {
    /// Below `lo`, P(N ≥ k) is 1 to within 1e-20.
    lo: u64,
    /// `tail[i]` = P(N ≥ lo + i); beyond the table it is 0 to within 1e-20.
    tail: Vec<f64>,
}

impl PoissonTail {
    fn new(mean: f64) -> Self {
        if mean <= 0.0 {
            return PoissonTail { lo: 0, tail: vec![1.0] };
        }
        // 10 standard deviations and 10 more on either side hold all but
        // ~1e-20 of the mass, for any mean.
        let spread = 10.0 * mean.sqrt() + 10.0;
        let lo = (mean - spread).max(0.0).floor() as u64;
        let hi = (mean + spread).ceil() as u64;
        let mut pmf = Vec::with_capacity((hi - lo + 1) as usize);
        let mut p = (-mean + lo as f64 * mean.ln() - ln_factorial(lo)).exp();
        for k in lo..=hi {
            pmf.push(p);
            p *= mean / (k + 1) as f64;
        }
        // Summed from the top so that small tails keep their precision, then
        // normalised so the table and the "1 below lo" rule agree.
        let mut tail = pmf;
        for i in (0..tail.len() - 1).rev() {
            tail[i] += tail[i + 1];
        }
        let total = tail[0];
        for t in &mut tail {
            *t /= total;
        }
        PoissonTail { lo, tail }
    }

    /// P(N > x) for a real `x`.
    fn greater_than(&self, x: f64) -> f64 {
        if x < 0.0 {
            return 1.0;
        }
        // N > x  ⇔  N ≥ ⌊x⌋ + 1
        let k = x.floor() as u64 + 1;
        if k < self.lo {
            1.0
        } else {
            self.tail.get((k - self.lo) as usize).copied().unwrap_or(0.0)
        }
    }

    fn hi(&self) -> u64 {
        self.lo + self.tail.len() as u64 - 1
    }
}

/// ln(n!): exact below 30, Stirling's series (error < 1e-15) above.
fn ln_factorial(n: u64) -> f64 {
    if n < 30 {
        return (2..=n).map(|k| (k as f64).ln()).sum();
    }
    let x = n as f64;
    x * x.ln() - x + 0.5 * (2.0 * std::f64::consts::PI * x).ln() + 1.0 / (12.0 * x) - 1.0 / (360.0 * x.powi(3))
        + 1.0 / (1260.0 * x.powi(5))
}

/// Expected instances an autoscaler runs above `floor` when `streams` streams
/// are open and a Poisson number of requests with mean `in_flight` is in
/// flight, `concurrency` per instance: Σ_{j ≥ floor} P(streams + N > j·concurrency).
pub(crate) fn instances_above(in_flight: f64, streams: f64, concurrency: f64, floor: f64) -> f64 {
    let poisson = PoissonTail::new(in_flight);
    let floor = floor as u64;
    // Terms with j·c − S below the table are 1: count them without a loop.
    let first_in_table = (((poisson.lo as f64 + streams) / concurrency).ceil() as u64).max(floor);
    let mut total = (first_in_table - floor) as f64;
    let hi = poisson.hi() as f64;
    let mut j = first_in_table;
    loop {
        let x = j as f64 * concurrency - streams;
        if x >= hi {
            return total;
        }
        total += poisson.greater_than(x);
        j += 1;
    }
}

/// Expected number of `floor` load-balanced instances that are serving at
/// least one request or stream: streams pin one instance each (up to the
/// floor), and the others see 1/floor of the requests each, so each is busy
/// with probability 1 − e^{−m/floor}.
pub(crate) fn floor_busy(in_flight: f64, streams: f64, floor: f64) -> f64 {
    if floor <= 0.0 {
        return 0.0;
    }
    let pinned = streams.min(floor);
    pinned + (floor - pinned) * -(-in_flight / floor).exp_m1()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tolerance: f64) -> bool {
        (a - b).abs() <= tolerance * b.abs().max(1.0)
    }

    #[test]
    fn one_request_per_instance_runs_as_many_instances_as_requests_in_flight() {
        for mean in [0.0, 1e-6, 0.3, 1.0, 7.5, 120.0, 5e4] {
            assert!(close(instances_above(mean, 0.0, 1.0, 0.0), mean, 1e-12), "mean {mean}");
        }
    }

    #[test]
    fn a_roomy_instance_is_busy_whenever_any_request_is_in_flight() {
        for mean in [1e-9, 1e-3, 0.2, 2.0] {
            assert!(close(instances_above(mean, 0.0, 1e5, 0.0), -(-mean).exp_m1(), 1e-12), "mean {mean}");
        }
    }

    #[test]
    fn instances_above_a_floor_match_a_hand_computed_poisson_sum() {
        // m = 1, c = 1, floor 2: Σ_{j≥2} P(N > j) = E[N] − P(N > 0) − P(N > 1)
        //   = 1 − (1 − e⁻¹) − (1 − 2e⁻¹) = 3e⁻¹ − 1
        let e_inv = (-1.0f64).exp();
        assert!(close(instances_above(1.0, 0.0, 1.0, 2.0), 3.0 * e_inv - 1.0, 1e-12));
        // m = 2, c = 3: E[⌈N/3⌉] summed from its definition, term by term.
        let mut pmf = (-2.0f64).exp();
        let mut expected = 0.0;
        for n in 0..60u32 {
            expected += pmf * f64::from(n.div_ceil(3));
            pmf *= 2.0 / f64::from(n + 1);
        }
        assert!(close(instances_above(2.0, 0.0, 3.0, 0.0), expected, 1e-12));
    }

    #[test]
    fn open_streams_hold_instances_without_any_request() {
        assert_eq!(instances_above(0.0, 0.0, 10.0, 0.0), 0.0);
        assert_eq!(instances_above(0.0, 25.0, 10.0, 0.0), 3.0);
        assert_eq!(instances_above(0.0, 25.0, 10.0, 2.0), 1.0);
        assert_eq!(floor_busy(0.0, 1.0, 2.0), 1.0);
        assert_eq!(floor_busy(0.0, 5.0, 2.0), 2.0);
    }

    #[test]
    fn heavy_traffic_tends_to_requests_in_flight_over_concurrency() {
        let n = instances_above(1e6, 0.0, 80.0, 0.0);
        assert!((n - 1e6 / 80.0).abs() < 1.0, "{n}");
    }

    #[test]
    fn ln_factorial_is_continuous_where_stirling_takes_over() {
        let exact: f64 = (2..=30u64).map(|k| (k as f64).ln()).sum();
        assert!(close(ln_factorial(30), exact, 1e-14));
    }
}
