//! One HTTP stream as the filter sees it through the hostcalls: four header
//! maps, two body buffers, properties, and when each is reachable.
//!
//! Reachability follows Envoy's `Context` (source/extensions/common/wasm/
//! context.cc): a map or body is reachable during its own callback and stays
//! reachable only while the filter holds the stream (returns Pause); trailers
//! can be created from the body callback at end of stream; in `proxy_on_log`
//! the access-log copies are read-only.

use std::collections::HashMap;

use super::abi::{BufferType, MapType, Pairs, Status};
use super::local_reply::{is_grpc, LocalReply};

/// A call the filter made to resume or reset its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEvent {
    /// `proxy_continue_stream(HttpRequest)`.
    ContinueRequest,
    /// `proxy_continue_stream(HttpResponse)`.
    ContinueResponse,
    /// `proxy_close_stream(HttpRequest)`: Envoy resets the stream.
    CloseRequest,
    /// `proxy_close_stream(HttpResponse)`.
    CloseResponse,
}

#[derive(Debug, Default)]
pub(crate) struct Body {
    bytes: Vec<u8>,
    reachable: bool,
    /// The filter paused the previous chunk: Envoy buffers it and the next
    /// callback sees everything buffered so far plus the new chunk.
    buffering: bool,
}

impl Body {
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The body Envoy sends instead, after a local reply.
    pub(crate) fn replace(&mut self, bytes: Vec<u8>) {
        self.bytes = bytes;
        self.reachable = false;
        self.buffering = false;
    }

    fn begin(&mut self, chunk: &[u8]) -> usize {
        if self.buffering {
            self.bytes.extend_from_slice(chunk);
        } else {
            self.bytes = chunk.to_vec();
        }
        self.reachable = true;
        self.bytes.len()
    }

    fn end(&mut self, paused: bool) {
        self.buffering = paused;
        self.reachable = paused;
    }

    /// `proxy_get_buffer_bytes`: the range is clamped to the buffer; an empty
    /// result is `Ok(None)` (Envoy writes no pointer).
    pub(crate) fn read(&self, start: usize, len: usize) -> Result<Option<&[u8]>, Status> {
        read_range(self.reachable.then_some(&self.bytes[..]), start, len)
    }

    /// `proxy_set_buffer_bytes` with Envoy's `Buffer::copyFrom` rules: at
    /// start 0 the first `len` bytes are replaced by `data`; at or past the
    /// end `data` is appended; anything else is `BadArgument`.
    pub(crate) fn write(&mut self, start: usize, len: usize, data: &[u8]) -> Result<(), Status> {
        if !self.reachable {
            return Err(Status::NotFound);
        }
        if start == 0 {
            let drained = len.min(self.bytes.len());
            self.bytes.splice(..drained, data.iter().copied());
            Ok(())
        } else if start >= self.bytes.len() {
            self.bytes.extend_from_slice(data);
            Ok(())
        } else {
            Err(Status::BadArgument)
        }
    }
}

/// Clamps `start..start+len` to `buffer` the way proxy-wasm-cpp-host's
/// `get_buffer_bytes` does.
pub(crate) fn read_range(buffer: Option<&[u8]>, start: usize, len: usize) -> Result<Option<&[u8]>, Status> {
    let buffer = buffer.ok_or(Status::NotFound)?;
    if start > buffer.len() {
        return Err(Status::BadArgument);
    }
    let end = start.saturating_add(len).min(buffer.len());
    Ok(buffer.get(start..end).filter(|bytes| !bytes.is_empty()))
}

#[derive(Debug, Default)]
pub(crate) struct StreamState {
    maps: HashMap<MapType, Pairs>,
    reachable: HashMap<MapType, bool>,
    pub(crate) request_body: Body,
    pub(crate) response_body: Body,
    /// Envoy's single `end_of_stream_` flag: set by the latest headers or
    /// body callback.
    end_of_stream: bool,
    /// Envoy's `is_grpc_request_`: taken from the request headers as they
    /// arrived, before the filter could edit them; decides how a local reply
    /// is encoded.
    pub(crate) grpc_request: bool,
    pub(crate) in_access_log: bool,
    /// Properties the host knows (set by the test, or by Envoy itself such as
    /// `response.code_details` after a local reply).
    pub(crate) host_properties: HashMap<Vec<String>, Vec<u8>>,
    /// Properties the filter wrote with `proxy_set_property`.
    pub(crate) filter_properties: HashMap<Vec<String>, Vec<u8>>,
    /// Sent by the filter during the current callback; acted on after it
    /// returns, as Envoy defers `sendLocalReply` until the VM call ends.
    pub(crate) pending_local_reply: Option<LocalReply>,
    pub(crate) local_reply: Option<LocalReply>,
    pub(crate) events: Vec<StreamEvent>,
}

impl StreamState {
    /// Installs a map for its callback; returns the entry count the callback
    /// is told.
    pub(crate) fn begin_map(&mut self, kind: MapType, pairs: Pairs, end_of_stream: bool) -> usize {
        let count = pairs.len();
        if kind == MapType::RequestHeaders {
            self.grpc_request = is_grpc(&pairs);
        }
        self.maps.insert(kind, pairs);
        self.reachable.insert(kind, true);
        if matches!(kind, MapType::RequestHeaders | MapType::ResponseHeaders) {
            self.end_of_stream = end_of_stream;
        }
        count
    }

    pub(crate) fn end_map(&mut self, kind: MapType, paused: bool) {
        self.reachable.insert(kind, paused);
    }

    pub(crate) fn begin_body(&mut self, kind: BufferType, chunk: &[u8], eos: bool) -> usize {
        self.end_of_stream = eos;
        match kind {
            BufferType::HttpResponseBody => self.response_body.begin(chunk),
            _ => self.request_body.begin(chunk),
        }
    }

    pub(crate) fn end_body(&mut self, kind: BufferType, paused: bool) {
        match kind {
            BufferType::HttpResponseBody => self.response_body.end(paused),
            _ => self.request_body.end(paused),
        }
    }

    /// Envoy's `continueStream` drops its request-side pointers whichever
    /// direction is resumed.
    pub(crate) fn resume(&mut self) {
        for kind in [MapType::RequestHeaders, MapType::RequestTrailers] {
            self.reachable.insert(kind, false);
        }
        self.request_body.reachable = false;
        self.request_body.buffering = false;
    }

    pub(crate) fn body(&self, kind: BufferType) -> Option<&Body> {
        match kind {
            BufferType::HttpRequestBody => Some(&self.request_body),
            BufferType::HttpResponseBody => Some(&self.response_body),
            _ => None,
        }
    }

    pub(crate) fn body_mut(&mut self, kind: BufferType) -> Option<&mut Body> {
        match kind {
            BufferType::HttpRequestBody => Some(&mut self.request_body),
            BufferType::HttpResponseBody => Some(&mut self.response_body),
            _ => None,
        }
    }

    /// The map as last left, whether or not the filter can still reach it.
    pub(crate) fn snapshot(&self, kind: MapType) -> &[(Vec<u8>, Vec<u8>)] {
        self.maps.get(&kind).map_or(&[], Vec::as_slice)
    }

    pub(crate) fn replace_map(&mut self, kind: MapType, pairs: Pairs) {
        self.maps.insert(kind, pairs);
    }

    pub(crate) fn drop_map(&mut self, kind: MapType) {
        self.maps.remove(&kind);
    }

    /// Envoy's `getConstMap`: `NotFound` for a map missing in the access log,
    /// `BadArgument` for one not reachable in the current callback.
    pub(crate) fn read_map(&self, kind: MapType) -> Result<&Pairs, Status> {
        if self.in_access_log {
            if kind == MapType::RequestTrailers {
                return Err(Status::NotFound);
            }
            return self.maps.get(&kind).ok_or(Status::NotFound);
        }
        if self.reachable.get(&kind).copied().unwrap_or(false) {
            self.maps.get(&kind).ok_or(Status::BadArgument)
        } else {
            Err(Status::BadArgument)
        }
    }

    /// Envoy's `getMap`: trailers that do not exist yet are created when the
    /// filter is in that direction's body callback at end of stream, and only
    /// then; any other unreachable map is `BadArgument`.
    pub(crate) fn write_map(&mut self, kind: MapType) -> Result<&mut Pairs, Status> {
        let body_at_end = match kind {
            MapType::RequestTrailers => self.request_body.reachable && self.end_of_stream,
            MapType::ResponseTrailers => self.response_body.reachable && self.end_of_stream,
            MapType::RequestHeaders | MapType::ResponseHeaders => false,
        };
        if !self.maps.contains_key(&kind) && body_at_end {
            self.maps.insert(kind, Vec::new());
            self.reachable.insert(kind, true);
        }
        if self.reachable.get(&kind).copied().unwrap_or(false) {
            self.maps.get_mut(&kind).ok_or(Status::BadArgument)
        } else {
            Err(Status::BadArgument)
        }
    }
}

/// Header names are case-insensitive; Envoy stores them lower-case
/// (`Http::LowerCaseString`).
pub(crate) fn lower(name: &[u8]) -> Vec<u8> {
    name.to_ascii_lowercase()
}

/// The first value of `name`: Envoy's `getHeaderMapValue` returns only the
/// first of repeated headers.
pub(crate) fn first_value<'a>(pairs: &'a Pairs, name: &[u8]) -> Option<&'a [u8]> {
    let name = lower(name);
    pairs.iter().find(|(key, _)| *key == name).map(|(_, value)| value.as_slice())
}

/// `addCopy`: appended, except that pseudo-headers (`:status`, `:path`) stay
/// ahead of regular ones as in Envoy's header map.
pub(crate) fn add(pairs: &mut Pairs, name: &[u8], value: &[u8]) {
    let name = lower(name);
    let at = if name.starts_with(b":") {
        pairs.iter().position(|(key, _)| !key.starts_with(b":")).unwrap_or(pairs.len())
    } else {
        pairs.len()
    };
    pairs.insert(at, (name, value.to_vec()));
}

pub(crate) fn remove(pairs: &mut Pairs, name: &[u8]) {
    let name = lower(name);
    pairs.retain(|(key, _)| *key != name);
}

/// `setCopy`: every existing value of `name` goes, one new value is added.
pub(crate) fn replace(pairs: &mut Pairs, name: &[u8], value: &[u8]) {
    remove(pairs, name);
    add(pairs, name, value);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(list: &[(&str, &str)]) -> Pairs {
        list.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec())).collect()
    }

    #[test]
    fn buffer_reads_are_clamped_to_the_chunk() {
        let body = b"hello";
        assert_eq!(read_range(Some(body), 1, 3), Ok(Some(&b"ell"[..])));
        assert_eq!(read_range(Some(body), 2, usize::MAX), Ok(Some(&b"llo"[..])));
        assert_eq!(read_range(Some(body), 5, 10), Ok(None));
        assert_eq!(read_range(Some(body), 6, 1), Err(Status::BadArgument));
        assert_eq!(read_range(None, 0, 1), Err(Status::NotFound));
    }

    #[test]
    fn buffer_writes_follow_envoy_copy_from() {
        let mut body = Body::default();
        body.begin(b"hello world");
        body.write(0, 5, b"HOWDY").unwrap();
        assert_eq!(body.bytes(), b"HOWDY world");
        body.write(11, 0, b"!").unwrap();
        assert_eq!(body.bytes(), b"HOWDY world!");
        assert_eq!(body.write(3, 1, b"x"), Err(Status::BadArgument));
        body.write(0, usize::MAX, b"all").unwrap();
        assert_eq!(body.bytes(), b"all");
    }

    #[test]
    fn a_paused_chunk_is_seen_again_with_the_next_one() {
        let mut body = Body::default();
        assert_eq!(body.begin(b"ab"), 2);
        body.end(true);
        assert_eq!(body.begin(b"cd"), 4);
        assert_eq!(body.read(0, 4), Ok(Some(&b"abcd"[..])));
        body.end(false);
        assert_eq!(body.read(0, 4), Err(Status::NotFound));
        assert_eq!(body.begin(b"ef"), 2);
    }

    #[test]
    fn headers_are_reachable_only_in_their_callback_unless_paused() {
        let mut stream = StreamState::default();
        stream.begin_map(MapType::RequestHeaders, map(&[("a", "1")]), false);
        assert!(stream.read_map(MapType::RequestHeaders).is_ok());
        assert_eq!(stream.read_map(MapType::ResponseHeaders), Err(Status::BadArgument));
        stream.end_map(MapType::RequestHeaders, false);
        assert_eq!(stream.read_map(MapType::RequestHeaders), Err(Status::BadArgument));
        stream.in_access_log = true;
        assert!(stream.read_map(MapType::RequestHeaders).is_ok());
        assert_eq!(stream.read_map(MapType::ResponseHeaders), Err(Status::NotFound));
    }

    #[test]
    fn response_trailers_can_be_added_only_in_the_last_body_callback() {
        let mut stream = StreamState::default();
        stream.begin_body(BufferType::HttpResponseBody, b"x", false);
        assert_eq!(stream.write_map(MapType::ResponseTrailers).err(), Some(Status::BadArgument));
        stream.end_body(BufferType::HttpResponseBody, false);
        stream.begin_body(BufferType::HttpResponseBody, b"y", true);
        add(stream.write_map(MapType::ResponseTrailers).unwrap(), b"X-T", b"1");
        stream.end_body(BufferType::HttpResponseBody, false);
        assert_eq!(stream.snapshot(MapType::ResponseTrailers), map(&[("x-t", "1")]));
    }

    #[test]
    fn a_request_stays_grpc_for_local_replies_whatever_the_filter_rewrites() {
        let mut stream = StreamState::default();
        stream.begin_map(MapType::RequestHeaders, map(&[("content-type", "application/grpc")]), false);
        replace(stream.write_map(MapType::RequestHeaders).unwrap(), b"content-type", b"text/plain");
        assert!(stream.grpc_request);
        stream.begin_map(MapType::RequestHeaders, map(&[("content-type", "text/plain")]), false);
        assert!(!stream.grpc_request);
    }

    #[test]
    fn header_edits_lower_case_names_and_replace_every_value() {
        let mut pairs = map(&[(":status", "200"), ("x", "1"), ("x", "2")]);
        assert_eq!(first_value(&pairs, b"X"), Some(&b"1"[..]));
        replace(&mut pairs, b"X", b"3");
        add(&mut pairs, b":extra", b"e");
        add(&mut pairs, b"Y", b"4");
        assert_eq!(pairs, map(&[(":status", "200"), (":extra", "e"), ("x", "3"), ("y", "4")]));
        remove(&mut pairs, b"x");
        assert_eq!(first_value(&pairs, b"x"), None);
    }
}
