//! A platform's unit prices, and the built-in presets.
//!
//! Presets are data (`presets.json` beside `Cargo.toml`), in the same format a
//! user's `--pricing FILE` uses, so a built-in preset is never more than a
//! file anyone could have written. Each one names its source and the date of
//! its prices.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::validate::{non_negative, positive, InputError, Problem};

/// Seconds in the 730-hour month every figure is quoted for.
pub const SECONDS_PER_MONTH: f64 = 730.0 * 3600.0;

const PRESETS_JSON: &str = include_str!("../presets.json");

/// How a platform bills instance time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Billing {
    /// Instance time is billed only while it serves at least one request (or
    /// stream), plus the idle rate for minimum instances; instances kept warm
    /// above the minimum are free (Cloud Run request-based).
    Request,
    /// Every second an instance exists is billed: active at the active rates,
    /// idle at the idle rates (Cloud Run instance-based, Fargate, GKE).
    Instance,
}

/// The time unit `vcpu_price`, `gib_price` and the idle prices are quoted in,
/// so a preset carries the figure exactly as the provider publishes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeUnit {
    #[default]
    Second,
    Hour,
}

/// One platform's list prices (USD) and the behaviour that decides what is billed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pricing {
    /// What `--preset` selects, e.g. `cloud-run-request`.
    pub name: String,
    pub title: String,
    pub billing: Billing,
    #[serde(default)]
    pub compute_unit: ComputeUnit,
    /// Per vCPU per `compute_unit`, while active.
    pub vcpu_price: f64,
    /// Per GiB of memory per `compute_unit`, while active.
    pub gib_price: f64,
    /// Per vCPU per `compute_unit`, while idle; the active price when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_vcpu_price: Option<f64>,
    /// Per GiB per `compute_unit`, while idle; the active price when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_gib_price: Option<f64>,
    #[serde(default)]
    pub per_million_requests: f64,
    #[serde(default)]
    pub free_vcpu_seconds: f64,
    #[serde(default)]
    pub free_gib_seconds: f64,
    #[serde(default)]
    pub free_requests: f64,
    /// A flat monthly fee per option (cluster fee, load balancer).
    #[serde(default)]
    pub monthly_fixed: f64,
    /// How long an instance lives on after its last request before it is
    /// scaled away: billed as idle under instance billing.
    pub keep_warm_s: f64,
    /// The platform's longest request: an open stream is cut and reconnects
    /// after it. Absent: streams may stay open indefinitely.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_timeout_s: Option<f64>,
    /// Where the prices were published.
    pub source: String,
    /// When they were read (`YYYY-MM` or `YYYY-MM-DD`).
    pub price_date: String,
    #[serde(default)]
    pub notes: String,
}

/// Prices per second and per request, as the model uses them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct UnitPrices {
    pub vcpu_s: f64,
    pub gib_s: f64,
    pub idle_vcpu_s: f64,
    pub idle_gib_s: f64,
    pub per_request: f64,
}

impl Pricing {
    pub(crate) fn unit_prices(&self) -> UnitPrices {
        let per_s = match self.compute_unit {
            ComputeUnit::Second => 1.0,
            ComputeUnit::Hour => 1.0 / 3600.0,
        };
        UnitPrices {
            vcpu_s: self.vcpu_price * per_s,
            gib_s: self.gib_price * per_s,
            idle_vcpu_s: self.idle_vcpu_price.unwrap_or(self.vcpu_price) * per_s,
            idle_gib_s: self.idle_gib_price.unwrap_or(self.gib_price) * per_s,
            per_request: self.per_million_requests / 1e6,
        }
    }

    /// Checks every price; errors name the field as `{prefix}.{field}`.
    pub fn validate(&self, prefix: &str) -> Result<(), InputError> {
        let field = |name: &str| format!("{prefix}.{name}");
        for (name, text) in [("name", &self.name), ("source", &self.source), ("price_date", &self.price_date)] {
            if text.trim().is_empty() {
                return Err(InputError::new(field(name), Problem::Empty));
            }
        }
        let amounts = [
            ("vcpu_price", self.vcpu_price),
            ("gib_price", self.gib_price),
            ("per_million_requests", self.per_million_requests),
            ("free_vcpu_seconds", self.free_vcpu_seconds),
            ("free_gib_seconds", self.free_gib_seconds),
            ("free_requests", self.free_requests),
            ("monthly_fixed", self.monthly_fixed),
            ("keep_warm_s", self.keep_warm_s),
        ];
        for (name, value) in amounts {
            non_negative(&field(name), value)?;
        }
        for (name, idle, active) in [
            ("idle_vcpu_price", self.idle_vcpu_price, self.vcpu_price),
            ("idle_gib_price", self.idle_gib_price, self.gib_price),
        ] {
            if let Some(idle) = idle {
                non_negative(&field(name), idle)?;
                // An idle rate above the active one would make more traffic
                // cheaper; no platform bills that way.
                if idle > active {
                    return Err(InputError::new(field(name), Problem::IdleAboveActive { active, got: idle }));
                }
            }
        }
        if let Some(timeout) = self.request_timeout_s {
            positive(&field("request_timeout_s"), timeout)?;
        }
        Ok(())
    }
}

/// A pricing file that cannot be used.
#[derive(Debug, Error)]
pub enum PricingFileError {
    #[error("not valid pricing JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("holds no pricing")]
    Empty,
    #[error(transparent)]
    Invalid(#[from] InputError),
}

/// Parses pricing JSON: one pricing object, or an array of them. Every entry
/// is validated; errors name the entry and the field.
pub fn parse_pricing(json: &str) -> Result<Vec<Pricing>, PricingFileError> {
    let list: Vec<Pricing> = if json.trim_start().starts_with('[') {
        serde_json::from_str(json)?
    } else {
        vec![serde_json::from_str(json)?]
    };
    if list.is_empty() {
        return Err(PricingFileError::Empty);
    }
    for pricing in &list {
        pricing.validate(&pricing.name)?;
    }
    Ok(list)
}

/// The built-in presets, in the order they are listed to users.
pub fn presets() -> Vec<Pricing> {
    // The file is part of the crate and checked by the tests, so a failure
    // here is a build defect, not an input error.
    parse_pricing(PRESETS_JSON).unwrap_or_else(|e| panic!("presets.json: {e}"))
}

/// Looks a preset up by name in `catalogue`; the error lists the known names.
pub fn find_preset(catalogue: &[Pricing], name: &str, field: &str) -> Result<Pricing, InputError> {
    catalogue.iter().find(|p| p.name == name).cloned().ok_or_else(|| {
        let known = catalogue.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", ");
        InputError::new(field, Problem::UnknownPreset { name: name.to_owned(), known })
    })
}
