//! State that outlives one VM: in Envoy every worker thread runs its own VM,
//! but shared data, stats and the clock belong to the process.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use super::abi::{MetricType, Status};

/// 2026-01-01T00:00:00Z: the fake realtime clock starts here so time-based
/// logic sees a plausible wall clock, the same in every run.
const EPOCH_NANOS: u64 = 1_767_225_600_000_000_000;

/// What every VM of one [`super::Host`] shares.
#[derive(Debug, Default)]
pub(crate) struct Process {
    pub(crate) shared_data: Mutex<SharedData>,
    pub(crate) metrics: Mutex<MetricStore>,
    pub(crate) clock: Clock,
}

/// A poisoned lock only means another test thread panicked; the data is
/// still what the filter wrote.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A clock that only moves when a test says so.
#[derive(Debug, Default)]
pub(crate) struct Clock {
    elapsed_nanos: AtomicU64,
}

impl Clock {
    pub(crate) fn advance(&self, by: Duration) {
        let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.elapsed_nanos.fetch_add(nanos, Ordering::SeqCst);
    }

    /// Nanoseconds since the Unix epoch, as `proxy_get_current_time_nanoseconds`
    /// and WASI's realtime clock report them.
    pub(crate) fn realtime_nanos(&self) -> u64 {
        EPOCH_NANOS.saturating_add(self.monotonic_nanos())
    }

    /// Nanoseconds since the host started, for WASI's monotonic clock.
    pub(crate) fn monotonic_nanos(&self) -> u64 {
        self.elapsed_nanos.load(Ordering::SeqCst)
    }
}

/// Envoy's shared-data store (proxy-wasm-cpp-host `SharedData`) for one VM id.
#[derive(Debug, Default)]
pub(crate) struct SharedData {
    entries: HashMap<Vec<u8>, (Vec<u8>, u32)>,
    last_cas: u32,
}

impl SharedData {
    /// The value and its CAS token, or `NotFound`.
    pub(crate) fn get(&self, key: &[u8]) -> Result<(Vec<u8>, u32), Status> {
        self.entries.get(key).cloned().ok_or(Status::NotFound)
    }

    /// Stores `value`. A non-zero `cas` must match the key's current token,
    /// else `CasMismatch`; a missing key accepts any `cas`, as in Envoy.
    /// Every successful set gets a fresh token.
    pub(crate) fn set(&mut self, key: &[u8], value: &[u8], cas: u32) -> Result<(), Status> {
        if let Some((_, current)) = self.entries.get(key) {
            if cas != 0 && cas != *current {
                return Err(Status::CasMismatch);
            }
        }
        let token = self.next_cas();
        self.entries.insert(key.to_vec(), (value.to_vec(), token));
        Ok(())
    }

    /// Tokens are never 0: the SDK reads 0 as "no token".
    fn next_cas(&mut self) -> u32 {
        self.last_cas = self.last_cas.wrapping_add(1);
        if self.last_cas == 0 {
            self.last_cas = 1;
        }
        self.last_cas
    }
}

#[derive(Debug, Clone)]
enum MetricValue {
    Counter(u64),
    Gauge(i64),
    Histogram(Vec<u64>),
}

/// Envoy's stats for custom metrics: one stat per (type, name), however many
/// VMs define it.
#[derive(Debug, Default)]
pub(crate) struct MetricStore {
    ids: HashMap<(MetricType, String), u32>,
    values: Vec<(String, MetricValue)>,
}

/// Envoy keeps the metric type in the low bits of the id
/// (`Wasm::kMetricTypeMask`), so an id alone says which kind it is.
const TYPE_BITS: u32 = 2;

impl MetricStore {
    pub(crate) fn define(&mut self, kind: MetricType, name: &str) -> u32 {
        if let Some(id) = self.ids.get(&(kind, name.to_owned())) {
            return *id;
        }
        let index = super::abi::len_u32(self.values.len());
        let id = (index << TYPE_BITS) | kind as u32;
        let value = match kind {
            MetricType::Counter => MetricValue::Counter(0),
            MetricType::Gauge => MetricValue::Gauge(0),
            MetricType::Histogram => MetricValue::Histogram(Vec::new()),
        };
        self.values.push((name.to_owned(), value));
        self.ids.insert((kind, name.to_owned()), id);
        id
    }

    fn value_mut(&mut self, id: u32) -> Result<&mut MetricValue, Status> {
        let index = usize::try_from(id >> TYPE_BITS).map_err(|_| Status::NotFound)?;
        self.values.get_mut(index).map(|(_, value)| value).ok_or(Status::NotFound)
    }

    /// Counters only go up (a non-positive offset is `BadArgument`, as in
    /// Envoy); gauges move either way; histograms cannot be incremented.
    pub(crate) fn increment(&mut self, id: u32, offset: i64) -> Result<(), Status> {
        match self.value_mut(id)? {
            MetricValue::Counter(value) if offset > 0 => {
                *value = value.saturating_add(offset.unsigned_abs());
                Ok(())
            }
            MetricValue::Gauge(value) => {
                *value = value.saturating_add(offset);
                Ok(())
            }
            MetricValue::Counter(_) | MetricValue::Histogram(_) => Err(Status::BadArgument),
        }
    }

    /// Counters add, gauges are set, histograms keep every sample.
    pub(crate) fn record(&mut self, id: u32, sample: u64) -> Result<(), Status> {
        match self.value_mut(id)? {
            MetricValue::Counter(value) => *value = value.saturating_add(sample),
            MetricValue::Gauge(value) => *value = i64::try_from(sample).unwrap_or(i64::MAX),
            MetricValue::Histogram(samples) => samples.push(sample),
        }
        Ok(())
    }

    /// A gauge below zero reads as Envoy's `u64` would after underflow.
    pub(crate) fn get(&mut self, id: u32) -> Result<u64, Status> {
        match self.value_mut(id)? {
            MetricValue::Counter(value) => Ok(*value),
            MetricValue::Gauge(value) => Ok(*value as u64),
            MetricValue::Histogram(_) => Err(Status::BadArgument),
        }
    }

    pub(crate) fn snapshot(&self) -> Metrics {
        let mut metrics = Metrics::default();
        for (name, value) in &self.values {
            match value {
                MetricValue::Counter(v) => {
                    metrics.counters.insert(name.clone(), *v);
                }
                MetricValue::Gauge(v) => {
                    metrics.gauges.insert(name.clone(), *v);
                }
                MetricValue::Histogram(v) => {
                    metrics.histograms.insert(name.clone(), v.clone());
                }
            }
        }
        metrics
    }
}

/// The custom metrics of every VM of a [`super::Host`] at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metrics {
    counters: BTreeMap<String, u64>,
    gauges: BTreeMap<String, i64>,
    histograms: BTreeMap<String, Vec<u64>>,
}

impl Metrics {
    /// `None` when the filter never defined a counter of that name.
    pub fn counter(&self, name: &str) -> Option<u64> {
        self.counters.get(name).copied()
    }

    pub fn gauge(&self, name: &str) -> Option<i64> {
        self.gauges.get(name).copied()
    }

    /// Every recorded sample, in recording order.
    pub fn histogram(&self, name: &str) -> Option<Vec<u64>> {
        self.histograms.get(name).cloned()
    }

    /// Every defined metric name, sorted, each once.
    pub fn names(&self) -> Vec<String> {
        let names: BTreeSet<&String> =
            self.counters.keys().chain(self.gauges.keys()).chain(self.histograms.keys()).collect();
        names.into_iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_data_get_of_a_missing_key_is_not_found() {
        assert_eq!(SharedData::default().get(b"k"), Err(Status::NotFound));
    }

    #[test]
    fn every_set_bumps_the_cas_token() {
        let mut data = SharedData::default();
        data.set(b"k", b"a", 0).unwrap();
        let (_, first) = data.get(b"k").unwrap();
        data.set(b"k", b"b", first).unwrap();
        let (value, second) = data.get(b"k").unwrap();
        assert_eq!(value, b"b");
        assert_ne!(first, second);
        assert_ne!(second, 0);
    }

    #[test]
    fn set_with_a_stale_cas_is_a_mismatch_and_keeps_the_value() {
        let mut data = SharedData::default();
        data.set(b"k", b"a", 0).unwrap();
        let (_, stale) = data.get(b"k").unwrap();
        data.set(b"k", b"b", 0).unwrap();
        assert_eq!(data.set(b"k", b"c", stale), Err(Status::CasMismatch));
        assert_eq!(data.get(b"k").unwrap().0, b"b");
    }

    #[test]
    fn set_of_a_new_key_ignores_the_cas_like_envoy() {
        let mut data = SharedData::default();
        assert_eq!(data.set(b"fresh", b"v", 42), Ok(()));
    }

    #[test]
    fn defining_a_metric_twice_returns_the_same_id() {
        let mut store = MetricStore::default();
        let id = store.define(MetricType::Counter, "calls");
        assert_eq!(store.define(MetricType::Counter, "calls"), id);
        assert_ne!(store.define(MetricType::Gauge, "calls"), id);
    }

    #[test]
    fn counters_refuse_non_positive_increments() {
        let mut store = MetricStore::default();
        let id = store.define(MetricType::Counter, "calls");
        assert_eq!(store.increment(id, 0), Err(Status::BadArgument));
        assert_eq!(store.increment(id, -1), Err(Status::BadArgument));
        store.increment(id, 2).unwrap();
        assert_eq!(store.snapshot().counter("calls"), Some(2));
    }

    #[test]
    fn gauges_move_both_ways_and_histograms_keep_every_sample() {
        let mut store = MetricStore::default();
        let gauge = store.define(MetricType::Gauge, "inflight");
        let histogram = store.define(MetricType::Histogram, "latency");
        store.increment(gauge, 1).unwrap();
        store.increment(gauge, -3).unwrap();
        store.record(histogram, 5).unwrap();
        store.record(histogram, 5).unwrap();
        store.record(histogram, 9).unwrap();
        let metrics = store.snapshot();
        assert_eq!(metrics.gauge("inflight"), Some(-2));
        assert_eq!(metrics.histogram("latency"), Some(vec![5, 5, 9]));
        assert_eq!(metrics.names(), ["inflight", "latency"]);
        assert_eq!(store.get(histogram), Err(Status::BadArgument));
    }

    #[test]
    fn an_unknown_metric_id_is_not_found() {
        assert_eq!(MetricStore::default().record(4, 1), Err(Status::NotFound));
    }

    #[test]
    fn the_clock_starts_at_2026_and_moves_only_when_advanced() {
        let clock = Clock::default();
        assert_eq!(clock.realtime_nanos(), EPOCH_NANOS);
        clock.advance(Duration::from_millis(1500));
        assert_eq!(clock.realtime_nanos(), EPOCH_NANOS + 1_500_000_000);
        assert_eq!(clock.monotonic_nanos(), 1_500_000_000);
    }
}
