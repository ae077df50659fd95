//! The plugin configuration: JSON from Envoy's `configuration` or Istio's
//! `pluginConfig`, validated once at configure time.
//!
//! Unknown fields and bad values are errors that name the field: a mistyped key
//! must never silently turn a guard off. `{}` is a valid configuration. The
//! defaults live here and nowhere else; the README's table is checked against
//! them by a test.

use std::collections::BTreeMap;
use std::time::Duration;

use thiserror::Error;

use crate::deadline::DeadlinePolicy;
use crate::json::{self, FieldError, Fields, Json};
use crate::method::{Direction, MethodPath, MethodPattern, MethodType};

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

pub const DEFAULT_MAX_METHODS: usize = 200;
/// Upper bound on `metrics.max_methods`: each method costs about ten stats per
/// code seen, in every Envoy, for Envoy's lifetime.
pub const MAX_MAX_METHODS: usize = 10_000;
pub const DEFAULT_REQUEST_ID_HEADER: &str = "x-request-id";
/// One OK call in a hundred is logged: every failure is, and the metrics
/// count every call; a sample of healthy calls is enough to compare them
/// with, and a line per OK call is the filter's largest single cost (Envoy
/// formats and writes it on the worker). Istio ships with access logs off
/// for the same reason.
pub const DEFAULT_OK_SAMPLE: f64 = 0.01;
/// The caller's identity: the mTLS peer, the verified JWT (Istio), the
/// credentials. Not `:authority`: a retry may name the same service another
/// way (`orders`, `orders.shop.svc.cluster.local`) and must still be found.
pub const DEFAULT_DEDUP_SCOPE: [&str; 3] = ["source.principal", "request.auth.principal", "header:authorization"];
/// Most entries a dedup table may have.
pub const MAX_DEDUP_ENTRIES: u32 = 1_000_000;
/// Largest answer that may be kept for replay.
pub const MAX_DEDUP_RESPONSE_BYTES: u32 = 4 * 1024 * 1024;
/// Largest `dedup.max_metadata_bytes`.
pub const MAX_DEDUP_METADATA_BYTES: u32 = 64 * 1024;
/// The most memory a dedup table may need at worst, per Envoy:
/// `max_entries` × (`max_response_bytes` + `max_metadata_bytes` +
/// [`crate::dedup::ENTRY_OVERHEAD`]). A configuration above it is refused.
pub const MAX_DEDUP_TABLE_BYTES: u64 = 1 << 30;
/// Protobuf's largest field number.
const MAX_FIELD_NUMBER: u64 = (1 << 29) - 1;
/// Deepest nesting of a key field.
const MAX_KEY_FIELD_DEPTH: usize = 8;

/// What a request on a gRPC method path gets when its content type is not
/// gRPC. gRPC servers route by path: tonic and grpcio execute such a request
/// as the method, so passing it would let it around every guard.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NonGrpc {
    /// HTTP 415 with `grpc-status: 13`, as grpc-go answers it.
    #[default]
    Refuse,
    /// Pass it on untouched and unguarded (a Connect or gRPC-Web server that
    /// serves other content types on the same paths).
    Pass,
}

/// What a keyed call gets when every identity part of its scope is empty.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Anonymous {
    /// UNAUTHENTICATED: a key without a caller cannot be told apart from
    /// another caller's same key.
    #[default]
    Reject,
    /// Run it undeduplicated, and count it.
    Forward,
}

/// What a call with an idempotency key gets when its slots are all taken.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WhenFull {
    /// RESOURCE_EXHAUSTED: never run a keyed call without its guarantee.
    #[default]
    Reject,
    /// Forward it undeduplicated, and count it.
    Forward,
}

/// One value that scopes idempotency keys, so that one caller can never get
/// another caller's answer. Only their digest is ever kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScopePart {
    /// Envoy's `source.principal`: the mTLS peer's identity (SPIFFE ID).
    SourcePrincipal,
    /// A value of the request's dynamic metadata, by its path: namespace,
    /// key, then fields (`request.auth.principal` is Istio's verified JWT
    /// principal, `metadata:envoy.filters.http.jwt_authn/payload/sub` a
    /// field of Envoy's jwt_authn payload).
    Metadata(Vec<String>),
    /// A request header.
    Header(String),
}

impl ScopePart {
    /// An identity part tells callers apart; `:authority` only names the
    /// virtual host they called.
    pub fn is_identity(&self) -> bool {
        !matches!(self, ScopePart::Header(name) if name == ":authority")
    }

    /// The Envoy property path of a metadata part.
    pub fn property_path(&self) -> Option<Vec<&str>> {
        match self {
            ScopePart::Metadata(path) => {
                Some(["metadata", "filter_metadata"].into_iter().chain(path.iter().map(String::as_str)).collect())
            }
            _ => None,
        }
    }
}

/// The deduplication settings; `None` in [`Config::dedup`] when no method is listed.
#[derive(Clone, Debug, PartialEq)]
pub struct DedupConfig {
    pub header: String,
    pub methods: Vec<MethodPattern>,
    /// AIP-155 methods: the request message field (a path of field numbers)
    /// that carries the key, by full method name.
    pub key_fields: BTreeMap<String, Vec<u32>>,
    pub require_key: bool,
    pub ttl: Duration,
    /// A multiple of [`crate::dedup::WAYS`] (rounded up).
    pub max_entries: u32,
    pub max_response_bytes: u32,
    /// Kept headers and trailers, counted as [`crate::dedup::metadata_bytes`].
    pub max_metadata_bytes: u32,
    pub scope: Vec<ScopePart>,
    pub when_full: WhenFull,
    pub anonymous: Anonymous,
    /// Most ways of one bucket of [`crate::dedup::WAYS`] one caller may hold.
    pub caller_ways: usize,
    /// Where the table lives.
    pub store: DedupStore,
}

/// Where the dedup table lives (`dedup.store`).
#[derive(Clone, Debug, Default, PartialEq)]
pub enum DedupStore {
    /// Envoy's shared data: one Envoy's workers share it.
    #[default]
    Local,
    /// etcd, through an Envoy cluster: every Envoy shares it, across restarts.
    Etcd(crate::etcd::EtcdConfig),
}

/// Which store `dedup.store` names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum StoreKind {
    #[default]
    Local,
    Etcd,
}

impl DedupConfig {
    /// The table this configuration describes.
    pub fn table(&self) -> crate::dedup::DedupTable {
        crate::dedup::DedupTable::new(self.max_entries, self.ttl, self.caller_ways)
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
struct RawConfig {
    direction: Direction,
    non_grpc: NonGrpc,
    metrics: RawMetrics,
    log: RawLog,
    deadline: RawDeadline,
    limits: RawLimits,
    dedup: RawDedup,
}

#[derive(Debug, Clone, PartialEq)]
struct RawDedup {
    header: String,
    methods: Vec<String>,
    key_fields: Vec<(String, Json)>,
    require_key: bool,
    ttl: String,
    max_entries: u32,
    max_response_bytes: u32,
    max_metadata_bytes: u32,
    scope: Vec<String>,
    when_full: WhenFull,
    anonymous: Anonymous,
    caller_share: f64,
    store: StoreKind,
    etcd: Option<RawEtcd>,
}

#[derive(Debug, Clone, PartialEq)]
struct RawEtcd {
    cluster: String,
    prefix: String,
    timeout: String,
    lease_ttl: Option<String>,
    fail_open: bool,
    max_request_bytes: u64,
}

impl Default for RawEtcd {
    fn default() -> Self {
        RawEtcd {
            cluster: "grpc_guard_etcd".to_owned(),
            prefix: "grpc-guard/dedup/".to_owned(),
            timeout: "1s".to_owned(),
            lease_ttl: None,
            fail_open: false,
            max_request_bytes: crate::etcd::DEFAULT_MAX_REQUEST_BYTES,
        }
    }
}

impl Default for RawDedup {
    fn default() -> Self {
        RawDedup {
            header: "idempotency-key".to_owned(),
            methods: Vec::new(),
            key_fields: Vec::new(),
            require_key: false,
            ttl: "5m".to_owned(),
            max_entries: 10_000,
            max_response_bytes: 65_536,
            max_metadata_bytes: 4096,
            scope: DEFAULT_DEDUP_SCOPE.iter().map(|s| (*s).to_owned()).collect(),
            when_full: WhenFull::Reject,
            anonymous: Anonymous::Reject,
            caller_share: 0.25,
            store: StoreKind::Local,
            etcd: None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
struct RawDeadline {
    default: Option<String>,
    max: Option<String>,
    per_method: BTreeMap<String, RawDeadlineOverride>,
}

#[derive(Debug, Clone, Default, PartialEq)]
struct RawDeadlineOverride {
    default: Option<String>,
    max: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq)]
struct RawLimits {
    max_request_message_bytes: Option<u64>,
    per_method: BTreeMap<String, RawLimitsOverride>,
}

#[derive(Debug, Clone, Default, PartialEq)]
struct RawLimitsOverride {
    max_request_message_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
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

#[derive(Debug, Clone, PartialEq)]
struct RawLog {
    ok_sample: f64,
    request_id_header: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog { ok_sample: DEFAULT_OK_SAMPLE, request_id_header: DEFAULT_REQUEST_ID_HEADER.to_owned() }
    }
}

const DIRECTIONS: [(&str, Direction); 2] = [("inbound", Direction::Inbound), ("outbound", Direction::Outbound)];
const NON_GRPC: [(&str, NonGrpc); 2] = [("refuse", NonGrpc::Refuse), ("pass", NonGrpc::Pass)];
const WHEN_FULL: [(&str, WhenFull); 2] = [("reject", WhenFull::Reject), ("forward", WhenFull::Forward)];
const ANONYMOUS: [(&str, Anonymous); 2] = [("reject", Anonymous::Reject), ("forward", Anonymous::Forward)];
const STORES: [(&str, StoreKind); 2] = [("local", StoreKind::Local), ("etcd", StoreKind::Etcd)];
const METHOD_TYPES: [(&str, MethodType); 4] = [
    ("unary", MethodType::Unary),
    ("client_stream", MethodType::ClientStream),
    ("server_stream", MethodType::ServerStream),
    ("bidi_stream", MethodType::BidiStream),
];

/// A `u32` field.
fn u32_value(value: Json) -> Result<u32, String> {
    json::unsigned(value, u64::from(u32::MAX)).map(|n| n as u32)
}

/// Fills `target` from `field` when present.
fn set<T>(target: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *target = value;
    }
}

impl RawConfig {
    /// The document, every field named by its path in errors; absent fields
    /// keep their defaults, unknown ones are refused.
    fn read(document: Json) -> Result<RawConfig, FieldError> {
        let mut raw = RawConfig::default();
        let mut f = Fields::of("", document)?;
        set(&mut raw.direction, f.read("direction", |v| json::one_of(v, &DIRECTIONS))?);
        set(&mut raw.non_grpc, f.read("non_grpc", |v| json::one_of(v, &NON_GRPC))?);
        if let Some(mut m) = f.object("metrics")? {
            set(&mut raw.metrics.methods, m.read("methods", json::strings)?);
            set(
                &mut raw.metrics.max_methods,
                m.read("max_methods", |v| json::unsigned(v, u64::from(u32::MAX)))?.map(|n| n as usize),
            );
            if let Some(types) = m.object("method_types")? {
                let path = types.path("");
                for (name, value) in types.into_entries() {
                    let kind =
                        json::one_of(value, &METHOD_TYPES).map_err(|reason| (format!("{path}{name}"), reason))?;
                    raw.metrics.method_types.insert(name, kind);
                }
            }
            m.finish(&["methods", "max_methods", "method_types"])?;
        }
        if let Some(mut l) = f.object("log")? {
            set(&mut raw.log.ok_sample, l.read("ok_sample", json::number)?);
            set(&mut raw.log.request_id_header, l.read("request_id_header", json::string)?);
            l.finish(&["ok_sample", "request_id_header"])?;
        }
        if let Some(mut d) = f.object("deadline")? {
            raw.deadline.default = d.read_optional("default", json::string)?;
            raw.deadline.max = d.read_optional("max", json::string)?;
            if let Some(per) = d.object("per_method")? {
                let path = per.path("");
                for (name, value) in per.into_entries() {
                    let mut o = Fields::of(&format!("{path}{name}"), value)?;
                    let entry = RawDeadlineOverride {
                        default: o.read_optional("default", json::string)?,
                        max: o.read_optional("max", json::string)?,
                    };
                    o.finish(&["default", "max"])?;
                    raw.deadline.per_method.insert(name, entry);
                }
            }
            d.finish(&["default", "max", "per_method"])?;
        }
        if let Some(mut l) = f.object("limits")? {
            raw.limits.max_request_message_bytes =
                l.read_optional("max_request_message_bytes", |v| json::whole(v, 1, u64::MAX))?;
            if let Some(per) = l.object("per_method")? {
                let path = per.path("");
                for (name, value) in per.into_entries() {
                    let mut o = Fields::of(&format!("{path}{name}"), value)?;
                    let entry = RawLimitsOverride {
                        max_request_message_bytes: o
                            .read_optional("max_request_message_bytes", |v| json::whole(v, 1, u64::MAX))?,
                    };
                    o.finish(&["max_request_message_bytes"])?;
                    raw.limits.per_method.insert(name, entry);
                }
            }
            l.finish(&["max_request_message_bytes", "per_method"])?;
        }
        if let Some(mut d) = f.object("dedup")? {
            let r = &mut raw.dedup;
            set(&mut r.header, d.read("header", json::string)?);
            set(&mut r.methods, d.read("methods", json::strings)?);
            if let Some(fields) = d.object("key_fields")? {
                r.key_fields = fields.into_entries();
            }
            set(&mut r.require_key, d.read("require_key", json::boolean)?);
            set(&mut r.ttl, d.read("ttl", json::string)?);
            set(&mut r.max_entries, d.read("max_entries", u32_value)?);
            set(&mut r.max_response_bytes, d.read("max_response_bytes", u32_value)?);
            set(&mut r.max_metadata_bytes, d.read("max_metadata_bytes", u32_value)?);
            set(&mut r.scope, d.read("scope", json::strings)?);
            set(&mut r.when_full, d.read("when_full", |v| json::one_of(v, &WHEN_FULL))?);
            set(&mut r.anonymous, d.read("anonymous", |v| json::one_of(v, &ANONYMOUS))?);
            set(&mut r.caller_share, d.read("caller_share", json::number)?);
            set(&mut r.store, d.read("store", |v| json::one_of(v, &STORES))?);
            if let Some(mut e) = d.object("etcd")? {
                let mut etcd = RawEtcd::default();
                set(&mut etcd.cluster, e.read("cluster", json::string)?);
                set(&mut etcd.prefix, e.read("prefix", json::string)?);
                set(&mut etcd.timeout, e.read("timeout", json::string)?);
                etcd.lease_ttl = e.read("lease_ttl", json::string)?;
                set(&mut etcd.fail_open, e.read("fail_open", json::boolean)?);
                set(
                    &mut etcd.max_request_bytes,
                    e.read("max_request_bytes", |v| json::whole(v, 1, u64::from(u32::MAX)))?,
                );
                e.finish(&["cluster", "prefix", "timeout", "lease_ttl", "fail_open", "max_request_bytes"])?;
                r.etcd = Some(etcd);
            }
            d.finish(&[
                "header",
                "methods",
                "key_fields",
                "require_key",
                "ttl",
                "max_entries",
                "max_response_bytes",
                "max_metadata_bytes",
                "scope",
                "when_full",
                "anonymous",
                "caller_share",
                "store",
                "etcd",
            ])?;
        }
        f.finish(&["direction", "non_grpc", "metrics", "log", "deadline", "limits", "dedup"])?;
        Ok(raw)
    }
}

/// The guards that apply to one method, after per-method overrides.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MethodPolicy {
    pub deadline: DeadlinePolicy,
    /// Largest request message let through; larger ones are answered
    /// RESOURCE_EXHAUSTED before the upstream sees them.
    pub max_request_message_bytes: Option<u64>,
}

/// A per-method override: set fields replace the global value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct PolicyOverride {
    deadline_default: Option<Duration>,
    deadline_max: Option<Duration>,
    max_request_message_bytes: Option<u64>,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub direction: Direction,
    /// What a non-gRPC request on a gRPC method path gets.
    pub non_grpc: NonGrpc,
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
    /// Deadline and size guards for methods without an override.
    pub global: MethodPolicy,
    /// Overrides by method pattern, most specific (longest) pattern first.
    overrides: Vec<(MethodPattern, PolicyOverride)>,
    /// Idempotency keys and deduplication, when some method is listed.
    pub dedup: Option<DedupConfig>,
}

impl Config {
    /// Parses and validates the plugin configuration. Empty input means `{}`.
    pub fn parse(json: &[u8]) -> Result<Config, ConfigError> {
        let text = std::str::from_utf8(json).map_err(|_| ConfigError::new("configuration", "is not UTF-8"))?;
        if text.trim().is_empty() {
            return Config::from_raw(RawConfig::default());
        }
        if !text.trim_start().starts_with('{') {
            return Err(ConfigError::new("configuration", "must be a JSON object, e.g. {}"));
        }
        let document = Json::parse(text).map_err(|reason| ConfigError::new("configuration", reason))?;
        let raw = RawConfig::read(document).map_err(|(field, reason)| ConfigError { field, reason })?;
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
            method_types.insert(method_name(&format!("metrics.method_types.{name}"), &name)?, kind);
        }
        let log = raw.log;
        if !(0.0..=1.0).contains(&log.ok_sample) {
            return Err(ConfigError::new("log.ok_sample", "must be between 0.0 and 1.0"));
        }
        let header = log.request_id_header.to_ascii_lowercase();
        if header.is_empty() || !header.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err(ConfigError::new(
                "log.request_id_header",
                format!("{:?} is not an HTTP header name", log.request_id_header),
            ));
        }
        let (global, overrides) = policies(raw.deadline, raw.limits)?;
        let dedup = dedup_config(raw.dedup, &method_types)?;
        Ok(Config {
            dedup,
            global,
            overrides,
            direction: raw.direction,
            non_grpc: raw.non_grpc,
            methods: m.methods.iter().map(|p| MethodPattern::new(p)).collect(),
            max_methods: m.max_methods,
            method_types,
            ok_sample: log.ok_sample,
            request_id_header: header,
        })
    }

    /// True when some method has its own deadline or size limits.
    pub fn has_overrides(&self) -> bool {
        !self.overrides.is_empty()
    }

    /// The guards for a method (`pkg.Svc/Method`): the most specific matching
    /// override on top of the global values.
    pub fn policy_for(&self, full_name: &str) -> MethodPolicy {
        let Some((_, o)) = self.overrides.iter().find(|(p, _)| p.matches(full_name)) else {
            return self.global;
        };
        let deadline = DeadlinePolicy {
            default: o.deadline_default.or(self.global.deadline.default),
            max: o.deadline_max.or(self.global.deadline.max),
        };
        MethodPolicy {
            deadline,
            max_request_message_bytes: o.max_request_message_bytes.or(self.global.max_request_message_bytes),
        }
    }

    /// True when calls to this method are deduplicated by idempotency key.
    pub fn dedup_applies(&self, full_name: &str) -> bool {
        self.dedup.as_ref().is_some_and(|d| d.methods.iter().any(|p| p.matches(full_name)))
    }

    /// The `grpc_type` label of a method.
    pub fn method_type(&self, full_name: &str) -> MethodType {
        self.method_types.get(full_name).copied().unwrap_or_default()
    }

    /// True if the method may get its own label.
    pub fn method_allowed(&self, full_name: &str) -> bool {
        self.methods.iter().any(|p| p.matches(full_name))
    }

    /// True if the operator named the method itself, without a `*`,
    /// anywhere in the configuration (`metrics.methods`,
    /// `metrics.method_types`, a `per_method` key, `dedup.methods`,
    /// `dedup.key_fields`): it is real, and has its label without waiting
    /// for an answer.
    pub fn method_named(&self, full_name: &str) -> bool {
        self.methods.iter().any(|p| p.names(full_name))
            || self.method_types.contains_key(full_name)
            || self.overrides.iter().any(|(p, _)| p.names(full_name))
            || self
                .dedup
                .as_ref()
                .is_some_and(|d| d.methods.iter().any(|p| p.names(full_name)) || d.key_fields.contains_key(full_name))
    }
}

fn dedup_config(
    raw: RawDedup,
    method_types: &BTreeMap<String, MethodType>,
) -> Result<Option<DedupConfig>, ConfigError> {
    let header = raw.header.to_ascii_lowercase();
    if header.is_empty() || !header.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(ConfigError::new("dedup.header", format!("{:?} is not an HTTP header name", raw.header)));
    }
    let mut methods = Vec::new();
    for (i, pattern) in raw.methods.iter().enumerate() {
        let field = format!("dedup.methods[{i}]");
        check_pattern(&field, pattern)?;
        let p = MethodPattern::new(pattern);
        // Only a unary call has one answer to keep and replay.
        if let Some((name, kind)) = method_types.iter().find(|(n, k)| **k != MethodType::Unary && p.matches(n)) {
            return Err(ConfigError::new(
                &field,
                format!("{pattern:?} covers {name}, a {} method; only unary calls can be deduplicated", kind.as_str()),
            ));
        }
        methods.push(p);
    }
    let mut key_fields = BTreeMap::new();
    for (name, value) in raw.key_fields {
        let field = format!("dedup.key_fields.{name}");
        let name = method_name(&field, &name)?;
        let path = key_field_path(value).map_err(|reason| ConfigError::new(&field, reason))?;
        if !methods.iter().any(|p| p.matches(&name)) {
            return Err(ConfigError::new(&field, format!("{name} is not among dedup.methods")));
        }
        key_fields.insert(name, path);
    }
    let ttl = duration("dedup.ttl", Some(&raw.ttl))?.unwrap_or_default();
    let raw_sizes = KeptSizes { response: raw.max_response_bytes, metadata: raw.max_metadata_bytes };
    if raw.max_entries == 0 || raw.max_entries > MAX_DEDUP_ENTRIES {
        return Err(ConfigError::new(
            "dedup.max_entries",
            format!("must be between 1 and {MAX_DEDUP_ENTRIES}, got {}", raw.max_entries),
        ));
    }
    if raw.max_response_bytes == 0 || raw.max_response_bytes > MAX_DEDUP_RESPONSE_BYTES {
        return Err(ConfigError::new(
            "dedup.max_response_bytes",
            format!("must be between 1 and {MAX_DEDUP_RESPONSE_BYTES}, got {}", raw.max_response_bytes),
        ));
    }
    if raw.max_metadata_bytes > MAX_DEDUP_METADATA_BYTES {
        return Err(ConfigError::new(
            "dedup.max_metadata_bytes",
            format!("must be at most {MAX_DEDUP_METADATA_BYTES}, got {}", raw.max_metadata_bytes),
        ));
    }
    // Whole buckets: the table holds `WAYS` entries per bucket.
    let max_entries = raw.max_entries.div_ceil(crate::dedup::WAYS as u32) * crate::dedup::WAYS as u32;
    let per_entry =
        u64::from(raw.max_response_bytes) + u64::from(raw.max_metadata_bytes) + crate::dedup::ENTRY_OVERHEAD;
    let worst = u64::from(max_entries) * per_entry;
    // Envoy's memory bounds only the local table (etcd's is checked per
    // request, below).
    if raw.store == StoreKind::Local && worst > MAX_DEDUP_TABLE_BYTES {
        return Err(ConfigError::new(
            "dedup.max_entries",
            format!(
                "{} entries of up to {per_entry} bytes (max_response_bytes + max_metadata_bytes + {}) could take {} \
                 MiB, over the {} MiB a table may take; lower max_entries or max_response_bytes",
                max_entries,
                crate::dedup::ENTRY_OVERHEAD,
                worst >> 20,
                MAX_DEDUP_TABLE_BYTES >> 20
            ),
        ));
    }
    let ways = crate::dedup::WAYS as f64;
    if !(raw.caller_share > 0.0 && raw.caller_share <= 1.0) {
        return Err(ConfigError::new("dedup.caller_share", "must be above 0 and at most 1"));
    }
    // At least one way: a caller always gets somewhere.
    let caller_ways = ((raw.caller_share * ways).ceil() as usize).clamp(1, crate::dedup::WAYS);
    let mut scope = Vec::new();
    for (i, part) in raw.scope.iter().enumerate() {
        let field = || format!("dedup.scope[{i}]");
        scope.push(match part.as_str() {
            "source.principal" => ScopePart::SourcePrincipal,
            "request.auth.principal" => {
                ScopePart::Metadata(vec!["istio_authn".to_owned(), "request.auth.principal".to_owned()])
            }
            ":authority" => ScopePart::Header(":authority".to_owned()),
            other => match (other.strip_prefix("header:"), other.strip_prefix("metadata:")) {
                (Some(name), _) if !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic()) => {
                    ScopePart::Header(name.to_ascii_lowercase())
                }
                (_, Some(path)) if path.split('/').count() >= 2 && path.split('/').all(|p| !p.is_empty()) => {
                    ScopePart::Metadata(path.split('/').map(str::to_owned).collect())
                }
                _ => {
                    return Err(ConfigError::new(
                        &field(),
                        format!(
                            "{other:?} is not \"source.principal\", \"request.auth.principal\", \":authority\", \
                             \"header:NAME\" or \"metadata:NAMESPACE/KEY[/FIELD...]\""
                        ),
                    ))
                }
            },
        });
    }
    if !scope.iter().any(ScopePart::is_identity) {
        return Err(ConfigError::new(
            "dedup.scope",
            "names no caller identity (\"source.principal\", \"request.auth.principal\", \"header:authorization\", \
             ...): one caller could be replayed another's answer",
        ));
    }
    let store = match (raw.store, raw.etcd) {
        (StoreKind::Local, None) => DedupStore::Local,
        (StoreKind::Local, Some(_)) => {
            return Err(ConfigError::new("dedup.etcd", "is set but dedup.store is \"local\"; set it to \"etcd\""))
        }
        (StoreKind::Etcd, etcd) => DedupStore::Etcd(etcd_config(etcd.unwrap_or_default(), &raw_sizes, ttl)?),
    };
    if methods.is_empty() {
        return Ok(None);
    }
    Ok(Some(DedupConfig {
        header,
        methods,
        key_fields,
        require_key: raw.require_key,
        ttl,
        max_entries,
        max_response_bytes: raw.max_response_bytes,
        max_metadata_bytes: raw.max_metadata_bytes,
        scope,
        when_full: raw.when_full,
        anonymous: raw.anonymous,
        caller_ways,
        store,
    }))
}

/// The kept answer's bounds, for the etcd store's request size check.
struct KeptSizes {
    response: u32,
    metadata: u32,
}

fn etcd_config(raw: RawEtcd, sizes: &KeptSizes, ttl: Duration) -> Result<crate::etcd::EtcdConfig, ConfigError> {
    use crate::etcd::{entry_lifetime, TXN_OVERHEAD};
    let cluster = raw.cluster;
    // Envoy takes the cluster inside a message whose lengths are one byte.
    if cluster.is_empty() || cluster.len() > 100 || !cluster.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::new(
            "dedup.etcd.cluster",
            format!("{cluster:?} is not an Envoy cluster name (1 to 100 printable ASCII characters)"),
        ));
    }
    if raw.prefix.len() > 200 || !raw.prefix.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::new("dedup.etcd.prefix", "must be at most 200 printable ASCII characters"));
    }
    let timeout = duration("dedup.etcd.timeout", Some(&raw.timeout))?.unwrap_or_default();
    // What an entry can live, plus a margin for clocks and the grant's trip.
    let needed = entry_lifetime(ttl, Duration::from_secs(1)).saturating_add(Duration::from_secs(5));
    let lease_ttl = match duration("dedup.etcd.lease_ttl", raw.lease_ttl.as_ref())? {
        Some(lease_ttl) if lease_ttl < needed.saturating_add(Duration::from_secs(10)) => {
            return Err(ConfigError::new(
                "dedup.etcd.lease_ttl",
                format!(
                    "must be at least {}s: an entry lives up to twice dedup.ttl and a second, and a lease must \
                     outlive the entries put under it for a while",
                    needed.as_secs() + 10
                ),
            ))
        }
        Some(lease_ttl) => lease_ttl,
        None => needed.saturating_add(ttl).saturating_add(Duration::from_secs(60)),
    };
    let largest = u64::from(sizes.response) + u64::from(sizes.metadata) + crate::dedup::ENTRY_OVERHEAD + TXN_OVERHEAD;
    if largest > raw.max_request_bytes {
        return Err(ConfigError::new(
            "dedup.max_response_bytes",
            format!(
                "a kept answer of up to {} + {} (max_metadata_bytes) bytes makes an etcd request of up to {largest} \
                 bytes, over dedup.etcd.max_request_bytes ({}, etcd's --max-request-bytes); lower it or raise \
                 both",
                sizes.response, sizes.metadata, raw.max_request_bytes
            ),
        ));
    }
    Ok(crate::etcd::EtcdConfig {
        cluster,
        prefix: raw.prefix,
        timeout,
        lease: crate::etcd::LeaseWindow { lease_ttl, needed },
        fail_open: raw.fail_open,
        max_request_bytes: raw.max_request_bytes,
    })
}

/// A key field's path: a field number, or an array of them for a field of a
/// nested message (outermost first).
fn key_field_path(value: Json) -> Result<Vec<u32>, String> {
    const EXPECTED: &str = "a protobuf field number, or an array of them for a nested field";
    let numbers = match value {
        Json::Array(items) if (1..=MAX_KEY_FIELD_DEPTH).contains(&items.len()) => items,
        Json::Array(items) => {
            return Err(format!("a path of {} field numbers; expected 1 to {MAX_KEY_FIELD_DEPTH}", items.len()))
        }
        one => vec![one],
    };
    numbers
        .into_iter()
        .map(|n| match n {
            // 19000-19999 are reserved for protobuf itself.
            Json::Integer(n @ 1..=MAX_FIELD_NUMBER) if !(19_000..20_000).contains(&n) => Ok(n as u32),
            Json::Integer(n) => {
                Err(format!("{n} is not a protobuf field number (1 to {MAX_FIELD_NUMBER}, not 19000-19999)"))
            }
            other => Err(format!("invalid type: {}, expected {EXPECTED}", other.describe())),
        })
        .collect()
}

/// Parses a configuration duration: an integer and a unit `ms`, `s`, `m`, `h`
/// (`"250ms"`, `"5s"`, `"1m"`).
fn parse_config_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() || digits.len() > 9 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => Some(Duration::from_secs(n * 60)),
        "h" => Some(Duration::from_secs(n * 3600)),
        _ => None,
    }
}

fn duration(field: &str, value: Option<&String>) -> Result<Option<Duration>, ConfigError> {
    let Some(text) = value else { return Ok(None) };
    match parse_config_duration(text) {
        Some(d) if !d.is_zero() => Ok(Some(d)),
        Some(_) => Err(ConfigError::new(field, "must be greater than zero")),
        None => {
            Err(ConfigError::new(field, format!("{text:?} is not a duration like \"250ms\", \"5s\", \"1m\" or \"1h\"")))
        }
    }
}

fn message_limit(field: &str, value: Option<u64>) -> Result<Option<u64>, ConfigError> {
    match value {
        Some(0) => Err(ConfigError::new(field, "must be at least 1 byte")),
        Some(n) if n > u64::from(u32::MAX) => {
            Err(ConfigError::new(field, format!("must fit a gRPC frame length (at most {}), got {n}", u32::MAX)))
        }
        other => Ok(other),
    }
}

fn check_default_within_max(prefix: &str, policy: DeadlinePolicy) -> Result<(), ConfigError> {
    match (policy.default, policy.max) {
        (Some(d), Some(m)) if d > m => Err(ConfigError::new(
            &format!("{prefix}default"),
            format!("{} ms is above the maximum of {} ms that applies to it", d.as_millis(), m.as_millis()),
        )),
        _ => Ok(()),
    }
}

/// Validates the deadline and limits sections into the global policy and the
/// per-method overrides (keys of both `per_method` maps are method patterns).
fn policies(
    deadline: RawDeadline,
    limits: RawLimits,
) -> Result<(MethodPolicy, Vec<(MethodPattern, PolicyOverride)>), ConfigError> {
    let global = MethodPolicy {
        deadline: DeadlinePolicy {
            default: duration("deadline.default", deadline.default.as_ref())?,
            max: duration("deadline.max", deadline.max.as_ref())?,
        },
        max_request_message_bytes: message_limit("limits.max_request_message_bytes", limits.max_request_message_bytes)?,
    };
    check_default_within_max("deadline.", global.deadline)?;

    let mut by_pattern: BTreeMap<String, PolicyOverride> = BTreeMap::new();
    for (name, o) in &deadline.per_method {
        let prefix = format!("deadline.per_method.{name}.");
        check_pattern(&format!("deadline.per_method.{name}"), name)?;
        let entry = by_pattern.entry(bare(name).to_owned()).or_default();
        entry.deadline_default = duration(&format!("{prefix}default"), o.default.as_ref())?;
        entry.deadline_max = duration(&format!("{prefix}max"), o.max.as_ref())?;
        let merged = DeadlinePolicy {
            default: entry.deadline_default.or(global.deadline.default),
            max: entry.deadline_max.or(global.deadline.max),
        };
        check_default_within_max(&prefix, merged)?;
    }
    for (name, o) in &limits.per_method {
        let field = format!("limits.per_method.{name}.max_request_message_bytes");
        check_pattern(&format!("limits.per_method.{name}"), name)?;
        by_pattern.entry(bare(name).to_owned()).or_default().max_request_message_bytes =
            message_limit(&field, o.max_request_message_bytes)?;
    }
    let mut overrides: Vec<(MethodPattern, PolicyOverride)> =
        by_pattern.into_iter().map(|(p, o)| (MethodPattern::new(&p), o)).collect();
    // Most specific first: a longer pattern names fewer methods.
    overrides.sort_by_key(|(p, _)| std::cmp::Reverse(p.specificity()));
    Ok((global, overrides))
}

fn bare(name: &str) -> &str {
    name.strip_prefix('/').unwrap_or(name)
}

/// A full method name as configuration keys write it, `pkg.Svc/Method` (a
/// leading `/` allowed), without the slash.
fn method_name(field: &str, name: &str) -> Result<String, ConfigError> {
    let bare = name.strip_prefix('/').unwrap_or(name);
    if MethodPath::parse(&format!("/{bare}")).is_none() {
        return Err(ConfigError::new(field, "is not a method name like \"pkg.Svc/Method\""));
    }
    Ok(bare.to_owned())
}

fn check_pattern(field: &str, pattern: &str) -> Result<(), ConfigError> {
    if pattern.is_empty() || !pattern.bytes().all(|b| b.is_ascii_graphic()) || !pattern.contains(['/', '*']) {
        return Err(ConfigError::new(field, "is not a method pattern like \"pkg.Svc/Method\" or \"pkg.Svc/*\""));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn err(json: &str) -> ConfigError {
        Config::parse(json.as_bytes()).expect_err("config must be rejected")
    }

    #[test]
    fn config_durations_take_ms_s_m_h() {
        assert_eq!(parse_config_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_config_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_config_duration("1m"), Some(Duration::from_secs(60)));
        assert_eq!(parse_config_duration("2h"), Some(Duration::from_secs(7200)));
        for bad in ["", "5", "s", "5 s", "1.5s", "-1s", "5S", "10d", "9999999999s"] {
            assert_eq!(parse_config_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn empty_object_and_empty_input_give_the_defaults() {
        let c = Config::parse(b"{}").unwrap();
        assert_eq!(c, Config::parse(b"").unwrap());
        assert_eq!(c.direction, Direction::Inbound);
        assert_eq!(c.max_methods, 200);
        assert_eq!(c.ok_sample, 0.01);
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
    fn null_never_stands_for_a_default_except_where_absence_means_none() {
        for (doc, field) in [
            (r#"{"dedup":null}"#, "dedup"),
            (r#"{"dedup":{"methods":null}}"#, "dedup.methods"),
            (r#"{"dedup":{"methods":["a.B/C"],"require_key":null}}"#, "dedup.require_key"),
            (r#"{"metrics":{"methods":null}}"#, "metrics.methods"),
            (r#"{"log":{"ok_sample":null}}"#, "log.ok_sample"),
            (r#"{"deadline":{"per_method":null}}"#, "deadline.per_method"),
        ] {
            assert_eq!(err(doc).field, field, "{doc}");
        }
        let none = br#"{"deadline":{"default":null,"max":null},"limits":{"max_request_message_bytes":null}}"#;
        assert_eq!(Config::parse(none).unwrap(), Config::parse(b"{}").unwrap());
    }

    #[test]
    fn a_whole_number_field_takes_only_a_whole_number_as_written() {
        for doc in [
            r#"{"metrics":{"max_methods":1.0}}"#,
            r#"{"metrics":{"max_methods":1e2}}"#,
            r#"{"metrics":{"max_methods":-0}}"#,
            r#"{"metrics":{"max_methods":-1}}"#,
        ] {
            assert_eq!(err(doc).field, "metrics.max_methods", "{doc}");
        }
        assert_eq!(Config::parse(br#"{"metrics":{"max_methods":7}}"#).unwrap().max_methods, 7);
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

    #[test]
    fn empty_config_sets_no_deadline_and_no_size_limit() {
        let c = Config::parse(b"{}").unwrap();
        assert_eq!(c.policy_for("a.B/C"), MethodPolicy::default());
        assert!(!c.has_overrides());
    }

    #[test]
    fn per_method_overrides_win_over_global_values_field_by_field() {
        let c = Config::parse(
            br#"{"deadline":{"default":"10s","max":"60s","per_method":{"pkg.Svc/Slow":{"max":"120s"},"pkg.Svc/*":{"default":"1s"}}},
                "limits":{"max_request_message_bytes":1024,"per_method":{"pkg.Svc/Upload":{"max_request_message_bytes":65536}}}}"#,
        )
        .unwrap();
        let s = Duration::from_secs;
        let slow = c.policy_for("pkg.Svc/Slow");
        assert_eq!(slow.deadline, DeadlinePolicy { default: Some(s(10)), max: Some(s(120)) });
        assert_eq!(slow.max_request_message_bytes, Some(1024));
        let other = c.policy_for("pkg.Svc/Get");
        assert_eq!(other.deadline, DeadlinePolicy { default: Some(s(1)), max: Some(s(60)) });
        assert_eq!(c.policy_for("pkg.Svc/Upload").max_request_message_bytes, Some(65536));
        assert_eq!(c.policy_for("x.Y/Z").deadline, DeadlinePolicy { default: Some(s(10)), max: Some(s(60)) });
    }

    #[test]
    fn bad_deadline_and_limit_values_name_the_field() {
        assert_eq!(err(r#"{"deadline":{"default":"10 s"}}"#).field, "deadline.default");
        assert_eq!(err(r#"{"deadline":{"max":"0s"}}"#).field, "deadline.max");
        assert_eq!(err(r#"{"deadline":{"default":"2m","max":"1m"}}"#).field, "deadline.default");
        assert_eq!(
            err(r#"{"deadline":{"max":"1m","per_method":{"a.B/C":{"default":"5m"}}}}"#).field,
            "deadline.per_method.a.B/C.default"
        );
        assert_eq!(
            err(r#"{"deadline":{"per_method":{"a.B/C":{"dflt":"5m"}}}}"#).field,
            "deadline.per_method.a.B/C.dflt"
        );
        assert_eq!(err(r#"{"deadline":{"per_method":{"nope":{}}}}"#).field, "deadline.per_method.nope");
        assert_eq!(err(r#"{"limits":{"max_request_message_bytes":0}}"#).field, "limits.max_request_message_bytes");
        assert_eq!(
            err(r#"{"limits":{"per_method":{"a.B/C":{"max_request_message_bytes":5000000000}}}}"#).field,
            "limits.per_method.a.B/C.max_request_message_bytes"
        );
        assert_eq!(err(r#"{"limits":{"max_request_message_bytes":-1}}"#).field, "limits.max_request_message_bytes");
    }

    /// The README's configuration table: each documented default, set
    /// explicitly, must give exactly the configuration `{}` gives.
    #[test]
    fn readme_documents_the_real_defaults() {
        let readme = include_str!("../../README.md");
        let table = readme.split("| field | default | meaning |").nth(1).expect("README has the config table");
        let mut rows = 0;
        for line in table.lines().skip(2).take_while(|l| l.starts_with("| `")) {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let field = cells[1].trim_matches('`');
            let default = cells[2].trim_matches('`');
            rows += 1;
            if default == "none" {
                continue;
            }
            // The etcd store's fields count only with the store on.
            let (base, inner) = match field.strip_prefix("dedup.etcd.") {
                Some(key) => (r#"{"dedup":{"methods":["a.B/C"],"store":"etcd"}}"#.to_owned(), key),
                None => ("{}".to_owned(), field),
            };
            if field == "dedup.etcd.lease_ttl" {
                // Computed from ttl, as the README says.
                let etcd = |c: Config| match c.dedup.unwrap().store {
                    DedupStore::Etcd(e) => e,
                    DedupStore::Local => unreachable!(),
                };
                assert_eq!(default, "3 × `ttl` + 66 s");
                let lease = etcd(Config::parse(base.as_bytes()).unwrap()).lease.lease_ttl;
                assert_eq!(lease, Duration::from_secs(3 * 300 + 66));
                continue;
            }
            let value = inner.split('.').rev().fold(default.to_owned(), |inner, key| format!("{{\"{key}\":{inner}}}"));
            let json = match field.strip_prefix("dedup.etcd.") {
                Some(_) => format!(r#"{{"dedup":{{"methods":["a.B/C"],"store":"etcd","etcd":{value}}}}}"#),
                None => value,
            };
            let parsed = Config::parse(json.as_bytes()).unwrap_or_else(|e| panic!("README default of {field}: {e}"));
            let expected = Config::parse(base.as_bytes()).unwrap();
            assert_eq!(parsed, expected, "README default of {field} is not the real default");
        }
        assert!(rows >= 11, "only {rows} config rows found in the README");
    }

    #[test]
    fn dedup_is_off_until_a_method_is_listed_and_has_documented_defaults() {
        assert_eq!(Config::parse(b"{}").unwrap().dedup, None);
        let c = Config::parse(br#"{"dedup":{"methods":["pkg.Orders/Create*"]}}"#).unwrap();
        let d = c.dedup.clone().unwrap();
        assert_eq!(d.header, "idempotency-key");
        assert!(!d.require_key);
        assert_eq!(d.ttl, Duration::from_secs(300));
        assert_eq!((d.max_entries, d.max_response_bytes, d.max_metadata_bytes), (10_000, 65_536, 4096));
        assert_eq!(
            d.scope,
            [
                ScopePart::SourcePrincipal,
                ScopePart::Metadata(vec!["istio_authn".into(), "request.auth.principal".into()]),
                ScopePart::Header("authorization".into()),
            ]
        );
        assert_eq!((d.when_full, d.anonymous, d.caller_ways), (WhenFull::Reject, Anonymous::Reject, 2));
        assert_eq!(c.non_grpc, NonGrpc::Refuse);
        assert!(c.dedup_applies("pkg.Orders/CreateOrder"));
        assert!(!c.dedup_applies("pkg.Orders/Get"));
    }

    #[test]
    fn a_method_named_without_a_star_anywhere_is_named() {
        let c = Config::parse(
            br#"{"metrics":{"methods":["a.S/M1","a.S/*"],"method_types":{"a.S/M2":"server_stream"}},
                 "deadline":{"per_method":{"a.S/M3":{"max":"1s"},"b.*":{"max":"2s"}}},
                 "limits":{"per_method":{"a.S/M4":{"max_request_message_bytes":1}}},
                 "dedup":{"methods":["a.S/M5","c.*"],"key_fields":{"a.S/M5":1}}}"#,
        )
        .unwrap();
        for named in ["a.S/M1", "a.S/M2", "a.S/M3", "a.S/M4", "a.S/M5"] {
            assert!(c.method_named(named), "{named}");
        }
        for unnamed in ["a.S/M6", "b.S/M", "c.S/M"] {
            assert!(!c.method_named(unnamed), "{unnamed}");
        }
    }

    #[test]
    fn key_fields_name_a_field_number_or_a_nested_path_of_a_deduplicated_method() {
        let c = Config::parse(
            br#"{"dedup":{"methods":["pkg.Svc/*"],"key_fields":{"pkg.Svc/Create":1,"/pkg.Svc/Update":[2,1]}}}"#,
        )
        .unwrap();
        let d = c.dedup.unwrap();
        assert_eq!(d.key_fields.get("pkg.Svc/Create"), Some(&vec![1]));
        assert_eq!(d.key_fields.get("pkg.Svc/Update"), Some(&vec![2, 1]));
        for (fields, reason) in [
            (r#"{"pkg.Other/Create":1}"#, "not among dedup.methods"),
            (r#"{"pkg.Svc/*":1}"#, "is not a method name"),
            (r#"{"pkg.Svc/Create":0}"#, "is not a protobuf field number"),
            (r#"{"pkg.Svc/Create":19500}"#, "is not a protobuf field number"),
            (r#"{"pkg.Svc/Create":536870912}"#, "is not a protobuf field number"),
            (r#"{"pkg.Svc/Create":"1"}"#, "expected a protobuf field number"),
            (r#"{"pkg.Svc/Create":1.5}"#, "expected a protobuf field number"),
            (r#"{"pkg.Svc/Create":[]}"#, "a path of 0 field numbers"),
            (r#"{"pkg.Svc/Create":[1,2,3,4,5,6,7,8,9]}"#, "a path of 9 field numbers"),
            (r#"{"pkg.Svc/Create":null}"#, "expected a protobuf field number"),
        ] {
            let e = err(&format!(r#"{{"dedup":{{"methods":["pkg.Svc/*"],"key_fields":{fields}}}}}"#));
            assert!(e.field.starts_with("dedup.key_fields."), "{fields}: {e}");
            assert!(e.reason.contains(reason), "{fields}: {e}");
        }
    }

    #[test]
    fn streaming_method_in_dedup_methods_is_refused_at_config_time() {
        let e =
            err(r#"{"metrics":{"method_types":{"pkg.Svc/Watch":"server_stream"}},"dedup":{"methods":["pkg.Svc/*"]}}"#);
        assert_eq!(e.field, "dedup.methods[0]");
        assert!(e.reason.contains("pkg.Svc/Watch, a server_stream method"), "{e}");
    }

    #[test]
    fn the_etcd_store_takes_its_settings_and_refuses_bad_ones_naming_the_field() {
        let etcd = |extra: &str| format!(r#"{{"dedup":{{"methods":["pkg.Svc/Create"],"store":"etcd"{extra}}}}}"#);
        let c = Config::parse(
            etcd(r#","etcd":{"cluster":"outbound|2379||etcd.etcd.svc.cluster.local","prefix":"shop/","timeout":"250ms","fail_open":true}"#)
                .as_bytes(),
        )
        .unwrap();
        let DedupStore::Etcd(e) = c.dedup.unwrap().store else { panic!("etcd") };
        assert_eq!(e.cluster, "outbound|2379||etcd.etcd.svc.cluster.local");
        assert_eq!((e.prefix.as_str(), e.timeout, e.fail_open), ("shop/", Duration::from_millis(250), true));
        for (extra, field) in [
            (r#","etcd":{"cluster":""}"#, "dedup.etcd.cluster"),
            (r#","etcd":{"cluster":"a b"}"#, "dedup.etcd.cluster"),
            (r#","etcd":{"timeout":"soon"}"#, "dedup.etcd.timeout"),
            (r#","etcd":{"lease_ttl":"30s"}"#, "dedup.etcd.lease_ttl"),
            (r#","etcd":{"fail_open":"yes"}"#, "dedup.etcd.fail_open"),
            (r#","etcd":{"clustr":"x"}"#, "dedup.etcd.clustr"),
            (r#","etcd":{"max_request_bytes":65536}"#, "dedup.max_response_bytes"),
        ] {
            let e = err(&etcd(extra));
            assert_eq!(e.field, field, "{extra}: {e}");
        }
        assert_eq!(err(r#"{"dedup":{"store":"consul"}}"#).field, "dedup.store");
        // The settings of a store that is not on are a mistake, not ignored.
        assert_eq!(err(r#"{"dedup":{"methods":["a.B/C"],"etcd":{}}}"#).field, "dedup.etcd");
        // A kept answer that fits the default request size, one that does not.
        assert!(Config::parse(etcd(r#","max_response_bytes":1048576"#).as_bytes()).is_ok());
        let e = err(&etcd(r#","max_response_bytes":2097152"#));
        assert_eq!(e.field, "dedup.max_response_bytes");
        assert!(e.to_string().contains("max_request_bytes"), "{e}");
    }

    #[test]
    fn the_readme_s_etcd_example_is_a_configuration_the_filter_takes() {
        let readme = include_str!("../../README.md");
        let section = readme.split("### The dedup table on etcd\n").nth(1).expect("the section");
        let example = section.split("```json\n").nth(1).and_then(|b| b.split("```").next()).expect("its example");
        let c = Config::parse(example.as_bytes()).unwrap_or_else(|e| panic!("{e}\n{example}"));
        let d = c.dedup.unwrap();
        assert!(matches!(d.store, DedupStore::Etcd(_)));
        assert_eq!(d.ttl, Duration::from_secs(24 * 3600));
    }

    #[test]
    fn bad_dedup_values_name_the_field() {
        assert_eq!(err(r#"{"dedup":{"ttl":"forever"}}"#).field, "dedup.ttl");
        assert_eq!(err(r#"{"dedup":{"max_entries":0}}"#).field, "dedup.max_entries");
        assert_eq!(err(r#"{"dedup":{"max_response_bytes":99999999}}"#).field, "dedup.max_response_bytes");
        assert_eq!(err(r#"{"dedup":{"scope":["source.ip"]}}"#).field, "dedup.scope[0]");
        assert_eq!(err(r#"{"dedup":{"when_full":"drop"}}"#).field, "dedup.when_full");
        assert_eq!(err(r#"{"dedup":{"header":"bad header"}}"#).field, "dedup.header");
        assert_eq!(err(r#"{"dedup":{"methods":["nope"]}}"#).field, "dedup.methods[0]");
        assert_eq!(err(r#"{"dedup":{"scope":["metadata:only-a-namespace"]}}"#).field, "dedup.scope[0]");
        assert_eq!(err(r#"{"dedup":{"caller_share":0}}"#).field, "dedup.caller_share");
        assert_eq!(err(r#"{"dedup":{"caller_share":1.5}}"#).field, "dedup.caller_share");
        assert_eq!(err(r#"{"dedup":{"max_metadata_bytes":70000}}"#).field, "dedup.max_metadata_bytes");
        assert_eq!(err(r#"{"dedup":{"anonymous":"allow"}}"#).field, "dedup.anonymous");
        assert_eq!(err(r#"{"non_grpc":"drop"}"#).field, "non_grpc");
    }

    #[test]
    fn a_scope_that_identifies_nobody_is_refused() {
        for scope in [r#"[]"#, r#"[":authority"]"#] {
            let e = err(&format!(r#"{{"dedup":{{"methods":["pkg.Svc/M"],"scope":{scope}}}}}"#));
            assert_eq!(e.field, "dedup.scope", "{scope}");
            assert!(e.reason.contains("no caller identity"), "{e}");
        }
        let ok = Config::parse(br#"{"dedup":{"methods":["pkg.Svc/M"],"scope":["header:x-user"]}}"#).unwrap();
        assert_eq!(ok.dedup.unwrap().scope, [ScopePart::Header("x-user".into())]);
        let jwt =
            r#"{"dedup":{"methods":["pkg.Svc/M"],"scope":["metadata:envoy.filters.http.jwt_authn/payload/sub"]}}"#;
        let part = Config::parse(jwt.as_bytes()).unwrap().dedup.unwrap().scope.remove(0);
        assert_eq!(
            part.property_path().unwrap(),
            ["metadata", "filter_metadata", "envoy.filters.http.jwt_authn", "payload", "sub"]
        );
    }

    #[test]
    fn a_table_whose_worst_case_is_over_the_cap_is_refused_naming_the_field() {
        let e = err(r#"{"dedup":{"methods":["pkg.Svc/M"],"max_entries":100000,"max_response_bytes":65536}}"#);
        assert_eq!(e.field, "dedup.max_entries");
        assert!(e.reason.contains("MiB"), "{e}");
        let fits = r#"{"dedup":{"methods":["pkg.Svc/M"],"max_entries":10000,"max_response_bytes":65536}}"#;
        assert!(Config::parse(fits.as_bytes()).is_ok());
    }

    #[test]
    fn the_table_holds_whole_buckets_and_a_caller_at_least_one_way() {
        let d = |json: &str| Config::parse(json.as_bytes()).unwrap().dedup.unwrap();
        assert_eq!(d(r#"{"dedup":{"methods":["a.B/C"],"max_entries":9}}"#).max_entries, 16);
        assert_eq!(d(r#"{"dedup":{"methods":["a.B/C"],"caller_share":0.01}}"#).caller_ways, 1);
        assert_eq!(d(r#"{"dedup":{"methods":["a.B/C"],"caller_share":1}}"#).caller_ways, crate::dedup::WAYS);
    }

    proptest! {
        #[test]
        fn any_bytes_parse_or_fail_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Config::parse(&bytes);
        }
    }
}
