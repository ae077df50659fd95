//! The gRPC status of a call: the code table and where the final status of a
//! call comes from.
//!
//! The codes and the HTTP-to-gRPC mapping come from gRPC's
//! `doc/statuscodes.md` and `doc/http-grpc-status-mapping.md`. Metric labels use
//! the names go-grpc-prometheus prints (`codes.Code.String()` in grpc-go:
//! `Canceled`, not `CANCELLED`), so existing dashboards keep working.

/// A gRPC status code (0–16).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GrpcStatus {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

impl GrpcStatus {
    /// Every code, in numeric order: `ALL[n].code() == n`.
    pub const ALL: [GrpcStatus; 17] = [
        GrpcStatus::Ok,
        GrpcStatus::Cancelled,
        GrpcStatus::Unknown,
        GrpcStatus::InvalidArgument,
        GrpcStatus::DeadlineExceeded,
        GrpcStatus::NotFound,
        GrpcStatus::AlreadyExists,
        GrpcStatus::PermissionDenied,
        GrpcStatus::ResourceExhausted,
        GrpcStatus::FailedPrecondition,
        GrpcStatus::Aborted,
        GrpcStatus::OutOfRange,
        GrpcStatus::Unimplemented,
        GrpcStatus::Internal,
        GrpcStatus::Unavailable,
        GrpcStatus::DataLoss,
        GrpcStatus::Unauthenticated,
    ];

    pub fn code(self) -> u32 {
        self as u32
    }

    pub fn from_code(code: u32) -> Option<GrpcStatus> {
        usize::try_from(code).ok().and_then(|i| GrpcStatus::ALL.get(i).copied())
    }

    /// Parses a `grpc-status` header or trailer value. The spec makes it a
    /// decimal integer; a number outside 0–16, negative ones included, is
    /// treated as UNKNOWN, as gRPC clients do (grpc-java and tonic report
    /// `-1` as UNKNOWN). Anything that is not a number is `None`: the status
    /// is missing.
    pub fn from_header(value: &[u8]) -> Option<GrpcStatus> {
        let (negative, digits) = match value.strip_prefix(b"-") {
            Some(rest) => (true, rest),
            None => (false, value),
        };
        if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        if negative {
            return Some(GrpcStatus::Unknown);
        }
        let code = digits.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        Some(u32::try_from(code).ok().and_then(GrpcStatus::from_code).unwrap_or(GrpcStatus::Unknown))
    }

    /// The status a gRPC client reports for an HTTP response that carries no
    /// `grpc-status` (gRPC `http-grpc-status-mapping.md`).
    pub fn from_http_status(http_status: u32) -> GrpcStatus {
        match http_status {
            400 => GrpcStatus::Internal,
            401 => GrpcStatus::Unauthenticated,
            403 => GrpcStatus::PermissionDenied,
            404 => GrpcStatus::Unimplemented,
            429 | 502 | 503 | 504 => GrpcStatus::Unavailable,
            _ => GrpcStatus::Unknown,
        }
    }

    /// The label value go-grpc-prometheus uses (`grpc_code="Unavailable"`).
    pub fn go_name(self) -> &'static str {
        match self {
            GrpcStatus::Ok => "OK",
            GrpcStatus::Cancelled => "Canceled",
            GrpcStatus::Unknown => "Unknown",
            GrpcStatus::InvalidArgument => "InvalidArgument",
            GrpcStatus::DeadlineExceeded => "DeadlineExceeded",
            GrpcStatus::NotFound => "NotFound",
            GrpcStatus::AlreadyExists => "AlreadyExists",
            GrpcStatus::PermissionDenied => "PermissionDenied",
            GrpcStatus::ResourceExhausted => "ResourceExhausted",
            GrpcStatus::FailedPrecondition => "FailedPrecondition",
            GrpcStatus::Aborted => "Aborted",
            GrpcStatus::OutOfRange => "OutOfRange",
            GrpcStatus::Unimplemented => "Unimplemented",
            GrpcStatus::Internal => "Internal",
            GrpcStatus::Unavailable => "Unavailable",
            GrpcStatus::DataLoss => "DataLoss",
            GrpcStatus::Unauthenticated => "Unauthenticated",
        }
    }
}

/// A `grpc-message` value as gRPC PROTOCOL-HTTP2 wants it: bytes outside
/// printable ASCII, and `%` itself, percent-encoded.
pub fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for &b in message.as_bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            out.push('%');
            out.push(char::from(*HEX.get(usize::from(b >> 4)).unwrap_or(&b'0')));
            out.push(char::from(*HEX.get(usize::from(b & 15)).unwrap_or(&b'0')));
        }
    }
    out
}

/// Where the final status of a call was read from, in the order they are tried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusSource {
    /// `grpc-status` in the response trailers: the normal end of a call.
    Trailers,
    /// `grpc-status` in the response headers: a trailers-only response
    /// (every error the server or Envoy answers without a message).
    Headers,
    /// No `grpc-status`; the HTTP status mapped per gRPC's table.
    Http,
    /// HTTP 200 ended without any `grpc-status`: INTERNAL, as a client sees it.
    Missing,
    /// The stream was reset or the upstream never answered.
    Reset,
}

impl StatusSource {
    pub fn as_str(self) -> &'static str {
        match self {
            StatusSource::Trailers => "trailers",
            StatusSource::Headers => "headers",
            StatusSource::Http => "http",
            StatusSource::Missing => "missing",
            StatusSource::Reset => "reset",
        }
    }
}

/// Who ended a stream that got no final status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetSide {
    /// The client went away (cancel, deadline on the client, connection closed):
    /// the client sees CANCELLED.
    Downstream,
    /// The upstream reset, refused the connection or never answered: UNAVAILABLE.
    Upstream,
}

impl ResetSide {
    /// Classifies Envoy's `response.code_details` for a stream that ended
    /// without a final status. Upstream failures carry `upstream` in their
    /// details (`upstream_reset_before_response_started{…}`,
    /// `upstream_reset_after_response_started{…}`, `no_healthy_upstream`).
    /// A client that resets its stream shows up as the downstream codec's
    /// details (observed on Envoy 1.40: `http2.remote_reset`, flag `DR`) or as
    /// `downstream_*`. Anything else counts against the upstream, the side a
    /// client would retry.
    pub fn from_code_details(details: &str) -> ResetSide {
        const DOWNSTREAM: [&str; 5] = ["downstream", "http1.", "http2.", "http3.", "codec"];
        if details.contains("upstream") {
            ResetSide::Upstream
        } else if DOWNSTREAM.iter().any(|prefix| details.starts_with(prefix)) {
            ResetSide::Downstream
        } else {
            ResetSide::Upstream
        }
    }
}

/// What the filter saw of the response, enough to decide the final status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResponseSeen {
    /// `:status` of the response headers, if any arrived.
    pub http_status: Option<u32>,
    /// `grpc-status` in the response headers (trailers-only response).
    pub header_status: Option<GrpcStatus>,
    /// `grpc-status` in the trailers.
    pub trailer_status: Option<GrpcStatus>,
    /// The response reached end of stream (headers, body or trailers with
    /// end_of_stream): the upstream finished rather than being cut off.
    pub complete: bool,
}

impl ResponseSeen {
    /// The status the client saw, and where it came from. `reset` says who
    /// ended a stream that did not complete; it is asked for only then.
    pub fn final_status(&self, reset: impl FnOnce() -> ResetSide) -> (GrpcStatus, StatusSource) {
        if let Some(status) = self.trailer_status {
            return (status, StatusSource::Trailers);
        }
        if let Some(status) = self.header_status {
            return (status, StatusSource::Headers);
        }
        match self.http_status {
            Some(http) if http != 200 => (GrpcStatus::from_http_status(http), StatusSource::Http),
            Some(_) if self.complete => (GrpcStatus::Internal, StatusSource::Missing),
            _ => match reset() {
                ResetSide::Downstream => (GrpcStatus::Cancelled, StatusSource::Reset),
                ResetSide::Upstream => (GrpcStatus::Unavailable, StatusSource::Reset),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn grpc_messages_are_percent_encoded_as_the_spec_says() {
        assert_eq!(percent_encode("plain text: ok"), "plain text: ok");
        assert_eq!(percent_encode("100% sure\nnext"), "100%25 sure%0Anext");
        assert_eq!(percent_encode("café"), "caf%C3%A9");
    }

    #[test]
    fn codes_round_trip_through_their_number() {
        for (n, status) in GrpcStatus::ALL.iter().enumerate() {
            assert_eq!(status.code() as usize, n);
            assert_eq!(GrpcStatus::from_code(n as u32), Some(*status));
        }
        assert_eq!(GrpcStatus::from_code(17), None);
    }

    #[test]
    fn go_names_match_go_grpc_prometheus_labels() {
        assert_eq!(GrpcStatus::Ok.go_name(), "OK");
        assert_eq!(GrpcStatus::Cancelled.go_name(), "Canceled");
        assert_eq!(GrpcStatus::DeadlineExceeded.go_name(), "DeadlineExceeded");
        assert_eq!(GrpcStatus::Unavailable.go_name(), "Unavailable");
    }

    #[test]
    fn grpc_status_header_parses_decimal_and_folds_unknown_numbers() {
        assert_eq!(GrpcStatus::from_header(b"0"), Some(GrpcStatus::Ok));
        assert_eq!(GrpcStatus::from_header(b"14"), Some(GrpcStatus::Unavailable));
        assert_eq!(GrpcStatus::from_header(b"99"), Some(GrpcStatus::Unknown));
        assert_eq!(GrpcStatus::from_header(b"9999999999"), Some(GrpcStatus::Unknown));
        assert_eq!(GrpcStatus::from_header(b""), None);
        assert_eq!(GrpcStatus::from_header(b" 1"), None);
        assert_eq!(GrpcStatus::from_header(b"-1"), Some(GrpcStatus::Unknown));
        assert_eq!(GrpcStatus::from_header(b"-"), None);
        assert_eq!(GrpcStatus::from_header(b"--1"), None);
    }

    #[test]
    fn http_status_maps_per_grpc_table() {
        let others = [(500, GrpcStatus::Unknown), (302, GrpcStatus::Unknown)];
        for (http, grpc) in crate::fuzzing::status::HTTP_TO_GRPC.into_iter().chain(others) {
            assert_eq!(GrpcStatus::from_http_status(http), grpc, "HTTP {http}");
        }
    }

    fn never_reset() -> ResetSide {
        panic!("a call with a status must not ask who reset it")
    }

    #[test]
    fn trailers_win_over_headers_and_http_status() {
        let seen = ResponseSeen {
            http_status: Some(503),
            header_status: Some(GrpcStatus::Ok),
            trailer_status: Some(GrpcStatus::NotFound),
            complete: true,
        };
        assert_eq!(seen.final_status(never_reset), (GrpcStatus::NotFound, StatusSource::Trailers));
    }

    #[test]
    fn trailers_only_response_takes_the_header_status() {
        let seen = ResponseSeen {
            http_status: Some(200),
            header_status: Some(GrpcStatus::Unavailable),
            trailer_status: None,
            complete: true,
        };
        assert_eq!(seen.final_status(never_reset), (GrpcStatus::Unavailable, StatusSource::Headers));
    }

    #[test]
    fn http_503_without_grpc_status_is_unavailable() {
        let seen = ResponseSeen { http_status: Some(503), complete: true, ..Default::default() };
        assert_eq!(seen.final_status(never_reset), (GrpcStatus::Unavailable, StatusSource::Http));
    }

    #[test]
    fn http_200_that_ends_without_grpc_status_is_internal() {
        let seen = ResponseSeen { http_status: Some(200), complete: true, ..Default::default() };
        assert_eq!(seen.final_status(never_reset), (GrpcStatus::Internal, StatusSource::Missing));
    }

    #[test]
    fn cut_off_stream_is_cancelled_when_the_client_left_and_unavailable_otherwise() {
        let started = ResponseSeen { http_status: Some(200), ..Default::default() };
        assert_eq!(started.final_status(|| ResetSide::Downstream), (GrpcStatus::Cancelled, StatusSource::Reset));
        let nothing = ResponseSeen::default();
        assert_eq!(nothing.final_status(|| ResetSide::Upstream), (GrpcStatus::Unavailable, StatusSource::Reset));
    }

    #[test]
    fn envoy_code_details_tell_who_reset() {
        assert_eq!(ResetSide::from_code_details("downstream_remote_disconnect"), ResetSide::Downstream);
        assert_eq!(ResetSide::from_code_details("http2.remote_reset"), ResetSide::Downstream);
        assert_eq!(
            ResetSide::from_code_details("upstream_reset_after_response_started{remote_reset}"),
            ResetSide::Upstream
        );
        assert_eq!(
            ResetSide::from_code_details("upstream_reset_before_response_started{connection_failure}"),
            ResetSide::Upstream
        );
        assert_eq!(ResetSide::from_code_details(""), ResetSide::Upstream);
    }

    proptest! {
        #[test]
        fn any_grpc_status_header_value_parses_without_panic(value in proptest::collection::vec(any::<u8>(), 0..16)) {
            let _ = GrpcStatus::from_header(&value);
        }

        #[test]
        fn every_code_parses_back_from_its_decimal_form(code in 0u32..17) {
            let status = GrpcStatus::from_header(code.to_string().as_bytes());
            prop_assert_eq!(status.map(GrpcStatus::code), Some(code));
        }
    }
}
