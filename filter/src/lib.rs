//! grpc-guard: a proxy-wasm HTTP filter for Envoy and Istio that makes gRPC
//! failures visible — the final gRPC status of every call as a metric label,
//! a log field and a filter-state value; per-method call, message, latency and
//! size metrics under go-grpc-prometheus names; one JSON log line per call.
//!
//! The modules below are plain Rust with no knowledge of proxy-wasm, tested
//! natively. [`call`] is one call's life, from request headers to log line,
//! as a state machine whose steps return what to do; `plugin` is the only
//! glue: it hands Envoy's callbacks to those steps and carries out what they
//! return, and is compiled for wasm only.
//!
//! What it is not: a gRPC-Web or transcoding filter (Envoy's `grpc_web`
//! filter goes before it; untranslated gRPC-Web on a method path is refused
//! unless `non_grpc` is `pass`), nor a replacement for Envoy's router timeouts.

// Untrusted bytes must never trap the VM: a trap takes down every stream on
// that worker. Tests may unwrap.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic))]

pub mod call;
pub mod config;
pub mod deadline;
pub mod dedup;
pub mod etcd;
pub mod frames;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod headers;
pub mod json;
pub mod method;
pub mod metrics;
pub mod protowire;
pub mod record;
pub mod registry;
pub mod shared;
pub mod status;
pub mod worker;

#[cfg(target_arch = "wasm32")]
mod plugin;

/// True for the content types of gRPC over HTTP/2 (`application/grpc`,
/// `application/grpc+proto`, `application/grpc;…`). gRPC-Web frames trailers
/// into the body and is left alone.
pub fn is_grpc_content_type(value: &[u8]) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    match value.get(..GRPC.len()) {
        Some(prefix) if prefix.eq_ignore_ascii_case(GRPC) => {
            matches!(value.get(GRPC.len()), None | Some(b'+') | Some(b';'))
        }
        _ => false,
    }
}

/// The start of an outside value, for a message or a header: printable
/// ASCII only, `%` included neither (a `grpc-message` is percent-encoded).
pub fn printable(raw: &[u8]) -> String {
    raw.iter().take(64).map(|&b| if (0x20..0x7f).contains(&b) && b != b'%' { char::from(b) } else { '?' }).collect()
}

/// Appends `value` in decimal: `format!` costs far more in wasm.
pub fn push_decimal(out: &mut String, value: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = value;
    loop {
        at -= 1;
        // `n % 10` < 10, so the digit is ASCII.
        if let Some(d) = digits.get_mut(at) {
            *d = b'0' + (n % 10) as u8;
        }
        n /= 10;
        if n == 0 || at == 0 {
            break;
        }
    }
    if let Some(text) = digits.get(at..).and_then(|d| std::str::from_utf8(d).ok()) {
        out.push_str(text);
    }
}

#[cfg(test)]
mod tests {
    use super::{is_grpc_content_type, printable};

    #[test]
    fn outside_values_are_shown_short_and_printable() {
        assert_eq!(printable(b"text/plain"), "text/plain");
        assert_eq!(printable(b"a\nb%c\xff"), "a?b?c?");
        assert_eq!(printable(&[b'x'; 100]).len(), 64);
    }

    #[test]
    fn grpc_content_types_are_recognised_and_grpc_web_is_not() {
        for ct in ["application/grpc", "application/grpc+proto", "application/grpc;charset=utf-8", "Application/GRPC"] {
            assert!(is_grpc_content_type(ct.as_bytes()), "{ct}");
        }
        for ct in ["application/grpc-web", "application/grpc-web+proto", "application/json", "", "application/grp"] {
            assert!(!is_grpc_content_type(ct.as_bytes()), "{ct}");
        }
    }
}
