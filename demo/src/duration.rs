use std::time::Duration;

/// Why a duration flag such as `--timeout` was rejected.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("duration {0:?} has no number; expected e.g. 500ms, 2s or 1m")]
    MissingNumber(String),
    #[error("duration {0:?} is too large; expected e.g. 500ms, 2s or 1m")]
    TooLarge(String),
    #[error("duration {0:?} has no unit or an unknown one; expected ms, s or m, e.g. 2s")]
    UnknownUnit(String),
}

/// Parses a whole number followed by `ms`, `s` or `m`: the forms a person
/// types on the command line for a per-call deadline.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let trimmed = text.trim();
    let split = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    if number.is_empty() {
        return Err(DurationError::MissingNumber(text.to_owned()));
    }
    let value: u64 = number.parse().map_err(|_| DurationError::TooLarge(text.to_owned()))?;
    let millis_per_unit = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        _ => return Err(DurationError::UnknownUnit(text.to_owned())),
    };
    value
        .checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .ok_or_else(|| DurationError::TooLarge(text.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_milliseconds_and_minutes_are_accepted() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
    }

    #[test]
    fn a_bare_number_is_rejected_for_want_of_a_unit() {
        assert_eq!(parse_duration("2"), Err(DurationError::UnknownUnit("2".into())));
    }

    #[test]
    fn a_unit_without_a_number_is_rejected() {
        assert_eq!(parse_duration("s"), Err(DurationError::MissingNumber("s".into())));
    }

    #[test]
    fn an_overflowing_duration_is_rejected_rather_than_wrapped() {
        assert_eq!(
            parse_duration("99999999999999999999m"),
            Err(DurationError::TooLarge("99999999999999999999m".into()))
        );
    }
}
