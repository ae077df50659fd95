//! What Envoy answers the client when a filter calls
//! `proxy_send_local_response` (Envoy `Http::Utility::sendLocalReply`).

use super::abi::Pairs;
use super::stream::{add, first_value, replace};

/// A reply the filter sent instead of letting the stream reach the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    /// The HTTP status the filter asked for (a gRPC reply still goes out as
    /// `:status: 200`, see [`LocalReply::response_headers`]).
    pub http_status: u32,
    /// The response code details, with whitespace replaced by `_` as Envoy
    /// does before recording them.
    pub details: String,
    pub body: Vec<u8>,
    /// The extra headers the filter passed, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// `None` when the filter passed a value outside 0..=16 (the SDK's `-1`).
    pub grpc_status: Option<i32>,
}

impl LocalReply {
    pub(crate) fn new(http_status: u32, details: &[u8], body: &[u8], headers: &Pairs, grpc_status: i32) -> LocalReply {
        let details =
            String::from_utf8_lossy(details).chars().map(|c| if c.is_whitespace() { '_' } else { c }).collect();
        LocalReply {
            http_status,
            details,
            body: body.to_vec(),
            headers: headers
                .iter()
                .map(|(name, value)| {
                    (String::from_utf8_lossy(name).to_ascii_lowercase(), String::from_utf8_lossy(value).into_owned())
                })
                .collect(),
            grpc_status: (0..=16).contains(&grpc_status).then_some(grpc_status),
        }
    }

    /// The response Envoy sends (`Http::Utility::encodeLocalReply`): the
    /// filter's headers go in first; for a gRPC request (`grpc_request`, as
    /// the request arrived, see [`is_grpc`]) Envoy then forces
    /// `:status: 200` and `content-type: application/grpc`, adds `grpc-status`
    /// only when the filter set none (from the call's gRPC status, else mapped
    /// from the HTTP status), and carries the body in `grpc-message`: a
    /// trailers-only response with no body. Otherwise the HTTP status with the
    /// body as `text/plain`.
    pub(crate) fn response(&self, grpc: bool) -> (Pairs, Vec<u8>) {
        let mut headers = Pairs::new();
        let status = if grpc { "200".to_owned() } else { self.http_status.to_string() };
        add(&mut headers, b":status", status.as_bytes());
        for (name, value) in &self.headers {
            add(&mut headers, name.as_bytes(), value.as_bytes());
        }
        if grpc {
            replace(&mut headers, b"content-type", b"application/grpc");
            if first_value(&headers, b"grpc-status").is_none() {
                let grpc_status = self.grpc_status.unwrap_or_else(|| grpc_status_for_http(self.http_status));
                add(&mut headers, b"grpc-status", grpc_status.to_string().as_bytes());
            }
            if !self.body.is_empty() {
                replace(&mut headers, b"grpc-message", &percent_encode(&self.body));
            }
            (headers, Vec::new())
        } else {
            if !self.body.is_empty() {
                add(&mut headers, b"content-length", self.body.len().to_string().as_bytes());
                add(&mut headers, b"content-type", b"text/plain");
            }
            (headers, self.body.clone())
        }
    }
}

/// Envoy `Grpc::Common::hasGrpcContentType`, applied once to the request
/// headers as they arrive: `FilterManager::requestHeadersInitialized` sets
/// `is_grpc_request_` before any filter runs, so a filter rewriting the
/// request's `content-type` does not change how a local reply is encoded.
pub(crate) fn is_grpc(request_headers: &Pairs) -> bool {
    first_value(request_headers, b"content-type").is_some_and(|value| {
        value == b"application/grpc"
            || value.starts_with(b"application/grpc+")
            || value.starts_with(b"application/grpc;")
    })
}

/// Envoy `Grpc::Utility::httpToGrpcStatus`, after gRPC's
/// doc/http-grpc-status-mapping.md.
fn grpc_status_for_http(http_status: u32) -> i32 {
    match http_status {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

/// gRPC PROTOCOL-HTTP2: `grpc-message` is percent-encoded outside
/// printable ASCII, and `%` itself.
fn percent_encode(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len());
    for byte in message {
        if (0x20..=0x7e).contains(byte) && *byte != b'%' {
            out.push(*byte);
        } else {
            out.extend_from_slice(format!("%{byte:02X}").as_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(list: &[(&str, &str)]) -> Pairs {
        list.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec())).collect()
    }

    #[test]
    fn a_grpc_request_gets_a_trailers_only_reply() {
        let reply = LocalReply::new(200, b"denied by guard", b"no 100%", &map(&[("X-Why", "t")]), 7);
        let (headers, body) = reply.response(is_grpc(&map(&[("content-type", "application/grpc")])));
        assert_eq!(
            headers,
            map(&[
                (":status", "200"),
                ("x-why", "t"),
                ("content-type", "application/grpc"),
                ("grpc-status", "7"),
                ("grpc-message", "no 100%25"),
            ])
        );
        assert!(body.is_empty());
        assert_eq!(reply.details, "denied_by_guard");
    }

    #[test]
    fn a_grpc_status_the_filter_set_as_a_header_is_kept() {
        let reply = LocalReply::new(200, b"", b"", &map(&[("grpc-status", "13"), ("content-type", "text/x")]), -1);
        let (headers, _) = reply.response(is_grpc(&map(&[("content-type", "application/grpc")])));
        assert_eq!(headers, map(&[(":status", "200"), ("grpc-status", "13"), ("content-type", "application/grpc")]));
    }

    #[test]
    fn a_grpc_reply_without_a_grpc_status_maps_the_http_status() {
        let reply = LocalReply::new(503, b"", b"", &Pairs::new(), -1);
        assert_eq!(reply.grpc_status, None);
        let (headers, _) = reply.response(is_grpc(&map(&[("content-type", "application/grpc+proto")])));
        assert_eq!(first_value(&headers, b"grpc-status"), Some(&b"14"[..]));
    }

    #[test]
    fn a_plain_http_request_gets_the_status_and_a_text_body() {
        let reply = LocalReply::new(403, b"", b"denied", &Pairs::new(), -1);
        let (headers, body) = reply.response(is_grpc(&map(&[("content-type", "text/plain")])));
        assert_eq!(headers, map(&[(":status", "403"), ("content-length", "6"), ("content-type", "text/plain")]));
        assert_eq!(body, b"denied");
    }
}
