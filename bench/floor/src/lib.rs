//! The floor of `make bench`: a Rust proxy-wasm HTTP filter that does
//! nothing. Envoy still enters its VM for every callback of every stream and
//! the SDK still dispatches them, so what this costs is what any Rust wasm
//! filter pays before it does any work; grpc-guard's cost is measured against
//! it. The filter is built for wasm32 only; on other targets the crate holds
//! only [`Probe`], which the bench reads.
//!
//! With a configuration such as `{"probe": "header", "n": 20}` it becomes a
//! probe for `make bench BENCH_ARGS=--prices`: each request's headers
//! callback makes `n` host calls of one kind, so their price in Envoy CPU can
//! be read against the floor (see [`Probe`]).
//!
//! With `{"probe": "trap", "n": 1}` its VM traps on any request that carries
//! the header `x-trap`: the end-to-end tests see what Envoy does with a
//! plugin whose VM failed, under the failure policy grpc-guard ships.

/// The kinds of host call the probe makes, by the name its configuration
/// gives them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// `proxy_get_header_map_value` of a header that is there (`:path`):
    /// the host writes the value into memory it asks the VM to allocate.
    Header,
    /// The same for a header that is not there: a lookup only.
    Absent,
    /// `proxy_get_header_map_pairs`: the whole map, one allocation.
    Pairs,
    /// `proxy_increment_metric` of a counter defined at configure time.
    Counter,
    /// `proxy_record_metric` of a histogram defined at configure time.
    Histogram,
    /// `proxy_set_property` of a filter-state value.
    SetProperty,
    /// `proxy_get_current_time_nanoseconds`.
    Clock,
    /// No host call: [`WORK_STEPS`] steps of arithmetic in the VM, about
    /// 1,000 wasm instructions (fuel on the wasmtime host), so the price of
    /// the VM's own work can be set beside the host calls'.
    Work,
    /// No host call: the VM traps when the request carries `x-trap`.
    Trap,
}

impl Probe {
    /// The probes `make bench BENCH_ARGS=--prices` prices.
    pub const ALL: [(&'static str, Probe); 8] = [
        ("header", Probe::Header),
        ("absent", Probe::Absent),
        ("pairs", Probe::Pairs),
        ("counter", Probe::Counter),
        ("histogram", Probe::Histogram),
        ("set_property", Probe::SetProperty),
        ("clock", Probe::Clock),
        ("work", Probe::Work),
    ];

    /// The probe and count a configuration asks for; `None` for the floor.
    /// The document is the bench's own (`{"probe":"header","n":20}`), read
    /// without a JSON library so the floor stays as small as it was.
    pub fn from_config(config: &str) -> Option<(Probe, u32)> {
        let value = |key: &str| -> Option<&str> {
            let rest = config.split(&format!("\"{key}\"")).nth(1)?.trim_start().strip_prefix(':')?.trim_start();
            let end = rest.find([',', '}']).unwrap_or(rest.len());
            Some(rest[..end].trim().trim_matches('"'))
        };
        let probe =
            Probe::ALL.iter().chain(&[("trap", Probe::Trap)]).find(|(name, _)| Some(*name) == value("probe"))?.1;
        Some((probe, value("n")?.parse().ok()?))
    }
}

/// Steps of [`work`] per `work` probe unit: about 1,000 fuel.
pub const WORK_STEPS: u32 = 47;

/// One unit of the `work` probe: arithmetic the compiler cannot fold away
/// (the seed and the result go through `black_box`), no memory, no calls.
pub fn work(seed: u64) -> u64 {
    let mut x = std::hint::black_box(seed) | 1;
    for _ in 0..std::hint::black_box(WORK_STEPS) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    std::hint::black_box(x)
}

#[cfg(target_arch = "wasm32")]
mod filter {
    use proxy_wasm::hostcalls;
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, BufferType, ContextType, MapType, MetricType};

    use super::Probe;

    proxy_wasm::main! {{
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { probe: None }) });
    }}

    #[derive(Clone, Copy)]
    struct Work {
        probe: Probe,
        n: u32,
        counter: u32,
        histogram: u32,
    }

    struct Root {
        probe: Option<Work>,
    }

    impl Context for Root {}

    impl RootContext for Root {
        fn on_configure(&mut self, _size: usize) -> bool {
            let config = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
                .ok()
                .flatten()
                .unwrap_or_default();
            self.probe = Probe::from_config(&String::from_utf8_lossy(&config)).map(|(probe, n)| Work {
                probe,
                n,
                counter: hostcalls::define_metric(MetricType::Counter, "probe_counter").unwrap_or(0),
                histogram: hostcalls::define_metric(MetricType::Histogram, "probe_histogram").unwrap_or(0),
            });
            true
        }

        fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Stream { probe: self.probe }))
        }

        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    /// Every callback is the SDK's default (continue), but the probe's.
    struct Stream {
        probe: Option<Work>,
    }

    impl Context for Stream {}

    impl HttpContext for Stream {
        fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
            let Some(w) = self.probe else { return Action::Continue };
            if w.probe == Probe::Trap {
                if let Ok(Some(_)) = hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, "x-trap") {
                    panic!("forced trap: the request carries x-trap");
                }
                return Action::Continue;
            }
            for _ in 0..w.n {
                let _ = match w.probe {
                    Probe::Header => hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, ":path").map(drop),
                    Probe::Absent => hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, "x-absent").map(drop),
                    Probe::Pairs => hostcalls::get_map_bytes(MapType::HttpRequestHeaders).map(drop),
                    Probe::Counter => hostcalls::increment_metric(w.counter, 1),
                    Probe::Histogram => hostcalls::record_metric(w.histogram, 7),
                    Probe::SetProperty => hostcalls::set_property(vec!["probe.tag"], Some(b"OK")),
                    Probe::Clock | Probe::Trap => hostcalls::get_current_time().map(drop),
                    Probe::Work => {
                        super::work(u64::from(w.n));
                        Ok(())
                    }
                };
            }
            Action::Continue
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Probe;

    #[test]
    fn the_bench_configuration_names_the_probe_and_the_floor_has_none() {
        assert_eq!(Probe::from_config(r#"{"probe":"header","n":20}"#), Some((Probe::Header, 20)));
        assert_eq!(Probe::from_config(r#"{ "n": 5, "probe": "set_property" }"#), Some((Probe::SetProperty, 5)));
        assert_eq!(Probe::from_config("{}"), None);
        assert_eq!(Probe::from_config(r#"{"probe":"nope","n":1}"#), None);
        assert_eq!(Probe::from_config(r#"{"probe":"trap","n":1}"#), Some((Probe::Trap, 1)));
    }
}
