//! `status`: `grpc-status`, `grpc-message`, the HTTP status mapping and
//! Envoy's response code details.

use super::Input;
use crate::status::{percent_encode, GrpcStatus, ResetSide, ResponseSeen, StatusSource};

/// How much of the input is read as text: the checks go byte by byte, so a
/// longer value takes the same paths, only slower.
const TEXT_BYTES: usize = 512;

/// `status`: the input is a `grpc-status` value, a `grpc-message` (UTF-8,
/// read lossily) and Envoy's response code details (both its first
/// [`TEXT_BYTES`]); its first 4 bytes are also
/// a status code and an HTTP status, and the next 5 what a response showed.
/// Every status parses as gRPC's documents say; `percent_encode` gives
/// printable ASCII that decodes back to the message.
pub fn status(data: &[u8]) {
    assert_eq!(GrpcStatus::from_header(data), reference_grpc_status(data), "{:?}", String::from_utf8_lossy(data));
    let mut input = Input(data);
    let number = input.u32();
    match GrpcStatus::from_code(number) {
        Some(status) => assert_eq!(status.code(), number),
        None => assert!(number as usize >= GrpcStatus::ALL.len()),
    }
    assert_eq!(GrpcStatus::from_http_status(number), reference_http_status(number), "HTTP {number}");

    let text = String::from_utf8_lossy(&data[..data.len().min(TEXT_BYTES)]);
    let encoded = percent_encode(&text);
    assert!(encoded.bytes().all(|b| (0x20..0x7f).contains(&b)), "{encoded:?}");
    assert_eq!(percent_decode(&encoded).as_deref(), Some(text.as_bytes()), "{encoded:?}");
    let escaped = text.bytes().filter(|b| !(0x20..0x7f).contains(b) || *b == b'%').count();
    assert_eq!(encoded.len(), text.len() + 2 * escaped, "only what must be escaped is");

    assert_eq!(ResetSide::from_code_details(&text), reference_reset_side(&text), "{text:?}");
    let shown = crate::printable(data);
    assert_eq!(shown.len(), data.len().min(64));
    assert!(shown.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'%'), "{shown:?}");

    check_final_status(&mut input);
}

fn reference_grpc_status(value: &[u8]) -> Option<GrpcStatus> {
    // A negative number is a number outside 0-16: Unknown.
    let (negative, digits) = value.strip_prefix(b"-").map_or((false, value), |rest| (true, rest));
    if !(1..=10).contains(&digits.len()) || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    if negative {
        return Some(GrpcStatus::Unknown);
    }
    let n: usize = std::str::from_utf8(digits).unwrap().parse().unwrap();
    Some(GrpcStatus::ALL.get(n).copied().unwrap_or(GrpcStatus::Unknown))
}

/// gRPC's `http-grpc-status-mapping.md`; every other HTTP status is Unknown.
pub(crate) const HTTP_TO_GRPC: [(u32, GrpcStatus); 8] = [
    (400, GrpcStatus::Internal),
    (401, GrpcStatus::Unauthenticated),
    (403, GrpcStatus::PermissionDenied),
    (404, GrpcStatus::Unimplemented),
    (429, GrpcStatus::Unavailable),
    (502, GrpcStatus::Unavailable),
    (503, GrpcStatus::Unavailable),
    (504, GrpcStatus::Unavailable),
];

fn reference_http_status(http: u32) -> GrpcStatus {
    HTTP_TO_GRPC.iter().find(|(h, _)| *h == http).map_or(GrpcStatus::Unknown, |(_, s)| *s)
}

/// A `grpc-message` decoded as a gRPC client decodes it; `None` if a byte
/// that must be escaped is not, or an escape is not `%` and two upper-case
/// hex digits.
fn percent_decode(encoded: &str) -> Option<Vec<u8>> {
    let hex = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    };
    let mut out = Vec::with_capacity(encoded.len());
    let mut bytes = encoded.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let high = hex(bytes.next()?)?;
                let low = hex(bytes.next()?)?;
                out.push(high << 4 | low);
            }
            0x20..=0x7e => out.push(b),
            _ => return None,
        }
    }
    Some(out)
}

fn reference_reset_side(details: &str) -> ResetSide {
    let downstream = ["downstream", "http1.", "http2.", "http3.", "codec"].iter().any(|p| details.starts_with(p));
    if !details.contains("upstream") && downstream {
        ResetSide::Downstream
    } else {
        ResetSide::Upstream
    }
}

/// The final status comes from the most final place that carried one, and
/// who reset the stream is asked only when none did.
fn check_final_status(input: &mut Input<'_>) {
    let flags = input.byte();
    let header = GrpcStatus::ALL[usize::from(input.byte()) % GrpcStatus::ALL.len()];
    let trailer = GrpcStatus::ALL[usize::from(input.byte()) % GrpcStatus::ALL.len()];
    let http = u32::from(input.u16());
    let seen = ResponseSeen {
        http_status: (flags & 1 != 0).then_some(http),
        header_status: (flags & 2 != 0).then_some(header),
        trailer_status: (flags & 4 != 0).then_some(trailer),
        complete: flags & 8 != 0,
    };
    let side = if flags & 16 != 0 { ResetSide::Downstream } else { ResetSide::Upstream };
    let mut asked = false;
    let got = seen.final_status(|| {
        asked = true;
        side
    });
    let expected = match seen {
        ResponseSeen { trailer_status: Some(s), .. } => (s, StatusSource::Trailers),
        ResponseSeen { header_status: Some(s), .. } => (s, StatusSource::Headers),
        ResponseSeen { http_status: Some(h), .. } if h != 200 => (reference_http_status(h), StatusSource::Http),
        ResponseSeen { http_status: Some(_), complete: true, .. } => (GrpcStatus::Internal, StatusSource::Missing),
        _ if side == ResetSide::Downstream => (GrpcStatus::Cancelled, StatusSource::Reset),
        _ => (GrpcStatus::Unavailable, StatusSource::Reset),
    };
    assert_eq!(got, expected, "{seen:?}");
    assert_eq!(asked, got.1 == StatusSource::Reset);
}
