//! The data of one wasmtime `Store`: everything one VM (one Envoy worker)
//! can reach through its hostcalls.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::shared::Process;
use super::stream::StreamState;
use super::LogLine;

pub(crate) struct VmState {
    pub(crate) process: Arc<Process>,
    pub(crate) plugin_config: Vec<u8>,
    /// `proxy_on_configure` is running: only then does Envoy expose the
    /// plugin configuration.
    pub(crate) configuring: bool,
    pub(crate) root_id: u32,
    /// The context hostcalls act on: the one whose callback runs, or the one
    /// chosen with `proxy_set_effective_context`.
    pub(crate) active: u32,
    pub(crate) streams: HashMap<u32, StreamState>,
    pub(crate) logs: Vec<LogLine>,
    pub(crate) tick_period: Option<Duration>,
    /// Hostcalls made, with the fuel left when each was made, once
    /// [`super::Vm::trace_hostcalls`] turned tracing on.
    pub(crate) trace: Option<std::cell::RefCell<Vec<(&'static str, u64)>>>,
    random: u64,
}

impl VmState {
    pub(crate) fn new(process: Arc<Process>, plugin_config: &str, root_id: u32) -> VmState {
        VmState {
            process,
            plugin_config: plugin_config.as_bytes().to_vec(),
            configuring: false,
            root_id,
            active: root_id,
            streams: HashMap::new(),
            logs: Vec::new(),
            tick_period: None,
            trace: None,
            random: 0x9E37_79B9_7F4A_7C15,
        }
    }

    /// A fixed xorshift sequence: `random_get` (hash-map seeds, ids) must be
    /// the same in every run for tests to be reproducible.
    pub(crate) fn random_bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            self.random ^= self.random << 13;
            self.random ^= self.random >> 7;
            self.random ^= self.random << 17;
            out.extend_from_slice(&self.random.to_le_bytes());
        }
        out.truncate(len);
        out
    }
}
