//! `grpc_timeout`: the `grpc-timeout` header, its formatting and the
//! deadline policy.

use std::time::Duration;

use super::Input;
use crate::deadline::{
    format_grpc_timeout, parse_grpc_timeout, DeadlineDecision, DeadlinePolicy, DeadlineSource, TimeoutError,
};
use crate::status::GrpcStatus;

/// The units of `grpc-timeout`, finest first, in nanoseconds.
const TIMEOUT_UNITS: [(char, u128); 6] =
    [('n', 1), ('u', 1_000), ('m', 1_000_000), ('S', 1_000_000_000), ('M', 60_000_000_000), ('H', 3_600_000_000_000)];
/// The largest `TimeoutValue`: 8 digits.
const TIMEOUT_MAX_VALUE: u128 = 99_999_999;

/// `grpc_timeout`: the input is a `grpc-timeout` value; its first 12 bytes
/// are also a duration (seconds, nanoseconds) to format and to use as a
/// policy's default and maximum. The parser agrees with the wire grammar; a
/// value read off the wire formats back to itself; any duration formats
/// within 8 digits and never shorter; `decide` refuses what it must and
/// never lets a call run beyond the maximum.
pub fn grpc_timeout(data: &[u8]) {
    let parsed = parse_grpc_timeout(data);
    assert_eq!(parsed, reference_grpc_timeout(data), "{:?}", String::from_utf8_lossy(data));
    if let Ok(d) = parsed {
        // Exact in its own unit, so exact in every finer one: the finest
        // unit that fits gives it back unrounded.
        let header = format_grpc_timeout(d);
        check_timeout_header(d, &header);
        assert_eq!(parse_grpc_timeout(header.as_bytes()), Ok(d), "{header}");
    }
    let any = Input(data).duration();
    check_timeout_header(any, &format_grpc_timeout(any));

    let mut policies = vec![
        DeadlinePolicy::default(),
        DeadlinePolicy { default: Some(any), max: None },
        DeadlinePolicy { default: None, max: Some(any) },
    ];
    if let Ok(d) = parsed {
        policies.push(DeadlinePolicy { default: None, max: Some(d) });
        if let Some(shorter) = d.checked_sub(Duration::from_nanos(1)) {
            policies.push(DeadlinePolicy { default: Some(shorter), max: Some(shorter) });
        }
    }
    for policy in policies {
        check_decision(policy, Some(data));
        check_decision(policy, None);
    }
}

/// The wire grammar (gRPC PROTOCOL-HTTP2), written out independently.
fn reference_grpc_timeout(value: &[u8]) -> Result<Duration, TimeoutError> {
    let Some((&unit, digits)) = value.split_last() else { return Err(TimeoutError::Empty) };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(TimeoutError::Malformed);
    }
    if digits.len() > 8 {
        return Err(TimeoutError::TooManyDigits(digits.len()));
    }
    let n: u128 = std::str::from_utf8(digits).unwrap().parse().unwrap();
    let (_, per) =
        TIMEOUT_UNITS.iter().find(|(u, _)| u32::from(*u) == u32::from(unit)).ok_or(TimeoutError::Malformed)?;
    Ok(from_nanos(n * per))
}

fn from_nanos(n: u128) -> Duration {
    Duration::new(u64::try_from(n / 1_000_000_000).unwrap(), (n % 1_000_000_000) as u32)
}

/// `format_grpc_timeout`'s promise for `d`: 1 to 8 digits and a unit, the
/// finest unit whose value fits, rounded up by less than one unit (a
/// deadline is never shortened); beyond 99999999 hours (some 11,000 years),
/// that largest value.
fn check_timeout_header(d: Duration, header: &str) {
    let (digits, unit) = header.split_at(header.len() - 1);
    assert!((1..=8).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()), "{header}");
    assert!(digits == "0" || !digits.starts_with('0'), "{header}");
    let index = TIMEOUT_UNITS.iter().position(|(u, _)| unit.starts_with(*u)).expect("a unit");
    let per = TIMEOUT_UNITS[index].1;
    let nanos = d.as_nanos();
    let largest = TIMEOUT_MAX_VALUE * TIMEOUT_UNITS[TIMEOUT_UNITS.len() - 1].1;
    if nanos > largest {
        assert_eq!(header, "99999999H", "{d:?}");
        return;
    }
    let said = digits.parse::<u128>().unwrap() * per;
    assert!(said >= nanos, "{header} shortens {d:?}");
    assert!(said - nanos < per, "{header} rounds {d:?} up by a whole unit");
    if let Some(&(_, finer)) = index.checked_sub(1).and_then(|i| TIMEOUT_UNITS.get(i)) {
        assert!(nanos.div_ceil(finer) > TIMEOUT_MAX_VALUE, "{header}: a finer unit fits {d:?}");
    }
}

/// What `DeadlinePolicy::decide` promises whatever the header.
fn check_decision(policy: DeadlinePolicy, header: Option<&[u8]>) {
    let decision = policy.decide(header);
    let parsed = header.map(parse_grpc_timeout);
    match &decision {
        DeadlineDecision::Reject { status, message, source } => {
            // It goes out as `grpc-message`: printable, whatever the header held.
            assert!(message.bytes().all(|b| (0x20..0x7f).contains(&b)), "{message:?}");
            match parsed {
                Some(Err(_)) => assert_eq!((*status, *source), (GrpcStatus::InvalidArgument, DeadlineSource::Invalid)),
                Some(Ok(d)) if d.is_zero() => {
                    assert_eq!((*status, *source), (GrpcStatus::DeadlineExceeded, DeadlineSource::Expired))
                }
                other => panic!("{other:?} refused"),
            }
        }
        DeadlineDecision::Rewrite { deadline, header: value, source } => {
            check_timeout_header(*deadline, value);
            match source {
                DeadlineSource::Default => {
                    assert!(header.is_none());
                    assert_eq!(Some(*deadline), policy.default);
                }
                DeadlineSource::Clamped => {
                    assert_eq!(Some(*deadline), policy.max);
                    assert!(matches!(parsed, Some(Ok(d)) if d > *deadline), "{parsed:?} clamped to {deadline:?}");
                }
                other => panic!("a rewrite from {other:?}"),
            }
        }
        DeadlineDecision::Keep(kept) => match parsed {
            None => assert!(kept.is_none() && policy.default.is_none()),
            Some(Ok(d)) => {
                assert_eq!(*kept, Some(d));
                assert!(!d.is_zero());
            }
            Some(Err(e)) => panic!("a malformed header ({e}) kept"),
        },
    }
    if let (Some(_), Some(run), Some(max)) = (header, decision.deadline(), policy.max) {
        assert!(run <= max, "a call runs for {run:?}, beyond the maximum {max:?}");
    }
}
