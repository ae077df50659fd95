//! The numbers and wire formats of the proxy-wasm ABI 0.2.1, as the Rust SDK
//! 0.2.x and Envoy use them (proxy-wasm spec, `abi-versions/v0.2.1`).

/// `WasmResult` of the ABI: what every hostcall returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    Ok = 0,
    NotFound = 1,
    BadArgument = 2,
    InvalidMemoryAccess = 6,
    CasMismatch = 8,
    Unimplemented = 12,
}

/// `proxy_buffer_type_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BufferType {
    HttpRequestBody,
    HttpResponseBody,
    VmConfiguration,
    PluginConfiguration,
    /// Network data, HTTP/gRPC call responses, foreign-call data: this host
    /// never has them, so Envoy's answer (no buffer) applies.
    Unavailable,
}

impl BufferType {
    pub(crate) fn from_abi(value: u32) -> Option<BufferType> {
        match value {
            0 => Some(BufferType::HttpRequestBody),
            1 => Some(BufferType::HttpResponseBody),
            6 => Some(BufferType::VmConfiguration),
            7 => Some(BufferType::PluginConfiguration),
            2..=5 | 8 => Some(BufferType::Unavailable),
            _ => None,
        }
    }
}

/// `proxy_map_type_t`, restricted to the four maps of an HTTP stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum MapType {
    RequestHeaders = 0,
    RequestTrailers = 1,
    ResponseHeaders = 2,
    ResponseTrailers = 3,
}

impl MapType {
    /// `None` for the gRPC-call and HTTP-call maps, which this host never has.
    pub(crate) fn from_abi(value: u32) -> Option<MapType> {
        match value {
            0 => Some(MapType::RequestHeaders),
            1 => Some(MapType::RequestTrailers),
            2 => Some(MapType::ResponseHeaders),
            3 => Some(MapType::ResponseTrailers),
            _ => None,
        }
    }
}

/// `proxy_log_level_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
    Critical,
}

impl LogLevel {
    pub(crate) fn from_abi(value: u32) -> Option<LogLevel> {
        match value {
            0 => Some(LogLevel::Trace),
            1 => Some(LogLevel::Debug),
            2 => Some(LogLevel::Info),
            3 => Some(LogLevel::Warn),
            4 => Some(LogLevel::Error),
            5 => Some(LogLevel::Critical),
            _ => None,
        }
    }
}

/// `proxy_metric_type_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum MetricType {
    Counter = 0,
    Gauge = 1,
    Histogram = 2,
}

impl MetricType {
    pub(crate) fn from_abi(value: u32) -> Option<MetricType> {
        match value {
            0 => Some(MetricType::Counter),
            1 => Some(MetricType::Gauge),
            2 => Some(MetricType::Histogram),
            _ => None,
        }
    }
}

/// A header map as the ABI carries it: ordered, repeated names allowed,
/// values are bytes.
pub(crate) type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// Serializes a map the way Envoy hands it to `proxy_get_header_map_pairs`:
/// a little-endian `u32` count, then a `(name length, value length)` pair of
/// `u32`s per entry, then each name and value followed by a NUL byte.
pub(crate) fn serialize_pairs(pairs: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&len_u32(pairs.len()).to_le_bytes());
    for (name, value) in pairs {
        out.extend_from_slice(&len_u32(name.len()).to_le_bytes());
        out.extend_from_slice(&len_u32(value.len()).to_le_bytes());
    }
    for (name, value) in pairs {
        out.extend_from_slice(name);
        out.push(0);
        out.extend_from_slice(value);
        out.push(0);
    }
    out
}

/// Parses what the SDK's `serialize_map` produces; `None` when the bytes do
/// not hold the lengths they announce. An empty input is an empty map, as in
/// the SDK.
pub(crate) fn deserialize_pairs(bytes: &[u8]) -> Option<Pairs> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let word = |at: usize| -> Option<usize> {
        let raw: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
        usize::try_from(u32::from_le_bytes(raw)).ok()
    };
    let count = word(0)?;
    let mut cursor = count.checked_mul(8)?.checked_add(4)?;
    let mut pairs = Vec::with_capacity(count.min(bytes.len()));
    for index in 0..count {
        let name_len = word(4 + index * 8)?;
        let value_len = word(8 + index * 8)?;
        let name = bytes.get(cursor..cursor.checked_add(name_len)?)?.to_vec();
        cursor += name_len + 1;
        let value = bytes.get(cursor..cursor.checked_add(value_len)?)?.to_vec();
        cursor += value_len + 1;
        pairs.push((name, value));
    }
    Some(pairs)
}

/// A property path as `proxy_get_property` carries it: segments joined by NUL.
pub(crate) fn split_path(bytes: &[u8]) -> Vec<String> {
    bytes.split(|byte| *byte == 0).map(|segment| String::from_utf8_lossy(segment).into_owned()).collect()
}

/// Lengths in this host are bounded by wasm32 memory, so they fit the ABI's
/// 32-bit size fields; saturating keeps a broken caller from wrapping.
pub(crate) fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Pairs {
        list.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec())).collect()
    }

    #[test]
    fn serialized_pairs_match_the_sdk_layout() {
        let bytes = serialize_pairs(&pairs(&[(":method", "GET"), ("a", "")]));
        let expected: Vec<u8> =
            [&[2, 0, 0, 0][..], &[7, 0, 0, 0, 3, 0, 0, 0], &[1, 0, 0, 0, 0, 0, 0, 0], b":method\0GET\0a\0\0"].concat();
        assert_eq!(bytes, expected);
    }

    #[test]
    fn pairs_round_trip_through_the_wire_format() {
        let original = pairs(&[("content-type", "application/grpc"), ("x", "1"), ("x", "2")]);
        assert_eq!(deserialize_pairs(&serialize_pairs(&original)), Some(original));
    }

    #[test]
    fn truncated_pairs_are_rejected_not_misread() {
        let bytes = serialize_pairs(&pairs(&[("name", "value")]));
        for cut in 1..bytes.len() - 1 {
            assert_eq!(deserialize_pairs(&bytes[..cut]), None, "cut at {cut}");
        }
    }

    #[test]
    fn property_paths_split_on_nul() {
        assert_eq!(split_path(b"response\0code_details"), ["response", "code_details"]);
    }
}
