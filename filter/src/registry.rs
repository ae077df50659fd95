//! What a request path means to grpc-guard, worked out once per path and
//! remembered per worker: the method's metric slot and labels, its
//! `grpc_type`, its deadline and size policy, and whether it is
//! deduplicated.
//!
//! Labels are bounded across all workers by the shared method table
//! ([`AdmittedMethods`], updated with [`crate::shared::update`]): a method
//! gets a slot of its own only when it is allowed, among the first
//! `max_methods`, and has earned it: the upstream answered one of its calls
//! with something other than UNIMPLEMENTED ([`Registry::admit`]). Until then
//! its calls are [`PENDING_SLOT`] candidates, whose metrics wait for that
//! answer. Every other method shares slot 0, `other`, but still gets its own
//! policy. A flood of made-up paths costs a bounded cache, takes no label
//! from a real method, and defines no new stats.

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

/// The slot of a call whose method has not earned a label yet: its metrics
/// wait until the upstream's answer tells a real method from a made-up one.
pub const PENDING_SLOT: usize = usize::MAX;

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
    /// Metric slot: the method's own, [`OTHER_SLOT`], or [`PENDING_SLOT`]
    /// for a method that may yet earn a label.
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
    /// Not admitted yet: a candidate, asked again at its next call.
    NotYet,
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
            Labelled::Yes => resolved.slot = self.push_labels(&parsed, resolved.grpc_type),
            Labelled::No if self.folded < FOLDED_CACHE => self.folded += 1,
            Labelled::No => return resolved,
            Labelled::NotYet => {
                resolved.slot = PENDING_SLOT;
                return resolved;
            }
        }
        self.by_path.insert(path.to_owned(), resolved);
        resolved
    }

    fn push_labels(&mut self, parsed: &MethodPath<'_>, grpc_type: MethodType) -> usize {
        self.labels.push(Labels { service: parsed.service.to_owned(), method: parsed.method.to_owned(), grpc_type });
        self.labels.len() - 1
    }

    /// Whether `full_name` has a label: read from the shared table, never
    /// written here.
    fn labelled(&mut self, config: &Config, full_name: &str, store: &mut (impl SharedStore + ?Sized)) -> Labelled {
        if !config.method_allowed(full_name) {
            return Labelled::No;
        }
        if let Some(table) = &self.full {
            return if table.contains(full_name) { Labelled::Yes } else { Labelled::No };
        }
        let (bytes, _) = store.get(table_key(config.direction));
        let bytes = bytes.unwrap_or_default();
        // Read in place: a flood of made-up paths reads the table at each
        // call, and must not build it each time.
        let names = || bytes.split(|b| *b == b'\n').filter(|name| !name.is_empty());
        if names().any(|name| name == full_name.as_bytes()) {
            return Labelled::Yes;
        }
        if names().count() >= config.max_methods {
            self.full = Some(AdmittedMethods::from_bytes(&bytes));
            return Labelled::No;
        }
        if !config.method_named(full_name) {
            return Labelled::NotYet;
        }
        match self.store_label(config, full_name, store) {
            Some(true) => Labelled::Yes,
            Some(false) => Labelled::No,
            // Busy: its next call tries again.
            None => Labelled::NotYet,
        }
    }

    /// Writes `full_name` into the shared table: `Some(true)` once it is
    /// there, `Some(false)` if the table is full, `None` if other workers
    /// kept it too busy.
    fn store_label(
        &mut self,
        config: &Config,
        full_name: &str,
        store: &mut (impl SharedStore + ?Sized),
    ) -> Option<bool> {
        let mut full = None;
        let admitted = shared::update(store, table_key(config.direction), CAS_ATTEMPTS, |bytes| {
            let table = AdmittedMethods::from_bytes(bytes);
            match table.admit(full_name, config.max_methods) {
                Admission::Known => Decision::Keep(true),
                Admission::Full => {
                    full = Some(table);
                    Decision::Keep(false)
                }
                Admission::Store(new) => Decision::Write(new.into(), true),
            }
        });
        if full.is_some() {
            self.full = full;
        }
        admitted.ok()
    }

    /// A call of the candidate `path` was answered by its upstream with
    /// something other than UNIMPLEMENTED: the method is real and takes a
    /// label if one is left. The slot its metrics go to ([`OTHER_SLOT`]
    /// when the table is full or too busy).
    pub fn admit(&mut self, config: &Config, path: &str, store: &mut (impl SharedStore + ?Sized)) -> usize {
        let resolved = self.resolve(config, path, store);
        if resolved.slot != PENDING_SLOT {
            return resolved.slot;
        }
        let Some(parsed) = MethodPath::parse(path) else { return OTHER_SLOT };
        match self.store_label(config, &parsed.full_name(), store) {
            Some(true) => {
                let slot = self.push_labels(&parsed, resolved.grpc_type);
                self.by_path.insert(path.to_owned(), Resolved { slot, ..resolved });
                slot
            }
            // Full: the next resolve folds it for good. Busy: this call's
            // metrics count as `other`, and its next call is a candidate again.
            Some(false) | None => OTHER_SLOT,
        }
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
    fn a_method_is_a_candidate_until_answered_unless_the_configuration_names_it() {
        let c = config(
            r#"{"metrics":{"method_types":{"pkg.Svc/Watch":"server_stream"}},
                "deadline":{"per_method":{"pkg.Svc/Watch":{"max":"5s"}}},
                "dedup":{"methods":["pkg.Svc/Cr*"]}}"#,
        );
        let mut store = MapStore::default();
        let mut r = worker(&c, &mut store);
        let create = r.resolve(&c, "/pkg.Svc/Create", &mut store);
        assert_eq!(create.slot, PENDING_SLOT, "no label before the upstream has answered it");
        assert!(create.dedup, "its policy applies from the first call");
        assert_eq!(create.split, Some(8));
        assert_eq!(r.admit(&c, "/pkg.Svc/Create", &mut store), 1);
        assert_eq!(r.resolve(&c, "/pkg.Svc/Create", &mut store).slot, 1);
        // A method the configuration names is real: labelled at once.
        let watch = r.resolve(&c, "/pkg.Svc/Watch", &mut store);
        assert_eq!(watch.slot, 2);
        assert_eq!(watch.grpc_type, MethodType::ServerStream);
        assert_eq!(watch.policy, c.policy_for("pkg.Svc/Watch"));
        assert!(!watch.dedup);
        let labels = r.labels(2).unwrap();
        assert_eq!((labels.service, labels.method, labels.grpc_type), ("pkg.Svc", "Watch", "server_stream"));
    }

    #[test]
    fn a_method_named_without_a_star_in_metrics_methods_is_labelled_at_once() {
        let c = config(r#"{"metrics":{"methods":["pkg.Svc/Exact","pkg.Svc/*"]}}"#);
        let mut store = MapStore::default();
        let mut r = worker(&c, &mut store);
        assert_eq!(r.resolve(&c, "/pkg.Svc/Exact", &mut store).slot, 1);
        assert_eq!(r.resolve(&c, "/pkg.Svc/Other", &mut store).slot, PENDING_SLOT);
    }

    #[test]
    fn a_known_path_is_resolved_once_per_worker() {
        let c = config("{}");
        let mut store = MapStore::default();
        let mut r = worker(&c, &mut store);
        r.admit(&c, "/pkg.Svc/Get", &mut store);
        let writes = store.writes;
        store.interfere_with(|_, _| panic!("a known path must not touch shared data"));
        assert_eq!(r.resolve(&c, "/pkg.Svc/Get", &mut store).slot, 1);
        assert_eq!(store.writes, writes);
    }

    #[test]
    fn a_method_another_worker_admitted_has_its_label_at_once() {
        let c = config("{}");
        let mut store = MapStore::default();
        let mut a = worker(&c, &mut store);
        let mut b = Registry::new();
        assert_eq!(b.resolve(&c, "/pkg.Svc/Get", &mut store).slot, PENDING_SLOT);
        a.admit(&c, "/pkg.Svc/Get", &mut store);
        assert_eq!(b.resolve(&c, "/pkg.Svc/Get", &mut store).slot, 1);
    }

    #[test]
    fn folded_methods_share_the_other_slot_but_keep_their_own_settings() {
        let c = config(
            r#"{"metrics":{"max_methods":1},"limits":{"per_method":{"pkg.Svc/Big":{"max_request_message_bytes":9}}},
                "dedup":{"methods":["pkg.Svc/Big"]}}"#,
        );
        let mut store = MapStore::default();
        let mut r = worker(&c, &mut store);
        assert_eq!(r.admit(&c, "/pkg.Svc/Get", &mut store), 1);
        let big = r.resolve(&c, "/pkg.Svc/Big", &mut store);
        assert_eq!(big.slot, OTHER_SLOT);
        assert_eq!(big.policy.max_request_message_bytes, Some(9));
        assert!(big.dedup);
        assert_eq!(big.split, Some(8));
        assert_eq!(r.admit(&c, "/pkg.Svc/Big", &mut store), OTHER_SLOT, "the table is full");
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
        assert_eq!(a.admit(&c, "/pkg.Svc/A", &mut store), 1);
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
        assert_eq!(r.admit(&c, "/pkg.Svc/Get", &mut store), OTHER_SLOT);
        store.interfere_with(|_, _| {});
        assert_eq!(r.resolve(&c, "/pkg.Svc/Get", &mut store).slot, PENDING_SLOT, "still a candidate");
        assert_eq!(r.admit(&c, "/pkg.Svc/Get", &mut store), 1);
    }

    #[test]
    fn a_flood_of_made_up_paths_takes_no_label_and_no_memory() {
        let c = config(r#"{"metrics":{"max_methods":1}}"#);
        let mut store = MapStore::default();
        let mut r = worker(&c, &mut store);
        for n in 0..2 * FOLDED_CACHE {
            assert_eq!(r.resolve(&c, &format!("/pkg.Svc/M{n}"), &mut store).slot, PENDING_SLOT);
        }
        assert!(r.by_path.is_empty(), "candidates are not remembered");
        assert_eq!(r.admit(&c, "/pkg.Svc/Real", &mut store), 1, "the one label is still there for a real method");
        for n in 0..2 * FOLDED_CACHE {
            r.resolve(&c, &format!("/pkg.Svc/N{n}"), &mut store);
        }
        assert_eq!(r.by_path.len(), 1 + FOLDED_CACHE, "once the table is full, folded paths are cached, boundedly");
    }
}
