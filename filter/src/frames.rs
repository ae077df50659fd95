//! Incremental reading of gRPC length-prefixed messages.
//!
//! gRPC PROTOCOL-HTTP2: a body is a sequence of `Length-Prefixed-Message`s, each a
//! 1-byte compressed flag (0 or 1), a 4-byte big-endian length, then the message.
//! Envoy hands a filter the body in chunks of any size, split anywhere. The
//! reader keeps only the state of the frame in progress, and asks for the
//! bytes of frame prefixes alone: message payloads are skipped, never copied
//! out of the host, so a 4 MiB message costs the same as a 4-byte one.

use thiserror::Error;

/// Length of the prefix in front of every gRPC message.
pub const PREFIX_LEN: usize = 5;

/// One message whose prefix has been read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    pub compressed: bool,
    /// Message length in bytes, without the 5-byte prefix.
    pub len: u32,
}

/// What [`FrameReader::advance`] reports of a message, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameEvent {
    /// Its prefix is read: its length is known before its bytes arrive, so
    /// a size limit can act on it.
    Started(Frame),
    /// Its last byte has passed: a peer can act on it, and it counts.
    Whole(Frame),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("gRPC frame flag byte is {0:#04x}; only 0 (plain) and 1 (compressed) are defined")]
    BadFlag(u8),
    #[error("the host returned fewer body bytes than the chunk it announced")]
    ShortRead,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Reading a prefix; `have` bytes of it are in `buf`.
    Prefix { buf: [u8; PREFIX_LEN], have: usize },
    /// Skipping the rest of a message body.
    Payload { remaining: u64, frame: Frame },
    /// A bad frame was seen: nothing after it is interpreted.
    Broken,
}

/// Reads one direction of a gRPC stream.
#[derive(Clone, Debug)]
pub struct FrameReader {
    state: State,
    messages: u64,
    message_bytes: u64,
}

impl Default for FrameReader {
    fn default() -> Self {
        FrameReader { state: State::Prefix { buf: [0; PREFIX_LEN], have: 0 }, messages: 0, message_bytes: 0 }
    }
}

impl FrameReader {
    /// Consumes the next chunk of `chunk_len` bytes. `read(offset, len)` must
    /// return bytes `offset..offset + len` of the chunk; it is called only for
    /// prefix bytes. Each message is passed to `on_event` as
    /// [`FrameEvent::Started`] as soon as its prefix is read (before its
    /// payload arrives), and as [`FrameEvent::Whole`] once its last byte has.
    pub fn advance<R, F>(&mut self, chunk_len: usize, mut read: R, mut on_event: F) -> Result<(), FrameError>
    where
        R: FnMut(usize, usize) -> Option<Vec<u8>>,
        F: FnMut(FrameEvent),
    {
        let mut offset = 0usize;
        while offset < chunk_len {
            match &mut self.state {
                State::Broken => return Ok(()),
                State::Payload { remaining, frame } => {
                    let available = (chunk_len - offset) as u64;
                    let skip = (*remaining).min(available);
                    *remaining -= skip;
                    // `skip` ≤ chunk_len - offset, so it fits in usize.
                    offset += skip as usize;
                    if *remaining == 0 {
                        let frame = *frame;
                        self.state = State::Prefix { buf: [0; PREFIX_LEN], have: 0 };
                        self.whole(frame, &mut on_event);
                    }
                }
                State::Prefix { buf, have } => {
                    let want = (PREFIX_LEN - *have).min(chunk_len - offset);
                    let bytes = read(offset, want).ok_or(FrameError::ShortRead)?;
                    let got = bytes.get(..want).ok_or(FrameError::ShortRead)?;
                    for (slot, byte) in buf.iter_mut().skip(*have).zip(got) {
                        *slot = *byte;
                    }
                    *have += want;
                    offset += want;
                    if *have == PREFIX_LEN {
                        let [flag, a, b, c, d] = *buf;
                        if flag > 1 {
                            self.state = State::Broken;
                            return Err(FrameError::BadFlag(flag));
                        }
                        let frame = Frame { compressed: flag == 1, len: u32::from_be_bytes([a, b, c, d]) };
                        on_event(FrameEvent::Started(frame));
                        if frame.len == 0 {
                            self.state = State::Prefix { buf: [0; PREFIX_LEN], have: 0 };
                            self.whole(frame, &mut on_event);
                        } else {
                            self.state = State::Payload { remaining: u64::from(frame.len), frame };
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn whole(&mut self, frame: Frame, on_event: &mut impl FnMut(FrameEvent)) {
        self.messages += 1;
        self.message_bytes += u64::from(frame.len);
        on_event(FrameEvent::Whole(frame));
    }

    /// Messages read to their last byte: what a peer can act on, and what
    /// is counted (a message cut short is not).
    pub fn messages(&self) -> u64 {
        self.messages
    }

    /// Sum of the lengths of those messages (prefixes excluded).
    pub fn message_bytes(&self) -> u64 {
        self.message_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Frames `message` as one uncompressed gRPC message.
    fn frame_message(message: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(PREFIX_LEN + message.len());
        out.push(0);
        out.extend_from_slice(&(message.len() as u32).to_be_bytes());
        out.extend_from_slice(message);
        out
    }

    impl FrameReader {
        /// True between messages: a stream that ends here ended cleanly.
        fn at_boundary(&self) -> bool {
            matches!(self.state, State::Prefix { have: 0, .. })
        }
    }

    /// Feeds `body` split at `cuts` and returns the frames and the copied bytes.
    fn read_in_chunks(body: &[u8], cuts: &[usize]) -> (Result<Vec<Frame>, FrameError>, usize, FrameReader) {
        let mut reader = FrameReader::default();
        let mut frames = Vec::new();
        let mut copied = 0;
        let mut start = 0;
        let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
        bounds.push(body.len());
        bounds.sort_unstable();
        for end in bounds {
            let chunk = &body[start..end];
            let res = reader.advance(
                chunk.len(),
                |off, len| {
                    copied += len;
                    chunk.get(off..off + len).map(<[u8]>::to_vec)
                },
                |e| {
                    if let FrameEvent::Started(f) = e {
                        frames.push(f);
                    }
                },
            );
            if let Err(e) = res {
                return (Err(e), copied, reader);
            }
            start = end;
        }
        (Ok(frames), copied, reader)
    }

    #[test]
    fn unary_message_in_one_chunk_is_one_frame() {
        let body = frame_message(b"hello");
        let (frames, copied, reader) = read_in_chunks(&body, &[]);
        assert_eq!(frames.unwrap(), vec![Frame { compressed: false, len: 5 }]);
        assert_eq!(copied, PREFIX_LEN, "payload bytes must not be copied");
        assert_eq!(reader.messages(), 1);
        assert_eq!(reader.message_bytes(), 5);
        assert!(reader.at_boundary());
    }

    #[test]
    fn prefix_split_across_chunks_is_reassembled() {
        let mut body = frame_message(&[7u8; 300]);
        body.extend(frame_message(b""));
        body.extend(frame_message(b"xy"));
        let (frames, _, reader) = read_in_chunks(&body, &[1, 2, 3, 4, 200, 306, 307]);
        assert_eq!(frames.unwrap().iter().map(|f| f.len).collect::<Vec<_>>(), vec![300, 0, 2]);
        assert_eq!(reader.message_bytes(), 302);
    }

    #[test]
    fn compressed_flag_is_reported() {
        let mut body = frame_message(b"abc");
        body[0] = 1;
        let (frames, _, _) = read_in_chunks(&body, &[]);
        assert!(frames.unwrap()[0].compressed);
    }

    #[test]
    fn flag_byte_other_than_0_or_1_is_not_a_grpc_frame() {
        let body = b"GET / HTTP/1.1\r\n".to_vec();
        let (frames, _, reader) = read_in_chunks(&body, &[]);
        assert_eq!(frames.unwrap_err(), FrameError::BadFlag(b'G'));
        assert_eq!(reader.messages(), 0);
    }

    #[test]
    fn stream_cut_inside_a_message_is_not_at_a_boundary() {
        let body = frame_message(b"hello");
        let (_, _, reader) = read_in_chunks(&body[..7], &[]);
        assert!(!reader.at_boundary());
        assert_eq!(
            (reader.messages(), reader.message_bytes()),
            (0, 0),
            "its prefix is read, its bytes are not all in: it does not count"
        );
    }

    #[test]
    fn largest_length_is_skipped_without_overflow() {
        let body = [0u8, 0xff, 0xff, 0xff, 0xff, 1, 2, 3];
        let (frames, _, reader) = read_in_chunks(&body, &[]);
        assert_eq!(frames.unwrap()[0].len, u32::MAX);
        assert!(!reader.at_boundary());
    }

    #[test]
    fn short_host_read_is_an_error_not_a_panic() {
        let mut reader = FrameReader::default();
        let res = reader.advance(10, |_, _| Some(vec![0]), |_| {});
        assert_eq!(res, Err(FrameError::ShortRead));
    }

    proptest! {
        #[test]
        fn any_chunking_reads_the_same_messages(
            messages in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..8),
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let body: Vec<u8> = messages.iter().flat_map(|m| frame_message(m)).collect();
            let (frames, _, reader) = read_in_chunks(&body, &cuts);
            let lens: Vec<u32> = frames.unwrap().iter().map(|f| f.len).collect();
            let expected: Vec<u32> = messages.iter().map(|m| m.len() as u32).collect();
            prop_assert_eq!(reader.message_bytes(), expected.iter().map(|l| u64::from(*l)).sum::<u64>());
            prop_assert_eq!(lens, expected);
            prop_assert_eq!(reader.messages(), messages.len() as u64);
            prop_assert!(reader.at_boundary());
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            body in proptest::collection::vec(any::<u8>(), 0..64),
            cuts in proptest::collection::vec(any::<usize>(), 0..6),
        ) {
            let _ = read_in_chunks(&body, &cuts);
        }
    }
}
