//! `frames`: the gRPC frame reader, fed a body in any chunking.

use super::Input;
use crate::frames::{Frame, FrameError, FrameEvent, FrameReader, PREFIX_LEN};

/// `frames`: byte 0 holds the number of cuts (low 4 bits) and, in its top
/// bit, a host whose every other chunk reads short; then each cut, a u16
/// (an offset modulo the body's length + 1); the rest is a body. However
/// the body is cut into chunks, the reader reports the frames started and
/// whole, counts and error of one walk over the whole body (a message
/// counts once its last byte is in, never before), and copies only prefix
/// bytes out of the host; a short read is an error, never a panic.
pub fn frames(data: &[u8]) {
    let mut input = Input(data);
    let control = input.byte();
    let cuts: Vec<u16> = (0..control & 0x0f).map(|_| input.u16()).collect();
    let body = input.rest();
    let short_reads = control & 0x80 != 0;
    let mut ends: Vec<usize> = cuts.iter().map(|&c| usize::from(c) % (body.len() + 1)).collect();
    ends.push(body.len());
    ends.sort_unstable();

    let mut reader = FrameReader::default();
    let mut seen = Vec::new();
    let mut whole = Vec::new();
    let mut errors = Vec::new();
    let mut copied = 0;
    let mut start = 0;
    for (i, &end) in ends.iter().enumerate() {
        let chunk = &body[start..end];
        let short = short_reads && i % 2 == 1;
        let result = reader.advance(
            chunk.len(),
            |offset, len| {
                assert!(
                    len > 0 && offset + len <= chunk.len(),
                    "read {len} at {offset} of a {}-byte chunk",
                    chunk.len()
                );
                copied += len;
                let bytes = &chunk[offset..offset + len];
                Some(if short { bytes[..len - 1].to_vec() } else { bytes.to_vec() })
            },
            |event| match event {
                FrameEvent::Started(frame) => seen.push(frame),
                FrameEvent::Whole(frame) => {
                    assert_eq!(seen.last(), Some(&frame), "a message is whole after it started, before the next");
                    whole.push(frame);
                }
            },
        );
        if let Err(e) = result {
            errors.push(e);
        }
        start = end;
    }
    assert_eq!(reader.messages(), whole.len() as u64);
    assert_eq!(reader.message_bytes(), whole.iter().map(|f| u64::from(f.len)).sum::<u64>());
    if short_reads {
        assert!(errors.iter().all(|e| matches!(e, FrameError::ShortRead | FrameError::BadFlag(_))), "{errors:?}");
        return;
    }
    let expected = reference_frames(body);
    assert_eq!(seen, expected.frames, "chunk ends {ends:?}");
    assert_eq!(errors, expected.error.into_iter().collect::<Vec<_>>(), "chunk ends {ends:?}");
    assert_eq!(reader.messages(), expected.whole, "chunk ends {ends:?}");
    assert_eq!(copied, expected.prefix_bytes, "only prefix bytes are copied out of the host");
}

/// What one walk over a whole body finds.
struct Framing {
    frames: Vec<Frame>,
    error: Option<FrameError>,
    /// Frames whose last byte is in the body.
    whole: u64,
    /// Bytes of prefixes, whole or started.
    prefix_bytes: usize,
}

fn reference_frames(body: &[u8]) -> Framing {
    let mut framing = Framing { frames: Vec::new(), error: None, whole: 0, prefix_bytes: 0 };
    let mut at = 0usize;
    let mut payload_cut = false;
    while at < body.len() {
        let Some(prefix) = body.get(at..at + PREFIX_LEN) else {
            framing.prefix_bytes += body.len() - at;
            break;
        };
        framing.prefix_bytes += PREFIX_LEN;
        if prefix[0] > 1 {
            framing.error = Some(FrameError::BadFlag(prefix[0]));
            break;
        }
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]);
        framing.frames.push(Frame { compressed: prefix[0] == 1, len });
        at += PREFIX_LEN + len as usize;
        payload_cut = at > body.len();
    }
    framing.whole = framing.frames.len() as u64 - u64::from(payload_cut);
    framing
}
