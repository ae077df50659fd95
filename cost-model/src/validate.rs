//! Validation shared by every input: the error that names the field, and the
//! checks on one number. Both the workload ([`crate::Inputs`]) and the
//! platform prices ([`crate::Pricing`]) use them.

use thiserror::Error;

/// An input the model cannot use, named by its field.
#[derive(Debug, Clone, PartialEq, Error)]
#[error("{field}: {problem}")]
pub struct InputError {
    /// The field as `Inputs` spells it (`rps`, `rest_pricing.vcpu_price`).
    pub field: String,
    pub problem: Problem,
}

impl InputError {
    pub fn new(field: impl Into<String>, problem: Problem) -> Self {
        InputError { field: field.into(), problem }
    }
}

/// What is wrong with a value.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum Problem {
    #[error("must be a finite number, got {0}")]
    NotFinite(f64),
    #[error("must not be negative, got {0}")]
    Negative(f64),
    #[error("must be greater than 0, got {0}")]
    NotPositive(f64),
    #[error("must be a whole number, at least {min}, got {got}")]
    WholeAtLeast { min: u32, got: f64 },
    #[error("must be at most {max}, got {got}")]
    TooLarge { max: f64, got: f64 },
    #[error("must be between {min} and {max}, got {got}")]
    OutOfRange { min: f64, max: f64, got: f64 },
    #[error("must be above {what} ({floor})")]
    NotAbove { what: &'static str, floor: f64 },
    #[error(
        "must be at least 1, got {0}: gRPC clients hold long-lived HTTP/2 connections and streams, \
         so a gRPC service does not scale to zero"
    )]
    GrpcToZero(f64),
    #[error("must be 24 hourly weights, hour 0 first, got {0}")]
    ProfileLength(usize),
    #[error("needs at least one hour with traffic (a weight above 0)")]
    ProfileAllZero,
    #[error("must not exceed the active price {active}, got {got}")]
    IdleAboveActive { active: f64, got: f64 },
    #[error("must not be empty")]
    Empty,
    #[error("unknown preset `{name}`; known presets: {known}")]
    UnknownPreset { name: String, known: String },
}

pub(crate) fn finite(field: &str, value: f64) -> Result<f64, InputError> {
    if value.is_finite() {
        Ok(value)
    } else {
        Err(InputError::new(field, Problem::NotFinite(value)))
    }
}

pub(crate) fn non_negative(field: &str, value: f64) -> Result<f64, InputError> {
    if finite(field, value)? < 0.0 {
        return Err(InputError::new(field, Problem::Negative(value)));
    }
    Ok(value)
}

pub(crate) fn positive(field: &str, value: f64) -> Result<f64, InputError> {
    if finite(field, value)? <= 0.0 {
        return Err(InputError::new(field, Problem::NotPositive(value)));
    }
    Ok(value)
}

pub(crate) fn whole_at_least(field: &str, value: f64, min: u32) -> Result<f64, InputError> {
    if finite(field, value)?.fract() != 0.0 || value < f64::from(min) {
        return Err(InputError::new(field, Problem::WholeAtLeast { min, got: value }));
    }
    Ok(value)
}

pub(crate) fn at_most(field: &str, value: f64, max: f64) -> Result<f64, InputError> {
    if value > max {
        return Err(InputError::new(field, Problem::TooLarge { max, got: value }));
    }
    Ok(value)
}
