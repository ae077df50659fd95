//! A header map as the proxy-wasm ABI hands it over whole
//! (`proxy_get_header_map_pairs`): a little-endian `u32` count, then a
//! key length and a value length (`u32` each) per pair, then each key and
//! value followed by a NUL byte.
//!
//! Why whole: in Envoy every value the host returns is written into memory it
//! first asks the VM to allocate, a second crossing into the VM that costs far
//! more than the lookup (`make bench`'s probe: about 1.7 µs of Envoy CPU per
//! value returned, 0.3 µs for a lookup that finds nothing). One map read per
//! callback, then lookups here, replaces one crossing per header.

/// A serialized header map, read in place. Malformed bytes read as fewer
/// pairs, never as a panic.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderBlock {
    bytes: Vec<u8>,
}

impl HeaderBlock {
    pub fn new(bytes: Vec<u8>) -> Self {
        HeaderBlock { bytes }
    }

    /// The serialized form of `pairs` (what the host would hand over).
    pub fn serialize<'a>(pairs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> Vec<u8> {
        let pairs: Vec<(&[u8], &[u8])> = pairs.into_iter().collect();
        let mut out = Vec::new();
        out.extend_from_slice(&u32::try_from(pairs.len()).unwrap_or(u32::MAX).to_le_bytes());
        for (k, v) in &pairs {
            out.extend_from_slice(&u32::try_from(k.len()).unwrap_or(u32::MAX).to_le_bytes());
            out.extend_from_slice(&u32::try_from(v.len()).unwrap_or(u32::MAX).to_le_bytes());
        }
        for (k, v) in &pairs {
            out.extend_from_slice(k);
            out.push(0);
            out.extend_from_slice(v);
            out.push(0);
        }
        out
    }

    /// Every pair, in the host's order.
    pub fn pairs(&self) -> Pairs<'_> {
        let (sizes, data) = self.split();
        Pairs { sizes: sizes.chunks_exact(8), data, at: 0 }
    }

    /// The first value of `name`, as Envoy's single-value lookup returns the
    /// first of repeated headers. Envoy's header names are lowercase (HTTP/2
    /// requires it, its HTTP/1 codec folds them), so `name` is given
    /// lowercase and compared as bytes.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        // The hot path of every callback: lengths are compared first, and a
        // key's bytes only when its length matches.
        let name = name.as_bytes();
        let (sizes, data) = self.split();
        let mut at = 0usize;
        for pair in sizes.chunks_exact(8) {
            let (klen, vlen) = lengths(pair);
            if klen == name.len() && data.get(at..at.saturating_add(klen)) == Some(name) {
                let value = at.saturating_add(klen).saturating_add(1);
                return data.get(value..value.saturating_add(vlen));
            }
            at = at.saturating_add(klen).saturating_add(vlen).saturating_add(2);
        }
        None
    }

    /// The size table and the keys and values after it. A count larger than
    /// the block could hold (each pair takes at least 8 bytes of sizes and 2
    /// NULs) is cut to what it could.
    fn split(&self) -> (&[u8], &[u8]) {
        let count = match self.bytes.as_slice() {
            [a, b, c, d, ..] => u32::from_le_bytes([*a, *b, *c, *d]) as usize,
            _ => 0,
        };
        let end = 4 + count.min(self.bytes.len() / 10) * 8;
        (self.bytes.get(4..end).unwrap_or_default(), self.bytes.get(end..).unwrap_or_default())
    }
}

/// A key's and a value's length from one 8-byte entry of the size table.
fn lengths(pair: &[u8]) -> (usize, usize) {
    match pair {
        [a, b, c, d, e, f, g, h] => {
            (u32::from_le_bytes([*a, *b, *c, *d]) as usize, u32::from_le_bytes([*e, *f, *g, *h]) as usize)
        }
        _ => (usize::MAX, usize::MAX),
    }
}

pub struct Pairs<'a> {
    sizes: std::slice::ChunksExact<'a, u8>,
    data: &'a [u8],
    /// Where the next key starts in `data`.
    at: usize,
}

impl<'a> Iterator for Pairs<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let (klen, vlen) = lengths(self.sizes.next()?);
        let key = self.data.get(self.at..self.at.saturating_add(klen))?;
        let value_at = self.at.saturating_add(klen).saturating_add(1);
        let value = self.data.get(value_at..value_at.saturating_add(vlen))?;
        self.at = value_at.saturating_add(vlen).saturating_add(1);
        Some((key, value))
    }
}

#[cfg(test)]
mod tests {
    use super::HeaderBlock;
    use proptest::prelude::*;

    fn block(pairs: &[(&str, &str)]) -> HeaderBlock {
        HeaderBlock::new(HeaderBlock::serialize(pairs.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes()))))
    }

    #[test]
    fn a_header_is_found_by_name_and_the_first_of_repeats_wins() {
        let b = block(&[(":path", "/pkg.Svc/Get"), ("grpc-timeout", "1S"), ("grpc-timeout", "2S"), ("empty", "")]);
        assert_eq!(b.get(":path"), Some(&b"/pkg.Svc/Get"[..]));
        assert_eq!(b.get("grpc-timeout"), Some(&b"1S"[..]));
        assert_eq!(b.get("empty"), Some(&b""[..]));
        assert_eq!(b.get("absent"), None);
        assert_eq!(b.pairs().count(), 4);
    }

    #[test]
    fn an_empty_or_short_block_has_no_pairs() {
        for bytes in [vec![], vec![1], vec![5, 0, 0, 0], vec![0xff; 3]] {
            assert_eq!(HeaderBlock::new(bytes).pairs().count(), 0);
        }
    }

    proptest! {
        #[test]
        fn pairs_round_trip(pairs in proptest::collection::vec(("[a-z:-]{0,12}", proptest::collection::vec(any::<u8>(), 0..40)), 0..12)) {
            let bytes = HeaderBlock::serialize(pairs.iter().map(|(k, v)| (k.as_bytes(), v.as_slice())));
            let b = HeaderBlock::new(bytes);
            let back: Vec<(Vec<u8>, Vec<u8>)> = b.pairs().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
            let want: Vec<(Vec<u8>, Vec<u8>)> = pairs.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.clone())).collect();
            prop_assert_eq!(back, want);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), name in "[a-z]{0,4}") {
            let b = HeaderBlock::new(bytes);
            let _ = b.get(&name);
            prop_assert!(b.pairs().count() <= 20);
        }
    }
}
