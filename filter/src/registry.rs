//! What a request path means to grpc-guard, worked out once per path and
//! remembered per worker: the method's metric slot and labels, its
//! `grpc_type`, its deadline and size policy, and whether it is
//! deduplicated.
//!
//! Labels are bounded across all workers by the shared method table
//! ([`AdmittedMethods`], updated with [`crate::shared::update`]): a method
//! gets a slot of its own only when it is allowed and among the first
//! `max_methods`; every other method shares slot 0, `other`, but still gets
//! its own policy. A flood of random paths costs a bounded cache and no new
//! stats.

use std::collections::HashMap;

use crate::config::{Config, MethodPolicy};
use crate::method::{Admission, AdmittedMethods, Direction, FnvBuildHasher, MethodPath, MethodType, OTHER};
use crate::metrics::MethodLabels;
use crate::shared::{self, Decision, SharedStore};

/// How often a worker retries the compare-and-swap of the method table before
/// folding the method into `other` for this call.
const CAS_ATTEMPTS: usize = 8;

/// Folded methods whose settings are remembered per worker; past this, a
/// folded method's settings are worked out per call (a flood of made-up
/// paths must not grow memory).
const FOLDED_CACHE: usize = 256;

/// The slot every folded method counts under.
pub const OTHER_SLOT: usize = 0;

/// Shared-data key of the method table, one per direction.
pub fn table_key(direction: Direction) -> &'static str {
    match direction {
        Direction::Inbound => "grpc_guard.methods.inbound",
        Direction::Outbound => "grpc_guard.methods.outbound",
    }
}

/// Everything a call needs to know about its method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// Metric slot: the method's own, or [`OTHER_SLOT`].
    pub slot: usize,
    pub grpc_type: MethodType,
    pub policy: MethodPolicy,
    /// Calls are deduplicated by idempotency key.
    pub dedup: bool,
    /// Where `:path` splits into `/service` and `/method`, if it is a
    /// well-formed gRPC method path.
    pub split: Option<usize>,
}

/// One slot's labels.
#[derive(Clone, Debug)]
struct Labels {
    service: String,
    method: String,
    grpc_type: MethodType,
}

/// How the shared table answered for a method.
enum Labelled {
    Yes,
    /// Not now and never on this worker: not allowed, or the table is full.
    No,
    /// Other workers kept the table busy: folded for this call only.
    NotNow,
}

/// The per-worker registry.
#[derive(Debug)]
pub struct Registry {
    by_path: HashMap<String, Resolved, FnvBuildHasher>,
    labels: Vec<Labels>,
    folded: usize,
    /// The shared table as read once it was full: it never changes after
    /// that, so a miss is answered from this copy without a host call, and a
    /// method another worker admitted still gets its label here.
    full: Option<AdmittedMethods>,
}

impl Registry {
    pub fn new() -> Registry {
        let other = Labels { service: OTHER.to_owned(), method: OTHER.to_owned(), grpc_type: MethodType::Unary };
        Registry { by_path: HashMap::default(), labels: vec![other], folded: 0, full: None }
    }

    /// Creates the shared method table before any call, so admissions are
    /// always compare-and-swapped ([`crate::shared::create`]).
    pub fn create_table(config: &Config, store: &mut (impl SharedStore + ?Sized)) {
        shared::create(store, table_key(config.direction));
    }

    /// The labels of a slot, for its stat names.
    pub fn labels(&self, slot: usize) -> Option<MethodLabels<'_>> {
        self.labels.get(slot).map(|l| MethodLabels {
            service: &l.service,
            method: &l.method,
            grpc_type: l.grpc_type.as_str(),
        })
    }

    /// What `path` means, from this worker's cache or worked out now.
    pub fn resolve(&mut self, config: &Config, path: &str, store: &mut (impl SharedStore + ?Sized)) -> Resolved {
        if let Some(resolved) = self.by_path.get(path) {
            return *resolved;
        }
        let Some(parsed) = MethodPath::parse(path) else {
            return Resolved {
                slot: OTHER_SLOT,
                grpc_type: MethodType::Unary,
                policy: config.global,
                dedup: false,
                split: None,
            };
        };
        let full_name = parsed.full_name();
        let mut resolved = Resolved {
            slot: OTHER_SLOT,
            grpc_type: config.method_type(&full_name),
            policy: config.policy_for(&full_name),
            dedup: config.dedup_applies(&full_name),
            split: Some(1 + parsed.service.len()),
        };
        match self.labelled(config, &full_name, store) {
            Labelled::Yes => {
                self.labels.push(Labels {
                    service: parsed.service.to_owned(),
                    method: parsed.method.to_owned(),
                    grpc_type: resolved.grpc_type,
                });
                resolved.slot = self.labels.len() - 1;
            }
            Labelled::No if self.folded < FOLDED_CACHE => self.folded += 1,
            Labelled::No | Labelled::NotNow => return resolved,
        }
        self.by_path.insert(path.to_owned(), resolved);
        resolved
    }

    fn labelled(&mut self, config: &Config, full_name: &str, store: &mut (impl SharedStore + ?Sized)) -> Labelled {
        if !config.method_allowed(full_name) {
            return Labelled::No;
        }
        if let Some(table) = &self.full {
            return if table.contains(full_name) { Labelled::Yes } else { Labelled::No };
        }
        let mut full = None;
        let admitted = shared::update(store, table_key(config.direction), CAS_ATTEMPTS, |bytes| {
            let table = AdmittedMethods::from_bytes(bytes);
            match table.admit(full_name, config.max_methods) {
                Admission::Known => Decision::Keep(Labelled::Yes),
                Admission::Full => {
                    full = Some(table);
                    Decision::Keep(Labelled::No)
                }
                Admission::Store(new) => Decision::Write(new.into(), Labelled::Yes),
            }
        });
        self.full = full;
        admitted.unwrap_or(Labelled::NotNow)
    }
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::testing::MapStore;

    fn config(json: &str) -> Config {
        Config::parse(json.as_bytes()).unwrap()
    }

    fn worker(config: &Config, store: &mut MapStore) -> Registry {
        Registry::create_table(config, store);
        Registry::new()
    }

    #[test]
    fn a_method_resolves_to_its_own_slot_labels_and_policy() {
        let c = config(
            r#"{"metrics":{"method_types":{"pkg.Svc/Watch":"server_stream"}},
                "deadline":{"per_method":{"pkg.Svc/Watch":{"max":"5s"}}},
                "dedup":{"methods":["pkg.Svc/Create"]}}"#,
        );
        let mut store = MapStore::default();
        let mut r = worker(&c, &mut store);
        let watch = r.resolve(&c, "/pkg.Svc/Watch", &mut store);
        assert_eq!(watch.slot, 1);
        assert_eq!(watch.grpc_type, MethodType::ServerStream);
        assert_eq!(watch.policy, c.policy_for("pkg.Svc/Watch"));
        assert!(!watch.dedup);
        assert_eq!(watch.split, Some(8));
        let labels = r.labels(1).unwrap();
        assert_eq!((labels.service, labels.method, labels.grpc_type), ("pkg.Svc", "Watch", "server_stream"));
        let create = r.resolve(&c, "/pkg.Svc/Create", &mut store);
        assert_eq!((create.slot, create.dedup), (2, true));
    }

    #[test]
    fn a_path_is_resolved_once_per_worker() {
        let c = config("{}");
        let mut store = MapStore::default();
        let mut r = worker(&c, &mut store);
        r.resolve(&c, "/pkg.Svc/Get", &mut store);
        let writes = store.writes;
        store.interfere_with(|_, _| panic!("a known path must not touch shared data"));
        assert_eq!(r.resolve(&c, "/pkg.Svc/Get", &mut store).slot, 1);
        assert_eq!(store.writes, writes);
    }

    #[test]
    fn folded_methods_share_the_other_slot_but_keep_their_own_settings() {
        let c = config(
            r#"{"metrics":{"max_methods":1},"limits":{"per_method":{"pkg.Svc/Big":{"max_request_message_bytes":9}}},
                "dedup":{"methods":["pkg.Svc/Big"]}}"#,
        );
        let mut store = MapStore::default();
        let mut r = worker(&c, &mut store);
        assert_eq!(r.resolve(&c, "/pkg.Svc/Get", &mut store).slot, 1);
        let big = r.resolve(&c, "/pkg.Svc/Big", &mut store);
        assert_eq!(big.slot, OTHER_SLOT);
        assert_eq!(big.policy.max_request_message_bytes, Some(9));
        assert!(big.dedup);
        assert_eq!(big.split, Some(8));
        let labels = r.labels(OTHER_SLOT).unwrap();
        assert_eq!((labels.service, labels.method), ("other", "other"));
    }

    #[test]
    fn malformed_paths_fold_with_the_global_policy_and_no_split() {
        let c = config(r#"{"deadline":{"default":"1s"},"dedup":{"methods":["*"]}}"#);
        let mut store = MapStore::default();
        let mut r = worker(&c, &mut store);
        let r = r.resolve(&c, "/pkg.Svc/Get?x=1", &mut store);
        assert_eq!((r.slot, r.dedup, r.split), (OTHER_SLOT, false, None));
        assert_eq!(r.policy, c.global);
    }

    #[test]
    fn two_workers_admitting_at_once_both_get_labels_and_the_bound_holds() {
        let c = config(r#"{"metrics":{"max_methods":2}}"#);
        let mut store = MapStore::default();
        let mut a = worker(&c, &mut store);
        let key = table_key(c.direction);
        // Another worker admits `pkg.Svc/B` between this worker's read of the
        // table and its write.
        let mut step = 0;
        store.interfere_with(move |values, cas| {
            step += 1;
            if step == 2 {
                let (v, c) = values.get_mut(key).unwrap();
                v.extend_from_slice(b"pkg.Svc/B\n");
                *cas += 1;
                *c = *cas;
            }
        });
        assert_eq!(a.resolve(&c, "/pkg.Svc/A", &mut store).slot, 1);
        let table = AdmittedMethods::from_bytes(store.value(key).unwrap());
        assert!(table.contains("pkg.Svc/A") && table.contains("pkg.Svc/B"), "{table:?}");
        assert_eq!(a.resolve(&c, "/pkg.Svc/B", &mut store).slot, 2, "B keeps the label the other worker gave it");
        assert_eq!(a.resolve(&c, "/pkg.Svc/C", &mut store).slot, OTHER_SLOT, "the bound is across workers");
    }

    #[test]
    fn a_method_folded_only_because_the_table_was_busy_is_tried_again() {
        let c = config("{}");
        let mut store = MapStore::default();
        let mut r = worker(&c, &mut store);
        let key = table_key(c.direction);
        store.interfere_with(move |values, cas| {
            let (_, c) = values.get_mut(key).unwrap();
            *cas += 1;
            *c = *cas;
        });
        assert_eq!(r.resolve(&c, "/pkg.Svc/Get", &mut store).slot, OTHER_SLOT);
        store.interfere_with(|_, _| {});
        assert_eq!(r.resolve(&c, "/pkg.Svc/Get", &mut store).slot, 1);
    }

    #[test]
    fn a_flood_of_made_up_paths_keeps_the_cache_bounded() {
        let c = config(r#"{"metrics":{"max_methods":1}}"#);
        let mut store = MapStore::default();
        let mut r = worker(&c, &mut store);
        for n in 0..2 * FOLDED_CACHE {
            r.resolve(&c, &format!("/pkg.Svc/M{n}"), &mut store);
        }
        assert_eq!(r.by_path.len(), 1 + FOLDED_CACHE);
    }
}
