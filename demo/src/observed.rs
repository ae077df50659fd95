use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tonic::metadata::{KeyAndValueRef, MetadataMap};

/// What the demo server saw, shared between the server and the test that
/// started it. Cloning shares the same record.
#[derive(Clone, Default)]
pub struct Observed {
    inner: Arc<Mutex<Record>>,
}

#[derive(Default)]
struct Record {
    executions: HashMap<&'static str, u64>,
    completions: HashMap<&'static str, u64>,
    last_metadata: HashMap<String, String>,
    /// Handler entries per `idempotency-key` request header value.
    by_key: HashMap<String, u64>,
}

impl Observed {
    /// How many times the handler for `method` ("Echo", "Count", "Collect")
    /// was entered.
    pub fn executions(&self, method: &str) -> u64 {
        self.record().executions.get(method).copied().unwrap_or(0)
    }

    /// How many times the handler for `method` ran to its end, delay included.
    /// Less than [`Observed::executions`] while calls are in flight or when a
    /// caller gave up before the handler finished.
    pub fn completions(&self, method: &str) -> u64 {
        self.record().completions.get(method).copied().unwrap_or(0)
    }

    /// The raw `grpc-timeout` request header of the last call, as the upstream
    /// received it, so tests can see what deadline a proxy forwarded.
    pub fn last_grpc_timeout(&self) -> Option<String> {
        self.last_metadata("grpc-timeout")
    }

    /// How many times a handler was entered for each `idempotency-key`
    /// the calls carried: what "at most once" is checked against.
    pub fn executions_by_key(&self) -> HashMap<String, u64> {
        self.record().by_key.clone()
    }

    /// An ASCII request metadata value of the last call.
    pub fn last_metadata(&self, key: &str) -> Option<String> {
        self.record().last_metadata.get(&key.to_ascii_lowercase()).cloned()
    }

    /// Records a handler entry and returns how many times `method` has now
    /// executed, this call included.
    pub(crate) fn entered(&self, method: &'static str, metadata: &MetadataMap) -> u64 {
        let mut record = self.record();
        record.last_metadata = ascii_metadata(metadata);
        if let Some(key) = record.last_metadata.get("idempotency-key").cloned() {
            *record.by_key.entry(key).or_insert(0) += 1;
        }
        let count = record.executions.entry(method).or_insert(0);
        *count += 1;
        *count
    }

    pub(crate) fn completed(&self, method: &'static str) {
        *self.record().completions.entry(method).or_insert(0) += 1;
    }

    fn record(&self) -> MutexGuard<'_, Record> {
        // A handler that panicked mid-update leaves counters that are still
        // meaningful; keep serving them rather than failing every later call.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn ascii_metadata(metadata: &MetadataMap) -> HashMap<String, String> {
    metadata
        .iter()
        .filter_map(|entry| match entry {
            KeyAndValueRef::Ascii(key, value) => {
                value.to_str().ok().map(|value| (key.as_str().to_owned(), value.to_owned()))
            }
            KeyAndValueRef::Binary(..) => None,
        })
        .collect()
}
