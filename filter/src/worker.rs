//! What one Envoy worker holds for all its calls. Each worker thread runs its
//! own VM, so this is per worker; what workers share lives in shared data
//! ([`crate::shared`]).

use crate::config::{Config, ConfigError};
use crate::dedup::DedupTable;
use crate::record::Sampler;
use crate::registry::Registry;
use crate::shared::SharedStore;

#[derive(Debug)]
pub struct Worker {
    pub config: Config,
    pub methods: Registry,
    pub sampler: Sampler,
}

impl Worker {
    /// Validates the plugin configuration and creates the shared tables it
    /// needs, before any call runs.
    pub fn configure(json: &[u8], store: &mut (impl SharedStore + ?Sized)) -> Result<Worker, ConfigError> {
        let config = Config::parse(json)?;
        Registry::create_table(&config, store);
        if let Some(dedup) = &config.dedup {
            DedupTable::new(dedup).create_slots(store);
        }
        Ok(Worker { sampler: Sampler::new(config.ok_sample), methods: Registry::new(), config })
    }
}
