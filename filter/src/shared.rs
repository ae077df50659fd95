//! Compare-and-swap over proxy-wasm shared data, the only state Envoy's
//! worker threads share (each worker runs its own VM).
//!
//! Shared data is a map of string keys to bytes, each value with a version
//! token (`cas`): a write carrying the token of the value it read fails with
//! a mismatch if another worker wrote the key in between (proxy-wasm ABI,
//! `proxy_set_shared_data`). Envoy accepts any token for a key that does not
//! exist yet, so keys that workers race on are created before calls run.
//!
//! Every writer here goes through [`update`]: read, decide, write if nobody
//! wrote in between, otherwise read again. The method table and the dedup
//! table both use it.

use std::borrow::Cow;

use thiserror::Error;

/// Where shared values are kept: proxy-wasm shared data in the filter, a map
/// in the tests.
pub trait SharedStore {
    /// The value under `key` (`None` if it was never written) and its token.
    fn get(&mut self, key: &str) -> (Option<Vec<u8>>, Option<u32>);
    /// Writes `value` if the key's token is still `cas`.
    fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum StoreError {
    #[error("the value changed since it was read")]
    CasMismatch,
    #[error("the host refused to store the value")]
    Failed,
}

/// What an update decides after reading the current value.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision<'a, T> {
    /// Leave the value as it is; the update's result is `T`.
    Keep(T),
    /// Replace the value; once written, the update's result is `T`.
    Write(Cow<'a, [u8]>, T),
}

/// Why an update did not complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum UpdateError {
    #[error("other workers kept changing the value")]
    Contended,
    #[error("the host refused to store the value")]
    Failed,
}

/// Reads `key`, lets `decide` choose, and writes its choice only if nobody
/// wrote the key since the read; on a conflict it reads and decides again,
/// at most `attempts` times. `decide` sees an absent value as empty.
pub fn update<'a, S, T, F>(store: &mut S, key: &str, attempts: usize, mut decide: F) -> Result<T, UpdateError>
where
    S: SharedStore + ?Sized,
    F: FnMut(&[u8]) -> Decision<'a, T>,
{
    for _ in 0..attempts {
        let (value, cas) = store.get(key);
        match decide(value.as_deref().unwrap_or_default()) {
            Decision::Keep(result) => return Ok(result),
            Decision::Write(new, result) => match store.set(key, &new, cas) {
                Ok(()) => return Ok(result),
                Err(StoreError::CasMismatch) => continue,
                Err(StoreError::Failed) => return Err(UpdateError::Failed),
            },
        }
    }
    Err(UpdateError::Contended)
}

/// Creates `key` empty if it does not exist, so that later writers race on
/// it with compare-and-swap (see the module docs).
pub fn create<S: SharedStore + ?Sized>(store: &mut S, key: &str) {
    if store.get(key).0.is_none() {
        let _ = store.set(key, b"", None);
    }
}

/// A store for native tests: shared data as Envoy keeps it, where every
/// write bumps one global token. `interfere` runs before every read and
/// write, standing for another worker that acts in between.
#[cfg(any(test, feature = "fuzzing"))]
pub mod testing {
    use std::collections::HashMap;

    use super::{SharedStore, StoreError};

    type Interference = Box<dyn FnMut(&mut HashMap<String, (Vec<u8>, u32)>, &mut u32)>;

    #[derive(Default)]
    pub struct MapStore {
        pub values: HashMap<String, (Vec<u8>, u32)>,
        next_cas: u32,
        interfere: Option<Interference>,
        pub writes: usize,
    }

    impl MapStore {
        /// From now on, `f` may change values before each read or write.
        pub fn interfere_with(&mut self, f: impl FnMut(&mut HashMap<String, (Vec<u8>, u32)>, &mut u32) + 'static) {
            self.interfere = Some(Box::new(f));
        }

        pub fn value(&self, key: &str) -> Option<&[u8]> {
            self.values.get(key).map(|(v, _)| v.as_slice())
        }

        fn interfere(&mut self) {
            if let Some(f) = self.interfere.as_mut() {
                f(&mut self.values, &mut self.next_cas);
            }
        }
    }

    impl SharedStore for MapStore {
        fn get(&mut self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
            self.interfere();
            match self.values.get(key) {
                Some((v, cas)) => (Some(v.clone()), Some(*cas)),
                None => (None, None),
            }
        }

        fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
            self.interfere();
            if let (Some((_, current)), Some(cas)) = (self.values.get(key), cas) {
                if *current != cas {
                    return Err(StoreError::CasMismatch);
                }
            }
            self.next_cas += 1;
            self.writes += 1;
            self.values.insert(key.to_owned(), (value.to_vec(), self.next_cas));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::MapStore;
    use super::*;

    fn append(byte: u8) -> impl FnMut(&[u8]) -> Decision<'static, usize> {
        move |current| {
            let mut new = current.to_vec();
            new.push(byte);
            let len = new.len();
            Decision::Write(new.into(), len)
        }
    }

    #[test]
    fn update_writes_when_nobody_else_did() {
        let mut store = MapStore::default();
        create(&mut store, "k");
        assert_eq!(update(&mut store, "k", 3, append(b'a')), Ok(1));
        assert_eq!(store.value("k"), Some(&b"a"[..]));
    }

    #[test]
    fn update_that_keeps_writes_nothing() {
        let mut store = MapStore::default();
        create(&mut store, "k");
        let writes = store.writes;
        assert_eq!(update(&mut store, "k", 3, |v: &[u8]| Decision::<usize>::Keep(v.len())), Ok(0));
        assert_eq!(store.writes, writes);
    }

    #[test]
    fn a_write_between_read_and_write_is_not_lost_the_update_decides_again() {
        // Another worker appends 'b' right after our first read.
        let mut store = MapStore::default();
        create(&mut store, "k");
        let mut calls = 0;
        store.interfere_with(move |values, cas| {
            calls += 1;
            if calls == 2 {
                let (v, c) = values.get_mut("k").unwrap();
                v.push(b'b');
                *cas += 1;
                *c = *cas;
            }
        });
        assert_eq!(update(&mut store, "k", 3, append(b'a')), Ok(2));
        assert_eq!(store.value("k"), Some(&b"ba"[..]), "both writers' changes survive");
    }

    #[test]
    fn update_gives_up_as_contended_when_the_value_never_holds_still() {
        let mut store = MapStore::default();
        create(&mut store, "k");
        store.interfere_with(|values, cas| {
            let (_, c) = values.get_mut("k").unwrap();
            *cas += 1;
            *c = *cas;
        });
        assert_eq!(update(&mut store, "k", 4, append(b'a')), Err(UpdateError::Contended));
    }

    #[test]
    fn create_leaves_an_existing_value_alone() {
        let mut store = MapStore::default();
        store.set("k", b"kept", None).unwrap();
        create(&mut store, "k");
        assert_eq!(store.value("k"), Some(&b"kept"[..]));
    }
}
