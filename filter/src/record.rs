//! The record of one finished call and its JSON log line.
//!
//! One line per call, at info level, so `kubectl logs` of a sidecar (or Envoy's
//! own log) shows what each call did. Every string is JSON-escaped (control
//! characters and U+2028/U+2029 included), and values copied from request
//! headers are cut to [`MAX_HEADER_VALUE_LEN`] bytes, so a client cannot inject
//! lines or make one line huge.
//!
//! The line is written by hand rather than through `serde_json`'s serializer:
//! it runs on every logged call, and this writer takes about a third of the
//! wasm instructions (fuel, measured in `tests/tests/filter/fuel.rs`).

use crate::deadline::DeadlineSource;
use crate::method::Direction;
use crate::status::{GrpcStatus, StatusSource};

/// Longest header-derived value kept in a log line.
pub const MAX_HEADER_VALUE_LEN: usize = 128;

/// Everything the log line needs, borrowed from the call's state.
#[derive(Clone, Debug, PartialEq)]
pub struct CallRecord<'a> {
    pub direction: Direction,
    /// `package.Service`, or empty when the path is not a gRPC method path.
    pub service: &'a str,
    /// `Method`, or the (cut) raw path when it is not a gRPC method path.
    pub method: &'a str,
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
    pub request_id: Option<&'a str>,
    /// The trace the call belongs to ([`trace_id`]), so a line can be joined
    /// to its trace.
    pub trace_id: Option<&'a str>,
    /// Attempts of this call the client made before this one
    /// (`grpc-previous-rpc-attempts`); 0 for a first attempt.
    pub previous_attempts: u32,
    /// The effective deadline, milliseconds (rounded up), if the call had one.
    pub deadline_ms: Option<u64>,
    pub deadline_source: DeadlineSource,
    /// The upstream outlived the client's interest ([`crate::deadline::is_late`]).
    pub late: bool,
    /// What the idempotency key did for this call.
    pub dedup: DedupOutcome,
}

/// The log's `dedup` field.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DedupOutcome {
    /// Not a deduplicated method, or no key.
    #[default]
    None,
    First,
    Replay,
    InFlight,
    Mismatch,
    NotKept,
    /// The table was full (rejected, or forwarded undeduplicated).
    Full,
    /// The caller held its whole share of the table (rejected, or forwarded
    /// undeduplicated).
    CallerFull,
    /// The key's first call may have run: refused FAILED_PRECONDITION.
    Unknown,
    /// The call had a key but no caller identity.
    Anonymous,
    /// The key was refused.
    BadKey,
    /// A kept OK answer could not be replayed: the replay hop is missing
    /// (no route or internal listener); the client got the hop's answer.
    ReplayFailed,
    /// The etcd store did not answer: refused UNAVAILABLE, not run.
    StoreUnavailable,
    /// The etcd store did not answer and `fail_open` is set: run without
    /// deduplication.
    StoreFailedOpen,
}

impl DedupOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            DedupOutcome::None => "none",
            DedupOutcome::First => "first",
            DedupOutcome::Replay => "replay",
            DedupOutcome::InFlight => "in_flight",
            DedupOutcome::Mismatch => "mismatch",
            DedupOutcome::NotKept => "not_kept",
            DedupOutcome::Full => "full",
            DedupOutcome::CallerFull => "caller_full",
            DedupOutcome::Unknown => "unknown",
            DedupOutcome::Anonymous => "anonymous",
            DedupOutcome::BadKey => "bad_key",
            DedupOutcome::ReplayFailed => "replay_failed",
            DedupOutcome::StoreUnavailable => "store_unavailable",
            DedupOutcome::StoreFailedOpen => "store_failed_open",
        }
    }
}

impl CallRecord<'_> {
    /// The JSON object logged for this call. Keys and their punctuation are
    /// written as fixed pieces, values as they come: this runs on every
    /// logged call.
    pub fn to_json(&self) -> String {
        let mut out = Json(String::with_capacity(400));
        out.raw("{\"direction\":\"");
        out.raw(self.direction.as_str());
        out.raw("\",\"service\":");
        out.str(self.service);
        out.raw(",\"method\":");
        out.str(self.method);
        out.raw(",\"grpc_type\":\"");
        out.raw(self.grpc_type);
        out.raw("\",\"grpc_code\":\"");
        out.raw(self.status.go_name());
        out.raw("\",\"grpc_status\":");
        out.num(u64::from(self.status.code()));
        out.raw(",\"status_source\":\"");
        out.raw(self.status_source.as_str());
        out.raw("\",\"http_status\":");
        out.num(u64::from(self.http_status));
        out.raw(",\"duration_ms\":");
        out.num(self.duration_ms);
        out.raw(",\"req_msgs\":");
        out.num(self.req_msgs);
        out.raw(",\"req_bytes\":");
        out.num(self.req_bytes);
        out.raw(",\"resp_msgs\":");
        out.num(self.resp_msgs);
        out.raw(",\"resp_bytes\":");
        out.num(self.resp_bytes);
        out.raw(",\"request_id\":");
        match self.request_id {
            Some(id) => out.str(id),
            None => out.raw("null"),
        }
        out.raw(",\"trace_id\":");
        match self.trace_id {
            Some(id) => out.str(id),
            None => out.raw("null"),
        }
        out.raw(",\"previous_attempts\":");
        out.num(u64::from(self.previous_attempts));
        out.raw(",\"deadline_ms\":");
        match self.deadline_ms {
            Some(ms) => out.num(ms),
            None => out.raw("null"),
        }
        out.raw(",\"deadline_source\":\"");
        out.raw(self.deadline_source.as_str());
        out.raw("\",\"late\":");
        out.raw(if self.late { "true" } else { "false" });
        out.raw(",\"dedup\":\"");
        out.raw(self.dedup.as_str());
        out.raw("\"}");
        out.0
    }
}

/// The trace id of a call: W3C `traceparent` (`00-<32 hex>-<16 hex>-<2
/// hex>`), else B3's `x-b3-traceid` (16 or 32 hex digits); `None` when
/// neither is well-formed (an all-zero id is invalid in both). Lowercase hex
/// only, so nothing a client sends reaches the line unchecked.
pub fn trace_id<'a>(traceparent: Option<&'a [u8]>, b3: Option<&'a [u8]>) -> Option<&'a str> {
    let lower_hex = |v: &[u8]| v.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let hex = |id: &[u8]| lower_hex(id) && id.iter().any(|b| *b != b'0');
    let w3c = traceparent.and_then(|v| {
        let mut parts = v.split(|b| *b == b'-');
        let (version, id, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        // Version ff is invalid; a later version may add fields after these.
        let ok = version.len() == 2
            && lower_hex(version)
            && version != b"ff"
            && id.len() == 32
            && hex(id)
            && span.len() == 16
            && hex(span)
            && flags.len() == 2
            && lower_hex(flags)
            && (version != b"00" || parts.next().is_none());
        ok.then_some(id)
    });
    let id = w3c.or_else(|| b3.filter(|id| matches!(id.len(), 16 | 32) && hex(id)))?;
    std::str::from_utf8(id).ok()
}

/// A JSON object under construction. `raw` pieces are fixed text that needs
/// no escaping (keys, punctuation, the filter's own word values).
struct Json(String);

impl Json {
    fn raw(&mut self, text: &str) {
        self.0.push_str(text);
    }

    fn num(&mut self, value: u64) {
        crate::push_decimal(&mut self.0, value);
    }

    /// A quoted, escaped string value.
    fn str(&mut self, value: &str) {
        self.0.push('"');
        let plain = |b: &u8| (0x20..0x7f).contains(b) && *b != b'"' && *b != b'\\';
        if value.as_bytes().iter().all(plain) {
            self.0.push_str(value);
        } else {
            for c in value.chars() {
                match c {
                    '"' => self.0.push_str("\\\""),
                    '\\' => self.0.push_str("\\\\"),
                    '\n' => self.0.push_str("\\n"),
                    '\r' => self.0.push_str("\\r"),
                    '\t' => self.0.push_str("\\t"),
                    // Other controls, DEL, and the JavaScript line separators
                    // that some log pipelines split on.
                    c if c < ' ' || c == '\u{7f}' || c == '\u{2028}' || c == '\u{2029}' => {
                        const HEX: &[u8; 16] = b"0123456789abcdef";
                        let n = c as u32;
                        self.0.push_str("\\u");
                        for shift in [12u32, 8, 4, 0] {
                            let nibble = ((n >> shift) & 0xf) as usize;
                            self.0.push(char::from(*HEX.get(nibble).unwrap_or(&b'0')));
                        }
                    }
                    c => self.0.push(c),
                }
            }
        }
        self.0.push('"');
    }
}

/// Cuts a header-derived value to [`MAX_HEADER_VALUE_LEN`] bytes on a character
/// boundary.
pub fn cap(value: &str) -> &str {
    let mut end = value.len().min(MAX_HEADER_VALUE_LEN);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    value.get(..end).unwrap_or_default()
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

    fn record() -> CallRecord<'static> {
        CallRecord {
            direction: Direction::Inbound,
            service: "grpcguard.demo.v1.Demo",
            method: "Echo",
            grpc_type: "unary",
            status: GrpcStatus::Unavailable,
            status_source: StatusSource::Headers,
            http_status: 200,
            duration_ms: 12,
            req_msgs: 1,
            req_bytes: 7,
            resp_msgs: 0,
            resp_bytes: 0,
            request_id: Some("abc"),
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736"),
            previous_attempts: 2,
            deadline_ms: Some(1500),
            deadline_source: DeadlineSource::Clamped,
            late: true,
            dedup: DedupOutcome::Replay,
        }
    }

    #[test]
    fn the_trace_id_comes_from_traceparent_else_b3_and_only_when_well_formed() {
        let tp = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id(Some(tp), None), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(trace_id(Some(tp), Some(b"463ac35c9f6413ad")), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(trace_id(None, Some(b"463ac35c9f6413ad")), Some("463ac35c9f6413ad"));
        for bad in [
            &b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"[..],
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            b"00-4bf92f3577b34da6-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736\n-00f067aa0ba902b7-01",
        ] {
            assert_eq!(trace_id(Some(bad), None), None, "{}", String::from_utf8_lossy(bad));
        }
        // A later version may carry more fields after the four.
        let v1 = b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more";
        assert_eq!(trace_id(Some(v1), None), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        for bad in [&b"0000000000000000"[..], b"463ac35c9f6413a", b"463ac35c9f6413aZ", b""] {
            assert_eq!(trace_id(None, Some(bad)), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn log_line_is_one_json_object_with_the_documented_fields() {
        let v: serde_json::Value = serde_json::from_str(&record().to_json()).unwrap();
        assert_eq!(v["service"], "grpcguard.demo.v1.Demo");
        assert_eq!(v["method"], "Echo");
        assert_eq!(v["grpc_code"], "Unavailable");
        assert_eq!(v["grpc_status"], 14);
        assert_eq!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(v["previous_attempts"], 2);
        assert_eq!(v["status_source"], "headers");
        assert_eq!(v["http_status"], 200);
        assert_eq!(v["duration_ms"], 12);
        assert_eq!(v["req_bytes"], 7);
        assert_eq!(v["request_id"], "abc");
        assert_eq!(v["direction"], "inbound");
        assert_eq!(v["deadline_ms"], 1500);
        assert_eq!(v["deadline_source"], "clamped");
        assert_eq!(v["late"], true);
        assert_eq!(v["dedup"], "replay");
    }

    #[test]
    fn hostile_header_values_stay_on_one_line_and_short() {
        let mut r = record();
        let hostile = format!("x\n{{\"grpc_code\":\"OK\"}}\u{2028}{}", "é".repeat(500));
        r.request_id = Some(cap(&hostile));
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

    #[test]
    fn numbers_are_written_in_full() {
        let mut r = record();
        r.duration_ms = 0;
        r.req_bytes = u64::MAX;
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["duration_ms"], 0);
        assert_eq!(v["req_bytes"], u64::MAX);
        r.request_id = None;
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert!(v["request_id"].is_null());
    }

    proptest! {
        #[test]
        fn any_strings_round_trip_through_the_log_line(service in ".{0,40}", method in "\\PC{0,40}", id in proptest::collection::vec(any::<char>(), 0..40), n in any::<u64>()) {
            let mut r = record();
            r.service = &service;
            r.method = &method;
            let id: String = id.into_iter().collect();
            r.request_id = Some(&id);
            r.resp_bytes = n;
            let line = r.to_json();
            let one_line = !line.contains('\n') && !line.contains('\u{2028}');
            prop_assert!(one_line, "line breaks must be escaped: {}", line);
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            prop_assert_eq!(v["service"].as_str(), Some(service.as_str()));
            prop_assert_eq!(v["method"].as_str(), Some(method.as_str()));
            prop_assert_eq!(v["request_id"].as_str(), Some(id.as_str()));
            prop_assert_eq!(v["resp_bytes"].as_u64(), Some(n));
        }

        #[test]
        fn cap_never_splits_a_character(s in ".{0,200}") {
            let c = cap(&s);
            prop_assert!(c.len() <= MAX_HEADER_VALUE_LEN);
            prop_assert!(s.starts_with(c));
        }
    }
}
