//! Deadlines: the `grpc-timeout` header and the policy applied to it.
//!
//! gRPC PROTOCOL-HTTP2: `Timeout → "grpc-timeout" TimeoutValue TimeoutUnit`,
//! `TimeoutValue` is at most 8 ASCII digits, `TimeoutUnit` one of `H` hours,
//! `M` minutes, `S` seconds, `m` milliseconds, `u` microseconds, `n`
//! nanoseconds. A call without the header has no deadline and can wait
//! forever; grpc-guard can give it one (`deadline.default`), cap the one it has
//! (`deadline.max`), and answer itself when the header is malformed
//! (INVALID_ARGUMENT) or zero (DEADLINE_EXCEEDED), so that such calls never
//! reach the upstream.

use std::time::Duration;

use thiserror::Error;

use crate::status::{GrpcStatus, StatusSource};

/// Most digits the spec allows in a timeout value.
const MAX_DIGITS: usize = 8;
const MAX_VALUE: u64 = 99_999_999;

/// Why a `grpc-timeout` value was refused.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum TimeoutError {
    #[error("is empty")]
    Empty,
    #[error("has {0} digits; at most 8 are allowed")]
    TooManyDigits(usize),
    #[error("must be 1 to 8 ASCII digits followed by a unit H, M, S, m, u or n")]
    Malformed,
}

/// Parses a `grpc-timeout` value exactly as the wire spec has it.
pub fn parse_grpc_timeout(value: &[u8]) -> Result<Duration, TimeoutError> {
    let (unit, digits) = value.split_last().ok_or(TimeoutError::Empty)?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(TimeoutError::Malformed);
    }
    if digits.len() > MAX_DIGITS {
        return Err(TimeoutError::TooManyDigits(digits.len()));
    }
    let n = digits.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Ok(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return Err(TimeoutError::Malformed),
    })
}

/// Formats a duration as a `grpc-timeout` value: the finest unit whose value
/// fits in 8 digits, rounded up so a deadline is never shortened.
pub fn format_grpc_timeout(d: Duration) -> String {
    let nanos = d.as_nanos();
    let units: [(u128, char); 6] = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
        (3_600_000_000_000, 'H'),
    ];
    for (per, unit) in units {
        let value = nanos.div_ceil(per);
        if value <= u128::from(MAX_VALUE) {
            return format!("{value}{unit}");
        }
    }
    format!("{MAX_VALUE}H")
}

/// The deadline limits that apply to one method.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeadlinePolicy {
    /// Given to calls that carry no `grpc-timeout`.
    pub default: Option<Duration>,
    /// Longest deadline let through; longer ones are rewritten to it.
    pub max: Option<Duration>,
}

/// Where a call's effective deadline came from (the log's `deadline_source`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeadlineSource {
    /// No deadline at all: the call may wait forever.
    None,
    /// The client's own `grpc-timeout`, within the maximum.
    Client,
    /// Injected: the client sent none.
    Default,
    /// The client's was above the maximum and was rewritten to it.
    Clamped,
    /// Malformed header: answered INVALID_ARGUMENT.
    Invalid,
    /// Zero: answered DEADLINE_EXCEEDED.
    Expired,
}

impl DeadlineSource {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadlineSource::None => "none",
            DeadlineSource::Client => "client",
            DeadlineSource::Default => "default",
            DeadlineSource::Clamped => "clamped",
            DeadlineSource::Invalid => "invalid",
            DeadlineSource::Expired => "expired",
        }
    }
}

/// What to do with a call's `grpc-timeout`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeadlineDecision {
    /// Forward as is; the effective deadline, if any.
    Keep(Option<Duration>),
    /// Set `grpc-timeout` to this value (injected or clamped).
    Rewrite { deadline: Duration, header: String, source: DeadlineSource },
    /// Answer the client with this status and message; the upstream never
    /// sees the call.
    Reject { status: GrpcStatus, message: String, source: DeadlineSource },
}

impl DeadlineDecision {
    pub fn source(&self) -> DeadlineSource {
        match self {
            DeadlineDecision::Keep(None) => DeadlineSource::None,
            DeadlineDecision::Keep(Some(_)) => DeadlineSource::Client,
            DeadlineDecision::Rewrite { source, .. } | DeadlineDecision::Reject { source, .. } => *source,
        }
    }

    /// The deadline the call runs under, if it runs.
    pub fn deadline(&self) -> Option<Duration> {
        match self {
            DeadlineDecision::Keep(d) => *d,
            DeadlineDecision::Rewrite { deadline, .. } => Some(*deadline),
            DeadlineDecision::Reject { .. } => None,
        }
    }
}

impl DeadlinePolicy {
    /// The policy for a call that must end within `bound`: a default and a
    /// maximum, neither above it.
    pub fn within(self, bound: Duration) -> DeadlinePolicy {
        DeadlinePolicy {
            default: Some(self.default.map_or(bound, |d| d.min(bound))),
            max: Some(self.max.map_or(bound, |m| m.min(bound))),
        }
    }

    /// Decides for a call whose `grpc-timeout` header is `header`.
    pub fn decide(&self, header: Option<&[u8]>) -> DeadlineDecision {
        let Some(raw) = header else {
            return match self.default {
                Some(d) => DeadlineDecision::Rewrite {
                    deadline: d,
                    header: format_grpc_timeout(d),
                    source: DeadlineSource::Default,
                },
                None => DeadlineDecision::Keep(None),
            };
        };
        match parse_grpc_timeout(raw) {
            Err(e) => DeadlineDecision::Reject {
                status: GrpcStatus::InvalidArgument,
                message: format!("grpc-guard: grpc-timeout header {:?} {e}", crate::printable(raw)),
                source: DeadlineSource::Invalid,
            },
            Ok(d) if d.is_zero() => DeadlineDecision::Reject {
                status: GrpcStatus::DeadlineExceeded,
                message: "grpc-guard: grpc-timeout is zero: the deadline expired before the call reached the proxy"
                    .to_owned(),
                source: DeadlineSource::Expired,
            },
            Ok(d) => match self.max {
                Some(max) if d > max => DeadlineDecision::Rewrite {
                    deadline: max,
                    header: format_grpc_timeout(max),
                    source: DeadlineSource::Clamped,
                },
                _ => DeadlineDecision::Keep(Some(d)),
            },
        }
    }
}

/// Whether a finished call is a late response: the upstream's work outlived
/// the client's interest. That is the "server handled > client success"
/// silent failure: the server may well finish and count a success that no
/// client receives.
///
/// - `answered_after`: when the upstream's final status arrived, measured from
///   the request headers; `None` if it never did.
/// - `ended_by_proxy_timeout`: Envoy ended the call at its deadline
///   (response code details `max_duration_timeout` on Envoy 1.40).
pub fn is_late(
    deadline: Option<Duration>,
    answered_after: Option<Duration>,
    status: GrpcStatus,
    source: StatusSource,
    ended_by_proxy_timeout: bool,
) -> bool {
    match answered_after {
        Some(t) => deadline.is_some_and(|d| t > d),
        None => ended_by_proxy_timeout || (status == GrpcStatus::Cancelled && source == StatusSource::Reset),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_unit_of_the_wire_spec_parses() {
        assert_eq!(parse_grpc_timeout(b"2H"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout(b"3M"), Ok(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout(b"10S"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_grpc_timeout(b"250m"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout(b"7u"), Ok(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout(b"99999999n"), Ok(Duration::from_nanos(99_999_999)));
        assert_eq!(parse_grpc_timeout(b"0m"), Ok(Duration::ZERO));
    }

    #[test]
    fn malformed_values_are_refused_with_a_reason() {
        assert_eq!(parse_grpc_timeout(b""), Err(TimeoutError::Empty));
        assert_eq!(parse_grpc_timeout(b"123456789S"), Err(TimeoutError::TooManyDigits(9)));
        for bad in [&b"S"[..], b"10", b"10s", b"1.5S", b"-1S", b" 1S", b"1 S", b"10SS", b"1h", b"\xff1S"] {
            assert_eq!(parse_grpc_timeout(bad), Err(TimeoutError::Malformed), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn formatting_picks_the_finest_unit_that_fits_and_rounds_up() {
        assert_eq!(format_grpc_timeout(Duration::from_secs(10)), "10000000u");
        assert_eq!(format_grpc_timeout(Duration::from_millis(250)), "250000u");
        assert_eq!(format_grpc_timeout(Duration::from_secs(60)), "60000000u");
        assert_eq!(format_grpc_timeout(Duration::from_secs(3600)), "3600000m");
        assert_eq!(format_grpc_timeout(Duration::from_nanos(1_500)), "1500n");
        assert_eq!(format_grpc_timeout(Duration::from_nanos(100_000_001)), "100001u");
    }

    #[test]
    fn a_bound_caps_the_default_and_the_maximum() {
        let bound = Duration::from_secs(30);
        assert_eq!(DeadlinePolicy::default().within(bound), DeadlinePolicy { default: Some(bound), max: Some(bound) });
        assert_eq!(POLICY.within(bound), DeadlinePolicy { default: Some(Duration::from_secs(10)), max: Some(bound) });
        assert_eq!(POLICY.within(Duration::from_secs(5)).default, Some(Duration::from_secs(5)));
    }

    const POLICY: DeadlinePolicy =
        DeadlinePolicy { default: Some(Duration::from_secs(10)), max: Some(Duration::from_secs(60)) };

    #[test]
    fn missing_timeout_gets_the_default() {
        let d = POLICY.decide(None);
        assert_eq!(d.source(), DeadlineSource::Default);
        assert_eq!(d.deadline(), Some(Duration::from_secs(10)));
        assert!(matches!(d, DeadlineDecision::Rewrite { ref header, .. } if header == "10000000u"));
    }

    #[test]
    fn timeout_above_the_maximum_is_rewritten_to_it() {
        let d = POLICY.decide(Some(b"5M"));
        assert_eq!(d.source(), DeadlineSource::Clamped);
        assert_eq!(d.deadline(), Some(Duration::from_secs(60)));
    }

    #[test]
    fn timeout_within_the_maximum_is_kept() {
        assert_eq!(POLICY.decide(Some(b"30S")), DeadlineDecision::Keep(Some(Duration::from_secs(30))));
        assert_eq!(POLICY.decide(Some(b"60S")), DeadlineDecision::Keep(Some(Duration::from_secs(60))));
    }

    #[test]
    fn malformed_timeout_is_answered_with_invalid_argument_naming_the_header() {
        let DeadlineDecision::Reject { status, message, source } = POLICY.decide(Some(b"soon")) else {
            panic!("malformed must be rejected")
        };
        assert_eq!(status, GrpcStatus::InvalidArgument);
        assert_eq!(source, DeadlineSource::Invalid);
        assert!(message.contains("grpc-timeout header \"soon\""), "{message}");
    }

    #[test]
    fn zero_timeout_is_answered_with_deadline_exceeded() {
        let d = DeadlinePolicy::default().decide(Some(b"0S"));
        assert!(matches!(d, DeadlineDecision::Reject { status: GrpcStatus::DeadlineExceeded, .. }));
        assert_eq!(d.source(), DeadlineSource::Expired);
    }

    #[test]
    fn without_a_policy_calls_keep_what_they_have() {
        assert_eq!(DeadlinePolicy::default().decide(None), DeadlineDecision::Keep(None));
        assert_eq!(
            DeadlinePolicy::default().decide(Some(b"1H")),
            DeadlineDecision::Keep(Some(Duration::from_secs(3600)))
        );
    }

    #[test]
    fn late_means_the_upstream_outlived_the_client() {
        let s = Duration::from_secs;
        assert!(is_late(Some(s(1)), Some(s(2)), GrpcStatus::Ok, StatusSource::Trailers, false));
        assert!(!is_late(Some(s(2)), Some(s(1)), GrpcStatus::Ok, StatusSource::Trailers, false));
        assert!(!is_late(None, Some(s(100)), GrpcStatus::Ok, StatusSource::Trailers, false));
        assert!(is_late(Some(s(1)), None, GrpcStatus::DeadlineExceeded, StatusSource::Headers, true));
        assert!(is_late(None, None, GrpcStatus::Cancelled, StatusSource::Reset, false));
        assert!(!is_late(None, None, GrpcStatus::Unavailable, StatusSource::Reset, false));
    }

    proptest! {
        #[test]
        fn any_header_value_parses_or_fails_without_panic(value in proptest::collection::vec(any::<u8>(), 0..16)) {
            let _ = parse_grpc_timeout(&value);
            let _ = POLICY.decide(Some(&value));
        }

        #[test]
        fn formatted_timeouts_parse_back_to_at_least_the_duration(nanos in 1u64..u64::MAX) {
            let d = Duration::from_nanos(nanos);
            let header = format_grpc_timeout(d);
            let parsed = parse_grpc_timeout(header.as_bytes()).unwrap();
            prop_assert!(parsed >= d, "{} -> {:?} < {:?}", header, parsed, d);
            // Rounded up by less than one unit of the chosen resolution; a coarser
            // unit is chosen only for values of at least 10^5 of it.
            prop_assert!(parsed - d <= d / 50_000 + Duration::from_nanos(1), "{} -> {:?}", header, parsed);
        }

        #[test]
        fn wire_values_round_trip_exactly(n in 0u64..=99_999_999, unit in proptest::sample::select(vec!['n', 'u', 'm', 'S'])) {
            let d = parse_grpc_timeout(format!("{n}{unit}").as_bytes()).unwrap();
            if n > 0 {
                prop_assert_eq!(parse_grpc_timeout(format_grpc_timeout(d).as_bytes()).unwrap(), d);
            }
        }
    }
}
