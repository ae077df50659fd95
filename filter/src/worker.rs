//! What one Envoy worker holds for all its calls. Each worker thread runs its
//! own VM, so this is per worker; what workers share lives in shared data
//! ([`crate::shared`]).

use crate::config::{Config, ConfigError, DedupStore};
use crate::record::Sampler;
use crate::registry::Registry;
use crate::shared::SharedStore;

#[derive(Debug)]
pub struct Worker {
    pub config: Config,
    pub methods: Registry,
    pub sampler: Sampler,
    /// Tells this worker's dedup claims from other workers' (the clock when
    /// it was configured).
    seed: u64,
    /// The lease this worker puts etcd entries under (`dedup.store: etcd`).
    pub etcd_lease: Option<crate::etcd::Lease>,
}

impl Worker {
    /// Validates the plugin configuration and creates the shared tables it
    /// needs, before any call runs. `seed` differs between workers (the
    /// clock will do).
    pub fn configure(json: &[u8], store: &mut (impl SharedStore + ?Sized), seed: u64) -> Result<Worker, ConfigError> {
        let config = Config::parse(json)?;
        Registry::create_table(&config, store);
        if let Some(dedup) = config.dedup.as_ref().filter(|d| d.store == DedupStore::Local) {
            dedup.table().create(store);
        }
        Ok(Worker { sampler: Sampler::new(config.ok_sample), methods: Registry::new(), config, seed, etcd_lease: None })
    }

    /// The etcd store's settings, when the dedup table lives there.
    pub fn etcd(&self) -> Option<&crate::etcd::EtcdConfig> {
        match &self.config.dedup.as_ref()?.store {
            DedupStore::Etcd(etcd) => Some(etcd),
            DedupStore::Local => None,
        }
    }

    /// The owner of a claim made by `stream`, started at `start_ns`: unique
    /// among this worker's streams and, by the seed, across workers.
    pub fn owner_id(&self, stream: u32, start_ns: u64) -> u64 {
        // Mixed, not XORed: no two (seed, stream, start) that differ should
        // share an owner, since the etcd store takes a claim that carries
        // its owner for its own.
        mix(self.seed ^ mix(u64::from(stream) ^ mix(start_ns)))
    }
}

/// SplitMix64's finalizer: a bijection of u64 that spreads every bit.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
