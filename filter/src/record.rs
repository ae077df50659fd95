//! The record of one finished call and its JSON log line.
//!
//! One line per call, at info level, so `kubectl logs` of a sidecar (or Envoy's
//! own log) shows what each call did. Every value is JSON-escaped by
//! `serde_json`, and values copied from request headers are cut to
//! [`MAX_HEADER_VALUE_LEN`] bytes, so a client cannot inject lines or make one
//! line huge.

use serde::Serialize;

use crate::config::Direction;
use crate::status::{GrpcStatus, StatusSource};

/// Longest header-derived value kept in a log line.
pub const MAX_HEADER_VALUE_LEN: usize = 128;

/// Everything the log line and the end-of-call metrics need.
#[derive(Clone, Debug, PartialEq)]
pub struct CallRecord {
    pub direction: Direction,
    /// `package.Service`, or empty when the path is not a gRPC method path.
    pub service: String,
    /// `Method`, or the (cut) raw path when it is not a gRPC method path.
    pub method: String,
    pub grpc_type: &'static str,
    pub status: GrpcStatus,
    pub status_source: StatusSource,
    /// `:status` of the response, 0 when none was sent.
    pub http_status: u32,
    pub duration_ms: u64,
    pub req_msgs: u64,
    pub req_bytes: u64,
    pub resp_msgs: u64,
    pub resp_bytes: u64,
    pub request_id: Option<String>,
}

#[derive(Serialize)]
struct Line<'a> {
    direction: &'a str,
    service: &'a str,
    method: &'a str,
    grpc_type: &'a str,
    grpc_code: &'a str,
    grpc_status: u32,
    status_source: &'a str,
    http_status: u32,
    duration_ms: u64,
    req_msgs: u64,
    req_bytes: u64,
    resp_msgs: u64,
    resp_bytes: u64,
    request_id: Option<&'a str>,
}

impl CallRecord {
    /// The JSON object logged for this call.
    pub fn to_json(&self) -> String {
        let line = Line {
            direction: match self.direction {
                Direction::Inbound => "inbound",
                Direction::Outbound => "outbound",
            },
            service: &self.service,
            method: &self.method,
            grpc_type: self.grpc_type,
            grpc_code: self.status.go_name(),
            grpc_status: self.status.code(),
            status_source: self.status_source.as_str(),
            http_status: self.http_status,
            duration_ms: self.duration_ms,
            req_msgs: self.req_msgs,
            req_bytes: self.req_bytes,
            resp_msgs: self.resp_msgs,
            resp_bytes: self.resp_bytes,
            request_id: self.request_id.as_deref(),
        };
        // Serializing plain strings and integers cannot fail; an empty object
        // keeps the no-panic rule if it ever did.
        serde_json::to_string(&line).unwrap_or_else(|_| "{}".to_owned())
    }
}

/// Cuts a header-derived value to [`MAX_HEADER_VALUE_LEN`] bytes on a character
/// boundary.
pub fn cap(value: &str) -> String {
    let mut end = value.len().min(MAX_HEADER_VALUE_LEN);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    value.get(..end).unwrap_or_default().to_owned()
}

/// Decides which OK calls are logged: exactly `rate` of them, spread evenly and
/// deterministically (no random source needed inside the VM, and tests can
/// predict it). Non-OK calls bypass the sampler.
#[derive(Clone, Debug)]
pub struct Sampler {
    rate: f64,
    credit: f64,
}

impl Sampler {
    pub fn new(rate: f64) -> Sampler {
        Sampler { rate, credit: 0.0 }
    }

    pub fn sample(&mut self) -> bool {
        self.credit += self.rate;
        if self.credit >= 1.0 - 1e-9 {
            self.credit -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record() -> CallRecord {
        CallRecord {
            direction: Direction::Inbound,
            service: "grpcguard.demo.v1.Demo".into(),
            method: "Echo".into(),
            grpc_type: "unary",
            status: GrpcStatus::Unavailable,
            status_source: StatusSource::Headers,
            http_status: 200,
            duration_ms: 12,
            req_msgs: 1,
            req_bytes: 7,
            resp_msgs: 0,
            resp_bytes: 0,
            request_id: Some("abc".into()),
        }
    }

    #[test]
    fn log_line_is_one_json_object_with_the_documented_fields() {
        let v: serde_json::Value = serde_json::from_str(&record().to_json()).unwrap();
        assert_eq!(v["service"], "grpcguard.demo.v1.Demo");
        assert_eq!(v["method"], "Echo");
        assert_eq!(v["grpc_code"], "Unavailable");
        assert_eq!(v["grpc_status"], 14);
        assert_eq!(v["status_source"], "headers");
        assert_eq!(v["http_status"], 200);
        assert_eq!(v["duration_ms"], 12);
        assert_eq!(v["req_bytes"], 7);
        assert_eq!(v["request_id"], "abc");
        assert_eq!(v["direction"], "inbound");
    }

    #[test]
    fn hostile_header_values_stay_on_one_line_and_short() {
        let mut r = record();
        r.request_id = Some(cap(&format!("x\n{{\"grpc_code\":\"OK\"}}\u{2028}{}", "é".repeat(500))));
        let line = r.to_json();
        assert!(!line.contains('\n'));
        assert!(line.len() < 1024, "{}", line.len());
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["grpc_code"], "Unavailable");
    }

    #[test]
    fn sampler_logs_the_configured_fraction() {
        for (rate, expected) in [(1.0, 100), (0.0, 0), (0.25, 25), (0.1, 10)] {
            let mut s = Sampler::new(rate);
            assert_eq!((0..100).filter(|_| s.sample()).count(), expected, "rate {rate}");
        }
    }

    proptest! {
        #[test]
        fn cap_never_splits_a_character(s in ".{0,200}") {
            let c = cap(&s);
            prop_assert!(c.len() <= MAX_HEADER_VALUE_LEN);
            prop_assert!(s.starts_with(&c));
        }
    }
}
