//! A field of a protobuf message read from its wire format, without the
//! schema: how an AIP-155 method's `request_id` becomes an idempotency key
//! (`dedup.key_fields`, README "Idempotency keys").
//!
//! A path of field numbers names the field: `[1]` a top-level field, `[2, 1]`
//! field 1 of the message in field 2. The value is what a protobuf parser
//! would make of it: the last occurrence of a scalar field wins, and the
//! occurrences of a message field merge, so the last occurrence of the inner
//! field in any of them wins. An occurrence with another wire type is, as
//! for protobuf's parsers, an unknown field and skipped; groups (proto2)
//! are skipped whole.

/// Why a message's field could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireError {
    /// The bytes are not a protobuf message (a truncated varint or length,
    /// a length past the end, a group or an unknown wire type).
    Malformed,
    /// The field (or a message on its path) is there, but never with the
    /// length-delimited wire type a string, bytes or message field has.
    NotLengthDelimited { number: u32 },
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::Malformed => f.write_str("is not a protobuf message"),
            WireError::NotLengthDelimited { number } => {
                write!(f, "has field {number} as a number, not a string or message")
            }
        }
    }
}

/// The value of the field at `path` in `message` (string or bytes, as
/// written), `None` when no occurrence is there.
pub fn field<'m>(message: &'m [u8], path: &[u32]) -> Result<Option<&'m [u8]>, WireError> {
    let Some((&number, rest)) = path.split_first() else { return Ok(None) };
    let mut found = None;
    let (mut delimited, mut other) = (false, false);
    let mut fields = Fields { bytes: message };
    while let Some((n, value)) = fields.next_field()? {
        if n != number {
            continue;
        }
        let Value::Delimited(bytes) = value else {
            other = true;
            continue;
        };
        delimited = true;
        if rest.is_empty() {
            found = Some(bytes);
        } else if let Some(inner) = field(bytes, rest)? {
            found = Some(inner);
        }
    }
    if other && !delimited {
        // Only ever a number: the configuration names the wrong field.
        return Err(WireError::NotLengthDelimited { number });
    }
    Ok(found)
}

/// Groups nest at most this deep before a message is refused.
const MAX_GROUP_DEPTH: usize = 32;

/// A field's value as the wire format has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Value<'m> {
    /// A varint (an integer, a bool, an enum).
    Varint(u64),
    /// A fixed-width number or a group, skipped.
    Scalar,
    /// A string, bytes or message.
    Delimited(&'m [u8]),
}

/// The fields of a message in wire order: `(number, value)`, then an error
/// if the bytes end inside a field.
pub struct Fields<'m> {
    bytes: &'m [u8],
}

/// Reads `message` field by field (the etcd store's answers).
pub fn fields(message: &[u8]) -> Fields<'_> {
    Fields { bytes: message }
}

impl<'m> Iterator for Fields<'m> {
    type Item = Result<(u32, Value<'m>), WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        let next = self.next_field();
        if next.is_err() {
            // Nothing after a malformed field can be trusted.
            self.bytes = &[];
        }
        next.transpose()
    }
}

impl<'m> Fields<'m> {
    fn varint(&mut self) -> Result<u64, WireError> {
        let mut value = 0u64;
        for i in 0..10 {
            let (&b, rest) = self.bytes.split_first().ok_or(WireError::Malformed)?;
            self.bytes = rest;
            value |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(WireError::Malformed)
    }

    fn skip(&mut self, n: u64) -> Result<&'m [u8], WireError> {
        let n = usize::try_from(n).map_err(|_| WireError::Malformed)?;
        if n > self.bytes.len() {
            return Err(WireError::Malformed);
        }
        let (taken, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(taken)
    }

    /// The next field's number and value; `None` at the message's end.
    fn next_field(&mut self) -> Result<Option<(u32, Value<'m>)>, WireError> {
        if self.bytes.is_empty() {
            return Ok(None);
        }
        let (number, wire) = self.tag()?;
        if wire == 3 {
            self.skip_group(number)?;
            return Ok(Some((number, Value::Scalar)));
        }
        self.value(wire).map(|value| Some((number, value)))
    }

    fn tag(&mut self) -> Result<(u32, u64), WireError> {
        let tag = self.varint()?;
        let number = u32::try_from(tag >> 3).map_err(|_| WireError::Malformed)?;
        if number == 0 {
            return Err(WireError::Malformed);
        }
        Ok((number, tag & 7))
    }

    /// Skips a group whose start tag (field `number`) was just read, to its
    /// matching end tag, groups inside it included.
    fn skip_group(&mut self, number: u32) -> Result<(), WireError> {
        let mut open = vec![number];
        while let Some(&innermost) = open.last() {
            let (n, wire) = self.tag()?;
            match wire {
                3 if open.len() < MAX_GROUP_DEPTH => open.push(n),
                4 if n == innermost => {
                    open.pop();
                }
                3 | 4 => return Err(WireError::Malformed),
                _ => {
                    self.value(wire)?;
                }
            }
        }
        Ok(())
    }

    fn value(&mut self, wire: u64) -> Result<Value<'m>, WireError> {
        let value = match wire {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.skip(8)?;
                Value::Scalar
            }
            2 => {
                let len = self.varint()?;
                Value::Delimited(self.skip(len)?)
            }
            5 => {
                self.skip(4)?;
                Value::Scalar
            }
            // An end of group with no start; 6 and 7 do not exist.
            _ => return Err(WireError::Malformed),
        };
        Ok(value)
    }
}

/// Writers of the wire format: the etcd store's requests, and the tests'
/// messages.
pub mod write {
    /// Appends a varint.
    pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    /// Appends a varint field (written even when zero: a `oneof` member).
    pub fn put_uint(out: &mut Vec<u8>, number: u32, value: u64) {
        put_varint(out, u64::from(number) << 3);
        put_varint(out, value);
    }

    /// Appends a string, bytes or message field.
    pub fn put_bytes(out: &mut Vec<u8>, number: u32, value: &[u8]) {
        put_varint(out, u64::from(number) << 3 | 2);
        put_varint(out, value.len() as u64);
        out.extend_from_slice(value);
    }

    pub fn tag(number: u32, wire: u8) -> Vec<u8> {
        varint(u64::from(number) << 3 | u64::from(wire))
    }

    pub fn varint(v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        put_varint(&mut out, v);
        out
    }

    /// A string, bytes or message field.
    pub fn string(number: u32, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(value.len() + 6);
        put_bytes(&mut out, number, value);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::write::{string, tag, varint};
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_top_level_string_is_read_between_other_fields() {
        let mut m = tag(1, 0);
        m.extend(varint(300));
        m.extend(tag(3, 1));
        m.extend([0; 8]);
        m.extend(string(2, b"req-42"));
        m.extend(tag(4, 5));
        m.extend([0; 4]);
        assert_eq!(field(&m, &[2]), Ok(Some(&b"req-42"[..])));
        assert_eq!(field(&m, &[9]), Ok(None));
    }

    #[test]
    fn the_last_occurrence_wins_and_nested_messages_merge() {
        let mut m = string(5, b"first");
        m.extend(string(5, b"second"));
        assert_eq!(field(&m, &[5]), Ok(Some(&b"second"[..])));
        // Field 1 of the message in field 2: set in the first occurrence of
        // field 2 only, so the merged message keeps it.
        let mut nested = string(2, &string(1, b"inner"));
        nested.extend(string(2, &string(3, b"other")));
        assert_eq!(field(&nested, &[2, 1]), Ok(Some(&b"inner"[..])));
    }

    #[test]
    fn a_number_where_a_string_is_named_is_an_error() {
        let mut m = tag(1, 0);
        m.extend(varint(7));
        assert_eq!(field(&m, &[1]), Err(WireError::NotLengthDelimited { number: 1 }));
    }

    #[test]
    fn an_occurrence_of_another_wire_type_is_skipped_as_unknown() {
        let mut m = tag(1, 0);
        m.extend(varint(7));
        m.extend(string(1, b"id-9"));
        assert_eq!(field(&m, &[1]), Ok(Some(&b"id-9"[..])));
    }

    #[test]
    fn groups_are_skipped_whole_even_nested() {
        // Field 7: a group holding field 1 (a string) and a group 8.
        let mut m = tag(7, 3);
        m.extend(string(1, b"not me"));
        m.extend(tag(8, 3));
        m.extend(tag(8, 4));
        m.extend(tag(7, 4));
        m.extend(string(1, b"me"));
        assert_eq!(field(&m, &[1]), Ok(Some(&b"me"[..])));
        assert_eq!(field(&tag(7, 3), &[1]), Err(WireError::Malformed), "a group never closed");
        let mut crossed = tag(7, 3);
        crossed.extend(tag(8, 4));
        assert_eq!(field(&crossed, &[1]), Err(WireError::Malformed), "an end tag of another group");
    }

    #[test]
    fn truncated_and_unknown_encodings_are_malformed() {
        assert_eq!(field(&[0x0a, 5, b'a'], &[1]), Err(WireError::Malformed), "length past the end");
        assert_eq!(field(&[0x08, 0x80], &[1]), Err(WireError::Malformed), "varint cut");
        assert_eq!(field(&[0x0c], &[1]), Err(WireError::Malformed), "group end with no start");
        assert_eq!(field(&[0x00, 0x00], &[1]), Err(WireError::Malformed), "field number 0");
        assert_eq!(field(&[0xff; 11], &[1]), Err(WireError::Malformed), "varint over 10 bytes");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64), a in 1u32..6, b in 1u32..6) {
            let _ = field(&bytes, &[a]);
            let _ = field(&bytes, &[a, b]);
        }

        #[test]
        fn a_written_string_reads_back(value in proptest::collection::vec(any::<u8>(), 0..300), number in 1u32..100_000) {
            let mut m = string(number + 1, b"noise");
            m.extend(string(number, &value));
            prop_assert_eq!(field(&m, &[number]), Ok(Some(&value[..])));
        }
    }
}
