//! The plugin configuration: JSON from Envoy's `configuration` or Istio's
//! `pluginConfig`, validated once at configure time.
//!
//! Unknown fields and bad values are errors that name the field: a mistyped key
//! must never silently turn a guard off. `{}` is a valid configuration. The
//! defaults live here and nowhere else; the README's table is checked against
//! them by a test.

use std::collections::BTreeMap;

use serde::Deserialize;
use thiserror::Error;

use crate::method::{MethodPath, MethodPattern};

/// A configuration the plugin refuses to start with.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid grpc-guard configuration: {field}: {reason}")]
pub struct ConfigError {
    /// JSON path of the offending field, e.g. `metrics.max_methods`.
    pub field: String,
    pub reason: String,
}

impl ConfigError {
    fn new(field: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError { field: field.to_owned(), reason: reason.into() }
    }
}

/// Which side of the call this Envoy stands on, which picks the metric family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// In front of a server (a sidecar's inbound listener): `grpc_server_*`.
    #[default]
    Inbound,
    /// In front of a client (egress, outbound listener): `grpc_client_*`.
    Outbound,
}

/// The gRPC call type, as go-grpc-prometheus labels it (`grpc_type`). A proxy
/// cannot read the method descriptor, so it is configured per method.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MethodType {
    #[default]
    Unary,
    ClientStream,
    ServerStream,
    BidiStream,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

impl MethodType {
    pub fn as_str(self) -> &'static str {
        match self {
            MethodType::Unary => "unary",
            MethodType::ClientStream => "client_stream",
            MethodType::ServerStream => "server_stream",
            MethodType::BidiStream => "bidi_stream",
        }
    }
}

pub const DEFAULT_MAX_METHODS: usize = 200;
/// Upper bound on `metrics.max_methods`: each method costs about ten stats per
/// code seen, in every Envoy, for Envoy's lifetime.
pub const MAX_MAX_METHODS: usize = 10_000;
pub const DEFAULT_REQUEST_ID_HEADER: &str = "x-request-id";

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    direction: Direction,
    metrics: RawMetrics,
    log: RawLog,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawMetrics {
    methods: Vec<String>,
    max_methods: usize,
    method_types: BTreeMap<String, MethodType>,
}

impl Default for RawMetrics {
    fn default() -> Self {
        RawMetrics { methods: vec!["*".to_owned()], max_methods: DEFAULT_MAX_METHODS, method_types: BTreeMap::new() }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    ok_sample: f64,
    request_id_header: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog { ok_sample: 1.0, request_id_header: DEFAULT_REQUEST_ID_HEADER.to_owned() }
    }
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub direction: Direction,
    /// Methods that may get their own metric labels.
    pub methods: Vec<MethodPattern>,
    /// How many distinct methods get their own label, across all workers.
    pub max_methods: usize,
    /// `grpc_type` per method full name (`pkg.Svc/Method`); others are unary.
    pub method_types: BTreeMap<String, MethodType>,
    /// Fraction of OK calls logged (non-OK calls are always logged).
    pub ok_sample: f64,
    /// Request header copied into the log line as `request_id` (lower-case).
    pub request_id_header: String,
}

impl Config {
    /// Parses and validates the plugin configuration. Empty input means `{}`.
    pub fn parse(json: &[u8]) -> Result<Config, ConfigError> {
        let text = std::str::from_utf8(json).map_err(|_| ConfigError::new("configuration", "is not UTF-8"))?;
        if text.trim().is_empty() {
            return Config::from_raw(RawConfig::default());
        }
        // serde would also read a struct from a JSON array, field by position.
        if !text.trim_start().starts_with('{') {
            return Err(ConfigError::new("configuration", "must be a JSON object, e.g. {}"));
        }
        let de = &mut serde_json::Deserializer::from_str(text);
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            // serde_path_to_error writes "." for the root and "?" where a
            // syntax error left no path.
            let field = if path == "." || path == "?" { "configuration".to_owned() } else { path };
            ConfigError { field, reason: e.into_inner().to_string() }
        })?;
        Config::from_raw(raw)
    }

    fn from_raw(raw: RawConfig) -> Result<Config, ConfigError> {
        let m = raw.metrics;
        if m.methods.is_empty() {
            return Err(ConfigError::new("metrics.methods", "must list at least one pattern (use [\"*\"] for all)"));
        }
        for (i, pattern) in m.methods.iter().enumerate() {
            if pattern.is_empty() || pattern.bytes().any(|b| b.is_ascii_whitespace() || !b.is_ascii_graphic()) {
                return Err(ConfigError::new(
                    &format!("metrics.methods[{i}]"),
                    format!("{pattern:?} is not a method pattern like \"pkg.Svc/Method\" or \"pkg.Svc/*\""),
                ));
            }
        }
        if m.max_methods == 0 || m.max_methods > MAX_MAX_METHODS {
            return Err(ConfigError::new(
                "metrics.max_methods",
                format!("must be between 1 and {MAX_MAX_METHODS}, got {}", m.max_methods),
            ));
        }
        let mut method_types = BTreeMap::new();
        for (name, kind) in m.method_types {
            let bare = name.strip_prefix('/').unwrap_or(&name);
            if MethodPath::parse(&format!("/{bare}")).is_none() {
                return Err(ConfigError::new(
                    &format!("metrics.method_types.{name}"),
                    "is not a method name like \"pkg.Svc/Method\"",
                ));
            }
            method_types.insert(bare.to_owned(), kind);
        }
        let log = raw.log;
        if !(0.0..=1.0).contains(&log.ok_sample) {
            return Err(ConfigError::new(
                "log.ok_sample",
                format!("must be between 0.0 and 1.0, got {}", log.ok_sample),
            ));
        }
        let header = log.request_id_header.to_ascii_lowercase();
        if header.is_empty() || !header.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err(ConfigError::new(
                "log.request_id_header",
                format!("{:?} is not an HTTP header name", log.request_id_header),
            ));
        }
        Ok(Config {
            direction: raw.direction,
            methods: m.methods.iter().map(|p| MethodPattern::new(p)).collect(),
            max_methods: m.max_methods,
            method_types,
            ok_sample: log.ok_sample,
            request_id_header: header,
        })
    }

    /// The `grpc_type` label of a method.
    pub fn method_type(&self, full_name: &str) -> MethodType {
        self.method_types.get(full_name).copied().unwrap_or_default()
    }

    /// True if the method may get its own label.
    pub fn method_allowed(&self, full_name: &str) -> bool {
        self.methods.iter().any(|p| p.matches(full_name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn err(json: &str) -> ConfigError {
        Config::parse(json.as_bytes()).expect_err("config must be rejected")
    }

    #[test]
    fn empty_object_and_empty_input_give_the_defaults() {
        let c = Config::parse(b"{}").unwrap();
        assert_eq!(c, Config::parse(b"").unwrap());
        assert_eq!(c.direction, Direction::Inbound);
        assert_eq!(c.max_methods, 200);
        assert_eq!(c.ok_sample, 1.0);
        assert_eq!(c.request_id_header, "x-request-id");
        assert!(c.method_allowed("any.Svc/Thing"));
        assert_eq!(c.method_type("any.Svc/Thing"), MethodType::Unary);
    }

    #[test]
    fn unknown_field_is_named_with_its_path() {
        let e = err(r#"{"metrics": {"max_methodz": 3}}"#);
        assert_eq!(e.field, "metrics.max_methodz");
        assert!(e.reason.contains("unknown field"), "{e}");
        let e = err(r#"{"dedupe": {}}"#);
        assert!(e.to_string().contains("dedupe"), "{e}");
    }

    #[test]
    fn wrong_type_names_the_field() {
        let e = err(r#"{"metrics": {"max_methods": "lots"}}"#);
        assert_eq!(e.field, "metrics.max_methods");
        let e = err(r#"{"direction": "sideways"}"#);
        assert_eq!(e.field, "direction");
    }

    #[test]
    fn syntax_error_is_reported_for_the_whole_configuration() {
        let e = err("{not json");
        assert_eq!(e.field, "configuration", "{e}");
        assert!(
            e.to_string().starts_with("invalid grpc-guard configuration: configuration: key must be a string"),
            "{e}"
        );
        assert_eq!(
            err("[\"outbound\"]").to_string(),
            "invalid grpc-guard configuration: configuration: must be a JSON object, e.g. {}"
        );
    }

    #[test]
    fn out_of_range_values_name_the_field() {
        assert_eq!(err(r#"{"metrics": {"max_methods": 0}}"#).field, "metrics.max_methods");
        assert_eq!(err(r#"{"log": {"ok_sample": 1.5}}"#).field, "log.ok_sample");
        assert_eq!(err(r#"{"log": {"request_id_header": "x id"}}"#).field, "log.request_id_header");
        assert_eq!(err(r#"{"metrics": {"methods": []}}"#).field, "metrics.methods");
        assert_eq!(err(r#"{"metrics": {"methods": ["a b"]}}"#).field, "metrics.methods[0]");
        assert_eq!(err(r#"{"metrics": {"method_types": {"nope": "unary"}}}"#).field, "metrics.method_types.nope");
        assert_eq!(err(r#"{"metrics": {"method_types": {"a.B/C": "sideways"}}}"#).field, "metrics.method_types.a.B/C");
    }

    #[test]
    fn method_types_and_outbound_are_read() {
        let c = Config::parse(
            br#"{"direction":"outbound","metrics":{"methods":["pkg.Svc/*"],"method_types":{"/pkg.Svc/Watch":"server_stream"}},"log":{"request_id_header":"X-Trace"}}"#,
        )
        .unwrap();
        assert_eq!(c.direction, Direction::Outbound);
        assert_eq!(c.method_type("pkg.Svc/Watch"), MethodType::ServerStream);
        assert!(c.method_allowed("pkg.Svc/Get"));
        assert!(!c.method_allowed("other.Svc/Get"));
        assert_eq!(c.request_id_header, "x-trace");
    }

    proptest! {
        #[test]
        fn any_bytes_parse_or_fail_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Config::parse(&bytes);
        }
    }
}
