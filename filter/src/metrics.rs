//! Stat names for the metrics, in the shape that Envoy's `stats_tags` turn into
//! Prometheus labels.
//!
//! Envoy stores a wasm metric `NAME` as the stat `wasmcustom.NAME` and prints it
//! in `/stats/prometheus` without the namespace. Labels are carried inside the
//! name in the encoding of Istio's own stats (`istio_requests_total.reporter=.=destination;.;`):
//! after the metric name and a dot, one `label=.=value;.;` segment per label.
//! Istio turns each `extraStatTags` entry `label` into the stats tag regex
//! `(label=\.=(.*?);\.;)` (its sidecar bootstrap template,
//! `tools/packaging/common/envoy_bootstrap.json`), and `envoy/envoy.yaml`
//! carries exactly those regexes. Envoy cuts the first capture group (the
//! whole segment) out of the name, keeps the second as the label value, and
//! drops the dot the cuts leave at the end (seen on Envoy 1.40), so what is
//! left is the go-grpc-prometheus metric name:
//!
//! `grpc_server_handled_total.grpc_service=.=pkg.Svc;.;grpc_method=.=Get;.;grpc_type=.=unary;.;grpc_code=.=OK;.;exporter=.=grpc-guard;.;`
//! → `grpc_server_handled_total{grpc_service="pkg.Svc",grpc_method="Get",grpc_type="unary",grpc_code="OK",exporter="grpc-guard"}`
//!
//! The metric name comes first because Istio's `statsHistogramBuckets`
//! annotation picks a histogram's buckets by a prefix of the stat name
//! (`wasmcustom.grpc_server_handling_milliseconds`); with the labels first the
//! prefix would never match. Label values never contain `;` or `=`: method
//! names are validated ([`crate::method::MethodPath`]) and the rest are fixed
//! words.

use crate::method::Direction;
use crate::status::GrpcStatus;

/// Labels every per-method metric carries, `grpc_code` only where there is a
/// status, in the order of the stats tags (and so of the exposition).
pub const LABELS: [&str; 5] = ["grpc_service", "grpc_method", "grpc_type", "grpc_code", "exporter"];

/// The value of the `exporter` label on every per-method series. Under
/// Istio's metrics merging, one scrape carries the sidecar's Envoy stats and
/// then the application's own: an application instrumented with
/// go-grpc-prometheus writes the same names and labels, and Prometheus would
/// drop one side's samples as duplicates. The label keeps them apart
/// (`{exporter="grpc-guard"}` against `{exporter=""}`), and a
/// `sum by (grpc_service, grpc_method)` aggregates it away.
pub const EXPORTER: &str = "grpc-guard";

/// Between a label and its value, and after the value: Istio's separators
/// (the `=\.=` and `;\.;` of its extraStatTags regex).
const VALUE_SEPARATOR: &str = "=.=";
const LABEL_END: &str = ";.;";

/// The per-method metrics, one family each; `family as usize` indexes `ALL`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// Counter: calls started.
    Started,
    /// Counter with `grpc_code`: calls finished.
    Handled,
    /// Counter: messages from the client.
    MsgFromClient,
    /// Counter: messages to the client.
    MsgToClient,
    /// Histogram (ms): from request headers to end of the call.
    HandlingMs,
    /// Histogram (bytes): size of each request message.
    RequestBytes,
    /// Histogram (bytes): size of each response message.
    ResponseBytes,
    /// Counter: calls that came without `grpc-timeout` and got the default.
    DeadlineInjected,
    /// Counter: calls whose `grpc-timeout` was above the maximum and was cut.
    DeadlineClamped,
    /// Counter with `grpc_code`: calls answered by the proxy for their
    /// `grpc-timeout` (InvalidArgument: malformed; DeadlineExceeded: zero).
    DeadlineRejected,
    /// Counter: request messages over the size limit, answered
    /// ResourceExhausted before the upstream saw them.
    RequestTooLarge,
    /// Counter: calls whose upstream outlived the client's interest: it
    /// answered after the deadline, or had not answered when Envoy ended the
    /// call at its deadline or the client left. The silent failures.
    LateResponses,
    /// Counter: keyed calls that ran upstream as the first of their key.
    DedupFirst,
    /// Counter: retries answered from the table, without reaching the upstream.
    DedupReplayed,
    /// Counter: retries refused ABORTED while the first call was running.
    DedupInFlight,
    /// Counter: keys reused with a different request (INVALID_ARGUMENT).
    DedupMismatch,
    /// Counter: retries of a call whose answer was too large to keep
    /// (ALREADY_EXISTS).
    DedupNotKept,
    /// Counter: expired entries of other keys overwritten to make room.
    DedupEvicted,
    /// Counter: keyed calls that found every probed slot taken.
    DedupFull,
    /// Counter: idempotency keys refused (missing where required, empty,
    /// too long, not printable).
    DedupKeyRejected,
    /// Counter: retries of a key whose first call may have run (ended by a
    /// deadline, a cancel or a reset), answered FAILED_PRECONDITION.
    DedupUnknown,
    /// Counter: keyed calls without any caller identity.
    DedupAnonymous,
    /// Counter: keyed calls whose caller held its whole share of the table.
    DedupCallerFull,
    /// Counter: calls that are a client's retry or hedge
    /// (`grpc-previous-rpc-attempts` above 0).
    Retried,
    /// Counter: calls grpc-guard answered itself with a server-side code
    /// for what the client did: a content type that is not gRPC or a body
    /// that is not gRPC frames (Internal), a message over the limit
    /// (ResourceExhausted), a retry while its first call runs (Aborted). The
    /// error-ratio alert subtracts them: they are no server failing.
    Refused,
}

impl Family {
    pub const ALL: [Family; 25] = [
        Family::Started,
        Family::Handled,
        Family::MsgFromClient,
        Family::MsgToClient,
        Family::HandlingMs,
        Family::RequestBytes,
        Family::ResponseBytes,
        Family::DeadlineInjected,
        Family::DeadlineClamped,
        Family::DeadlineRejected,
        Family::RequestTooLarge,
        Family::LateResponses,
        Family::DedupFirst,
        Family::DedupReplayed,
        Family::DedupInFlight,
        Family::DedupMismatch,
        Family::DedupNotKept,
        Family::DedupEvicted,
        Family::DedupFull,
        Family::DedupKeyRejected,
        Family::DedupUnknown,
        Family::DedupAnonymous,
        Family::DedupCallerFull,
        Family::Retried,
        Family::Refused,
    ];

    /// The families labelled with `grpc_code`, and their index among them.
    pub fn coded_index(self) -> Option<usize> {
        match self {
            Family::Handled => Some(0),
            Family::DeadlineRejected => Some(1),
            _ => None,
        }
    }

    pub fn is_histogram(self) -> bool {
        matches!(self, Family::HandlingMs | Family::RequestBytes | Family::ResponseBytes)
    }

    /// The Prometheus name. go-grpc-prometheus counts from the process's side:
    /// a server receives the client's messages, a client sends them.
    pub fn name(self, direction: Direction) -> &'static str {
        use Direction::{Inbound, Outbound};
        match (self, direction) {
            (Family::Started, Inbound) => "grpc_server_started_total",
            (Family::Started, Outbound) => "grpc_client_started_total",
            (Family::Handled, Inbound) => "grpc_server_handled_total",
            (Family::Handled, Outbound) => "grpc_client_handled_total",
            (Family::MsgFromClient, Inbound) => "grpc_server_msg_received_total",
            (Family::MsgFromClient, Outbound) => "grpc_client_msg_sent_total",
            (Family::MsgToClient, Inbound) => "grpc_server_msg_sent_total",
            (Family::MsgToClient, Outbound) => "grpc_client_msg_received_total",
            (Family::HandlingMs, Inbound) => "grpc_server_handling_milliseconds",
            (Family::HandlingMs, Outbound) => "grpc_client_handling_milliseconds",
            (Family::RequestBytes, Inbound) => "grpc_server_request_bytes",
            (Family::RequestBytes, Outbound) => "grpc_client_request_bytes",
            (Family::ResponseBytes, Inbound) => "grpc_server_response_bytes",
            (Family::ResponseBytes, Outbound) => "grpc_client_response_bytes",
            (Family::DeadlineInjected, Inbound) => "grpc_server_deadline_injected_total",
            (Family::DeadlineInjected, Outbound) => "grpc_client_deadline_injected_total",
            (Family::DeadlineClamped, Inbound) => "grpc_server_deadline_clamped_total",
            (Family::DeadlineClamped, Outbound) => "grpc_client_deadline_clamped_total",
            (Family::DeadlineRejected, Inbound) => "grpc_server_deadline_rejected_total",
            (Family::DeadlineRejected, Outbound) => "grpc_client_deadline_rejected_total",
            (Family::RequestTooLarge, Inbound) => "grpc_server_request_too_large_total",
            (Family::RequestTooLarge, Outbound) => "grpc_client_request_too_large_total",
            (Family::LateResponses, Inbound) => "grpc_server_late_responses_total",
            (Family::LateResponses, Outbound) => "grpc_client_late_responses_total",
            (Family::DedupFirst, Inbound) => "grpc_server_dedup_first_total",
            (Family::DedupFirst, Outbound) => "grpc_client_dedup_first_total",
            (Family::DedupReplayed, Inbound) => "grpc_server_dedup_replayed_total",
            (Family::DedupReplayed, Outbound) => "grpc_client_dedup_replayed_total",
            (Family::DedupInFlight, Inbound) => "grpc_server_dedup_in_flight_total",
            (Family::DedupInFlight, Outbound) => "grpc_client_dedup_in_flight_total",
            (Family::DedupMismatch, Inbound) => "grpc_server_dedup_mismatch_total",
            (Family::DedupMismatch, Outbound) => "grpc_client_dedup_mismatch_total",
            (Family::DedupNotKept, Inbound) => "grpc_server_dedup_not_kept_total",
            (Family::DedupNotKept, Outbound) => "grpc_client_dedup_not_kept_total",
            (Family::DedupEvicted, Inbound) => "grpc_server_dedup_evicted_total",
            (Family::DedupEvicted, Outbound) => "grpc_client_dedup_evicted_total",
            (Family::DedupFull, Inbound) => "grpc_server_dedup_full_total",
            (Family::DedupFull, Outbound) => "grpc_client_dedup_full_total",
            (Family::DedupKeyRejected, Inbound) => "grpc_server_dedup_key_rejected_total",
            (Family::DedupKeyRejected, Outbound) => "grpc_client_dedup_key_rejected_total",
            (Family::DedupUnknown, Inbound) => "grpc_server_dedup_unknown_total",
            (Family::DedupUnknown, Outbound) => "grpc_client_dedup_unknown_total",
            (Family::DedupAnonymous, Inbound) => "grpc_server_dedup_anonymous_total",
            (Family::DedupAnonymous, Outbound) => "grpc_client_dedup_anonymous_total",
            (Family::DedupCallerFull, Inbound) => "grpc_server_dedup_caller_full_total",
            (Family::DedupCallerFull, Outbound) => "grpc_client_dedup_caller_full_total",
            (Family::Retried, Inbound) => "grpc_server_retried_total",
            (Family::Retried, Outbound) => "grpc_client_retried_total",
            (Family::Refused, Inbound) => "grpc_server_refused_total",
            (Family::Refused, Outbound) => "grpc_client_refused_total",
        }
    }
}

/// The label values of one method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MethodLabels<'a> {
    pub service: &'a str,
    pub method: &'a str,
    pub grpc_type: &'a str,
}

/// The stat name for `family` of a method; `code` only for [`Family::Handled`].
pub fn stat_name(direction: Direction, family: Family, labels: MethodLabels<'_>, code: Option<GrpcStatus>) -> String {
    let mut name = String::with_capacity(128);
    name.push_str(family.name(direction));
    name.push('.');
    let values = [
        Some(labels.service),
        Some(labels.method),
        Some(labels.grpc_type),
        code.map(GrpcStatus::go_name),
        Some(EXPORTER),
    ];
    for (label, value) in LABELS.iter().zip(values) {
        if let Some(value) = value {
            name.push_str(label);
            name.push_str(VALUE_SEPARATOR);
            name.push_str(value);
            name.push_str(LABEL_END);
        }
    }
    name
}

/// Guard counters without labels.
pub mod guard {
    /// Configurations the plugin refused (it logs the field and does not start).
    pub const CONFIG_REJECTED: &str = "grpc_guard_config_rejected_total";
    /// Request bodies that were not gRPC frames (answered INTERNAL).
    pub const BAD_FRAMES: &str = "grpc_guard_bad_frames_total";
    /// Requests on a gRPC method path with a content type that is not gRPC
    /// (answered HTTP 415).
    pub const NON_GRPC_REFUSED: &str = "grpc_guard_non_grpc_refused_total";
    /// First calls whose outcome could not be written to the dedup table
    /// (other workers kept its bucket busy): the key stays claimed, then
    /// counts as "may have run", until it expires.
    pub const DEDUP_SETTLE_LOST: &str = "grpc_guard_dedup_settle_lost_total";
    /// Requests to the etcd store that failed (no answer in time, etcd or
    /// its cluster down, an error from etcd): claims, retried claims, lease
    /// grants, and completion writes Envoy could not send.
    pub const DEDUP_STORE_ERRORS: &str = "grpc_guard_dedup_store_errors_total";
    /// Keyed calls run without deduplication because the etcd store failed
    /// and `dedup.etcd.fail_open` is set.
    pub const DEDUP_FAILED_OPEN: &str = "grpc_guard_dedup_failed_open_total";
}

#[cfg(test)]
mod tests {
    use super::*;

    const LABELS_ECHO: MethodLabels<'static> =
        MethodLabels { service: "grpcguard.demo.v1.Demo", method: "Echo", grpc_type: "unary" };

    #[test]
    fn handled_stat_name_carries_every_label_in_istio_s_encoding() {
        assert_eq!(
            stat_name(Direction::Inbound, Family::Handled, LABELS_ECHO, Some(GrpcStatus::Unavailable)),
            "grpc_server_handled_total.grpc_service=.=grpcguard.demo.v1.Demo;.;grpc_method=.=Echo;.;grpc_type=.=unary;.;grpc_code=.=Unavailable;.;exporter=.=grpc-guard;.;"
        );
    }

    /// What Envoy does with Istio's regex `(label=\.=(.*?);\.;)`: the first
    /// `label=.=`, the value up to the next `;.;`, the segment cut out.
    fn extract(name: &mut String, label: &str) -> Option<String> {
        let start = name.find(&format!("{label}{VALUE_SEPARATOR}"))?;
        let value_start = start + label.len() + VALUE_SEPARATOR.len();
        let value_len = name[value_start..].find(LABEL_END)?;
        let value = name[value_start..value_start + value_len].to_owned();
        name.replace_range(start..value_start + value_len + LABEL_END.len(), "");
        Some(value)
    }

    #[test]
    fn istio_s_extra_stat_tag_regexes_leave_the_metric_name_and_the_label_values() {
        let histogram = Family::HandlingMs.name(Direction::Inbound);
        let mut name = stat_name(Direction::Inbound, Family::HandlingMs, LABELS_ECHO, None);
        // statsHistogramBuckets matches a prefix of the stat name.
        assert!(name.starts_with(histogram), "{name}");
        let values: Vec<Option<String>> = LABELS.iter().map(|label| extract(&mut name, label)).collect();
        assert_eq!(
            values,
            [
                Some("grpcguard.demo.v1.Demo".to_owned()),
                Some("Echo".to_owned()),
                Some("unary".to_owned()),
                None,
                Some("grpc-guard".to_owned())
            ]
        );
        assert_eq!(name, format!("{histogram}."), "Envoy drops the trailing dot");
    }

    #[test]
    fn outbound_uses_client_names_and_swaps_message_direction() {
        assert_eq!(Family::MsgFromClient.name(Direction::Outbound), "grpc_client_msg_sent_total");
        assert_eq!(Family::MsgToClient.name(Direction::Outbound), "grpc_client_msg_received_total");
        assert_eq!(
            stat_name(Direction::Outbound, Family::Started, LABELS_ECHO, None),
            "grpc_client_started_total.grpc_service=.=grpcguard.demo.v1.Demo;.;grpc_method=.=Echo;.;grpc_type=.=unary;.;exporter=.=grpc-guard;.;"
        );
    }

    #[test]
    fn family_discriminant_indexes_all() {
        for (i, family) in Family::ALL.iter().enumerate() {
            assert_eq!(*family as usize, i);
        }
    }

    #[test]
    fn every_family_has_distinct_names_per_direction() {
        let mut names: Vec<&str> =
            Family::ALL.iter().flat_map(|f| [f.name(Direction::Inbound), f.name(Direction::Outbound)]).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Family::ALL.len() * 2);
    }
}
