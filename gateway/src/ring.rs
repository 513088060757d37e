//! Consistent hashing with virtual nodes and bounded load (Mirrokni, Thorup, Zadimoghaddam,
//! "Consistent Hashing with Bounded Loads"): which worker a routing key lands on.
//!
//! Pure data: no I/O, no clocks. The pool ([`crate::health`]) rebuilds a [`Ring`] when its
//! membership changes and calls [`Ring::pick`] with the live load of each worker.

use std::collections::BTreeSet;

use sha2::{Digest, Sha256};

/// Virtual nodes per worker by default: enough for the shares of a handful of workers to
/// stay within about ±25 % of even.
pub const DEFAULT_VNODES: usize = 160;

/// Default load bound factor `c`: no worker takes more than `ceil(c × mean)` builds.
pub const DEFAULT_LOAD_BOUND: f64 = 1.25;

/// A stable 64-bit hash (the first 8 bytes of SHA-256), the same in every process and
/// release, so every gateway replica places a key on the same worker.
pub fn hash64(data: &[u8]) -> u64 {
    let d = Sha256::digest(data);
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_be_bytes(b)
}

/// A hash ring over named nodes.
#[derive(Debug, Clone, Default)]
pub struct Ring {
    /// `(point, node index)`, sorted by point (ties broken by node name order).
    points: Vec<(u64, usize)>,
    /// Node names, sorted and distinct.
    nodes: Vec<String>,
}

// === impl Ring ===

impl Ring {
    /// A ring over `nodes` (duplicates ignored) with `vnodes` points each (at least one).
    /// The result depends only on the set of names, never on their order.
    pub fn new<I, S>(nodes: I, vnodes: usize) -> Ring
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let nodes: Vec<String> = nodes
            .into_iter()
            .map(Into::into)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let vnodes = vnodes.max(1);
        let mut points = Vec::with_capacity(nodes.len() * vnodes);
        for (i, n) in nodes.iter().enumerate() {
            for v in 0..vnodes {
                points.push((hash64(format!("{n}#{v}").as_bytes()), i));
            }
        }
        points.sort_unstable();
        Ring { points, nodes }
    }

    /// The node names on the ring, sorted.
    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    /// True when the ring has no node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Every node once, in ring order starting at `key`'s position: the first is the key's
    /// home, the rest are where it overflows to.
    pub fn walk<'a>(&'a self, key: &str) -> impl Iterator<Item = &'a str> + 'a {
        let h = hash64(key.as_bytes());
        let start = self.points.partition_point(|(p, _)| *p < h);
        let n = self.points.len();
        let mut seen = vec![false; self.nodes.len()];
        let mut left = self.nodes.len();
        (0..n).filter_map(move |i| {
            if left == 0 {
                return None;
            }
            let (_, node) = self.points[(start + i) % n];
            if std::mem::replace(&mut seen[node], true) {
                return None;
            }
            left -= 1;
            Some(self.nodes[node].as_str())
        })
    }

    /// The key's home node, ignoring load and health.
    pub fn home(&self, key: &str) -> Option<&str> {
        self.walk(key).next()
    }

    /// The node that takes `key` under bounded load. `load(node)` is the node's in-flight
    /// count, or `None` when it cannot take builds (unhealthy, draining). With `n` available
    /// nodes carrying `m` builds in all, a node takes the key only while its load is below
    /// `ceil(c × (m + 1) / n)`; otherwise the key walks on. `None` when no node is available.
    pub fn pick<F>(&self, key: &str, c: f64, load: F) -> Option<&str>
    where
        F: Fn(&str) -> Option<usize>,
    {
        let loads: Vec<Option<usize>> = self.nodes.iter().map(|n| load(n)).collect();
        let available = loads.iter().flatten().count();
        if available == 0 {
            return None;
        }
        let total: usize = loads.iter().flatten().sum();
        let cap = capacity(c, total, available);
        self.walk(key).find(|n| {
            let i = self.nodes.partition_point(|x| x.as_str() < *n);
            matches!(loads.get(i), Some(Some(l)) if *l < cap)
        })
    }
}

/// Most builds one of `available` nodes may hold after one more is added to `total`:
/// `ceil(c × (total + 1) / available)`, at least 1. With `c ≥ 1` some node is always below it.
pub fn capacity(c: f64, total: usize, available: usize) -> usize {
    let c = if c.is_finite() && c >= 1.0 { c } else { 1.0 };
    let mean = (total as f64 + 1.0) / available.max(1) as f64;
    ((c * mean).ceil() as usize).max(1)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("worker-{i}")).collect()
    }

    fn keys(seed: u64, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("project-{seed}-{i}")).collect()
    }

    #[test]
    fn empty_ring_places_nothing() {
        let r = Ring::new(Vec::<String>::new(), 10);
        assert_eq!(r.home("k"), None);
        assert_eq!(r.pick("k", 1.25, |_| Some(0)), None);
    }

    #[test]
    fn walk_visits_every_node_once() {
        let r = Ring::new(names(5), 50);
        let w: Vec<&str> = r.walk("x").collect();
        assert_eq!(w.len(), 5);
        let set: BTreeSet<&str> = w.iter().copied().collect();
        assert_eq!(set.len(), 5);
    }

    #[test]
    fn unavailable_nodes_are_skipped() {
        let r = Ring::new(names(3), 50);
        let home = r.home("k").map(str::to_string);
        let picked = r.pick("k", 1.25, |n| (Some(n) != home.as_deref()).then_some(0));
        assert!(picked.is_some());
        assert_ne!(picked.map(str::to_string), home);
        assert_eq!(r.pick("k", 1.25, |_| None), None);
    }

    #[test]
    fn capacity_rounds_up() {
        assert_eq!(capacity(1.25, 0, 3), 1);
        assert_eq!(capacity(1.25, 11, 3), 5);
        assert_eq!(capacity(1.0, 5, 3), 2);
        assert_eq!(capacity(f64::NAN, 5, 3), 2);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Placement depends only on the set of nodes, not on the order they were given in.
        #[test]
        fn placement_is_deterministic(n in 1usize..8, seed in any::<u64>(), rot in 0usize..8) {
            let mut ns = names(n);
            let a = Ring::new(ns.clone(), DEFAULT_VNODES);
            ns.rotate_left(rot % n);
            ns.reverse();
            let b = Ring::new(ns, DEFAULT_VNODES);
            for k in keys(seed, 200) {
                prop_assert_eq!(a.home(&k), b.home(&k));
                prop_assert_eq!(a.pick(&k, 1.25, |_| Some(0)), b.pick(&k, 1.25, |_| Some(0)));
            }
        }

        /// Removing one of N nodes moves exactly the keys that lived on it, and those are
        /// about 1/N of all keys: tolerance [0.4/N, 1.8/N] over 3000 keys with 160 vnodes
        /// (the observed spread of one node's share is about ±25 %).
        #[test]
        fn removal_moves_about_one_nth(n in 3usize..10, gone in 0usize..10, seed in any::<u64>()) {
            let ns = names(n);
            let gone = &ns[gone % n];
            let before = Ring::new(ns.clone(), DEFAULT_VNODES);
            let after = Ring::new(ns.iter().filter(|x| *x != gone).cloned(), DEFAULT_VNODES);
            let ks = keys(seed, 3000);
            let mut moved = 0usize;
            for k in &ks {
                let (b, a) = (before.home(k), after.home(k));
                if b == Some(gone.as_str()) {
                    moved += 1;
                    prop_assert_ne!(a, Some(gone.as_str()));
                } else {
                    prop_assert_eq!(a, b, "key {} moved off a node that stayed", k);
                }
            }
            let frac = moved as f64 / ks.len() as f64;
            let ideal = 1.0 / n as f64;
            prop_assert!(frac >= 0.4 * ideal && frac <= 1.8 * ideal,
                "removing 1 of {} moved {:.3} of keys (ideal {:.3})", n, frac, ideal);
        }

        /// Adding a node to N moves keys only onto the new node, about 1/(N+1) of them
        /// (same tolerance).
        #[test]
        fn addition_moves_about_one_nth(n in 2usize..9, seed in any::<u64>()) {
            let ns = names(n + 1);
            let before = Ring::new(ns[..n].to_vec(), DEFAULT_VNODES);
            let after = Ring::new(ns.clone(), DEFAULT_VNODES);
            let new = ns[n].as_str();
            let ks = keys(seed, 3000);
            let mut moved = 0usize;
            for k in &ks {
                let (b, a) = (before.home(k), after.home(k));
                if a != b {
                    prop_assert_eq!(a, Some(new), "key {} moved between old nodes", k);
                    moved += 1;
                }
            }
            let frac = moved as f64 / ks.len() as f64;
            let ideal = 1.0 / (n + 1) as f64;
            prop_assert!(frac >= 0.4 * ideal && frac <= 1.8 * ideal,
                "adding 1 to {} moved {:.3} of keys (ideal {:.3})", n, frac, ideal);
        }

        /// Any interleaving of build starts (hot and cold keys) and finishes: every pick
        /// lands on an available node whose load stays within ceil(c × mean after adding).
        #[test]
        fn load_bound_never_exceeded(
            n in 1usize..7,
            c in 1.0f64..2.0,
            ops in proptest::collection::vec((any::<bool>(), 0u8..6, any::<bool>()), 1..300),
        ) {
            let ring = Ring::new(names(n), 40);
            let mut load: HashMap<String, usize> = HashMap::new();
            let mut running: Vec<String> = Vec::new();
            for (start, key, hot) in ops {
                if start || running.is_empty() {
                    let key = if hot { "hot".to_string() } else { format!("k{key}") };
                    let total: usize = load.values().sum();
                    let cap = capacity(c, total, n);
                    let node = ring
                        .pick(&key, c, |x| Some(load.get(x).copied().unwrap_or(0)))
                        .map(str::to_string);
                    prop_assert!(node.is_some());
                    let node = node.unwrap_or_default();
                    let l = load.entry(node.clone()).or_default();
                    *l += 1;
                    prop_assert!(*l <= cap, "{} holds {} > cap {}", node, l, cap);
                    running.push(node);
                } else {
                    let node = running.swap_remove(key as usize % running.len());
                    if let Some(l) = load.get_mut(&node) {
                        *l -= 1;
                    }
                }
            }
        }

        /// An unloaded pool sends every key to its home.
        #[test]
        fn no_load_means_home(n in 1usize..8, seed in any::<u64>()) {
            let ring = Ring::new(names(n), DEFAULT_VNODES);
            for k in keys(seed, 100) {
                prop_assert_eq!(ring.pick(&k, 1.25, |_| Some(0)), ring.home(&k));
            }
        }
    }
}
