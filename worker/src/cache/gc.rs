//! Garbage collection of the cache: the worker's [`Policy`] (BuildKit's rules: filters,
//! `keep-duration`, `reserved-space`, `max-used-space`, `min-free-space`) applied
//! periodically, after builds and before a build when free space is short, and
//! Control.Prune through the same code. Only layers no live [`super::Layer`] holds are
//! removed, least recently used first; [`super::Cache::remove`] unrecords before it deletes.
//! Used by `control`; uses only [`super::Cache`] and `statvfs` on the worker root.
//!
//! Records are layers. Types the store classifies: `regular` and `source.local` (local
//! contexts). Cache mounts (`exec.cachemount`) live outside the store and are not collected;
//! a rule naming them says so in a warning.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use kiln_proto::gc::{Filter, FilterOp, Limits, Policy, Resolved};

use super::{Cache, Error, LayerUsage, Result};

/// Time between periodic runs when the policy sets none.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);

/// Record types BuildKit defines; those Kiln's store holds are `regular` and `source.local`.
const KNOWN_TYPES: &[&str] = &[
    "regular",
    "source.local",
    "exec.cachemount",
    "source.git.checkout",
    "internal",
    "frontend",
];

// === matching ===

/// A rule's filters, checked against what the store can classify.
#[derive(Debug, Clone)]
struct Matcher {
    all: bool,
    /// Any one matching is enough; none matches everything.
    filters: Vec<Filter>,
}

impl Matcher {
    /// Compiles `filters`; unsupported fields or operators are an error naming them, and
    /// filters that can only match what the store does not hold are reported as warnings.
    fn new(all: bool, filters: &[String], warnings: &mut Vec<String>) -> Result<Matcher> {
        let mut parsed = Vec::with_capacity(filters.len());
        for f in filters {
            let filter = Filter::parse(f, "filter").map_err(|e| Error::Policy(e.to_string()))?;
            for t in &filter.terms {
                let bad = |why: &str| Error::Policy(format!("filter {f:?}: {why}"));
                match (t.field.as_str(), &t.op) {
                    ("type", FilterOp::Eq | FilterOp::Ne) => {
                        if !KNOWN_TYPES.contains(&t.value.as_str()) {
                            return Err(bad(&format!(
                                "unknown record type {:?} (known: {})",
                                t.value,
                                KNOWN_TYPES.join(", ")
                            )));
                        }
                        if t.value == "exec.cachemount" && t.op == FilterOp::Eq {
                            warnings.push(format!(
                                "filter {f:?}: cache mounts are kept outside the cache store and are not garbage-collected yet"
                            ));
                        }
                    }
                    ("id", FilterOp::Eq | FilterOp::Ne) => {}
                    ("inuse" | "shared" | "private" | "mutable" | "immutable", FilterOp::Present) => {}
                    (_, FilterOp::Matches) => {
                        return Err(bad("regular-expression terms (~=) are not supported"))
                    }
                    (field, _) => {
                        return Err(bad(&format!(
                            "unsupported term on {field:?} (supported: type==, type!=, id==, id!=, inuse, shared, private, mutable, immutable)"
                        )))
                    }
                }
            }
            parsed.push(filter);
        }
        Ok(Matcher {
            all,
            filters: parsed,
        })
    }

    fn matches(&self, r: &LayerUsage) -> bool {
        // Without `all`, BuildKit spares internal and frontend records; the store holds
        // none, so every record is a candidate either way.
        if !self.all && (r.kind == "internal" || r.kind == "frontend") {
            return false;
        }
        self.filters.is_empty() || self.filters.iter().any(|f| filter_matches(f, r))
    }
}

fn filter_matches(f: &Filter, r: &LayerUsage) -> bool {
    f.terms.iter().all(|t| {
        let field = match t.field.as_str() {
            "type" => r.kind.clone(),
            "id" => r.id.to_string(),
            // Layers are immutable and never shared outside the worker.
            "inuse" => return r.in_use,
            "shared" | "mutable" => return false,
            "private" | "immutable" => return true,
            _ => return false,
        };
        match t.op {
            FilterOp::Eq => field == t.value,
            FilterOp::Ne => field != t.value,
            _ => false,
        }
    })
}

/// A rule ready to apply: its matcher and limits.
#[derive(Debug, Clone)]
struct Compiled {
    matcher: Matcher,
    limits: Limits,
}

/// Which records one rule removes, least recently used first: the unheld records it
/// matches that `keep_duration` does not spare, until what it matches fits the rule's cap
/// ([`Resolved::keep_bytes`] of their `total` and the filesystem's `free` bytes). `now` is
/// in unix seconds.
pub fn plan(
    matches: impl Fn(&LayerUsage) -> bool,
    limits: &Resolved,
    records: &[LayerUsage],
    free: u64,
    now: u64,
) -> Vec<LayerUsage> {
    let matching: Vec<&LayerUsage> = records.iter().filter(|r| matches(r)).collect();
    let total: u64 = matching.iter().map(|r| r.size).sum();
    let keep = limits.keep_bytes(total, free);
    if keep.is_some_and(|k| total <= k) {
        return Vec::new();
    }
    let mut candidates: Vec<&LayerUsage> = matching
        .into_iter()
        .filter(|r| !r.in_use)
        .filter(|r| {
            limits
                .keep_duration
                .is_none_or(|d| now.saturating_sub(r.last_used) as f64 >= d.as_secs_f64())
        })
        .collect();
    // Least recently used first; among equals the newer layer (higher id, usually the
    // upper one of a stack) first.
    candidates.sort_by_key(|r| (r.last_used, std::cmp::Reverse(r.id)));
    let mut left = total;
    let mut out = Vec::new();
    for r in candidates {
        if keep.is_some_and(|k| left <= k) {
            break;
        }
        left = left.saturating_sub(r.size);
        out.push(r.clone());
    }
    out
}

// === Gc ===

/// What a GC run or a prune removed.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The removed layers.
    pub removed: Vec<LayerUsage>,
    /// Their bytes.
    pub freed: u64,
}

/// Counters for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcStats {
    /// GC runs (policy runs and prunes) that completed.
    pub runs: u64,
    /// Bytes freed by them.
    pub freed_bytes: u64,
    /// Bytes the cache's layers took when last measured.
    pub cache_bytes: u64,
}

/// A filesystem's size and free space.
#[derive(Debug, Clone, Copy)]
pub struct DiskSpace {
    /// Total bytes.
    pub total: u64,
    /// Bytes available to the worker.
    pub free: u64,
}

/// The size and free space of the filesystem holding `path`.
pub fn disk_space(path: &Path) -> Result<DiskSpace> {
    let st = nix::sys::statvfs::statvfs(path).map_err(|e| Error::Io {
        op: "statvfs",
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    let frag = st.fragment_size() as u64;
    Ok(DiskSpace {
        total: st.blocks() as u64 * frag,
        free: st.blocks_available() as u64 * frag,
    })
}

/// One worker's garbage collector.
pub struct Gc {
    cache: Arc<Cache>,
    root: PathBuf,
    policy: RwLock<(Policy, Vec<Compiled>)>,
    /// One run at a time.
    running: Mutex<()>,
    wake: tokio::sync::Notify,
    runs: AtomicU64,
    freed: AtomicU64,
    cache_bytes: AtomicU64,
}

impl std::fmt::Debug for Gc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gc")
            .field("root", &self.root)
            .field("stats", &self.stats())
            .finish()
    }
}

fn compile(policy: &Policy, warnings: &mut Vec<String>) -> Result<Vec<Compiled>> {
    // No rule and no limit: the worker's default limits.
    let effective = if policy.rules.is_empty() && policy.limits.is_empty() {
        Policy {
            enabled: policy.enabled,
            interval: policy.interval,
            ..Policy::worker_default()
        }
    } else {
        policy.clone()
    };
    effective
        .effective_rules()
        .iter()
        .enumerate()
        .map(|(i, r)| {
            Ok(Compiled {
                matcher: Matcher::new(r.all, &r.filters, warnings)
                    .map_err(|e| Error::Policy(format!("rule {i}: {e}")))?,
                limits: r.limits.clone(),
            })
        })
        .collect()
}

// === impl Gc ===

impl Gc {
    /// A collector of `cache`, whose files live on the filesystem of `root`, enforcing
    /// `policy`; returns it with the policy's warnings.
    pub fn new(cache: Arc<Cache>, root: &Path, policy: Policy) -> Result<(Arc<Gc>, Vec<String>)> {
        let mut warnings = Vec::new();
        let compiled = compile(&policy, &mut warnings)?;
        let gc = Arc::new(Gc {
            cache,
            root: root.to_path_buf(),
            policy: RwLock::new((policy, compiled)),
            running: Mutex::new(()),
            wake: tokio::sync::Notify::new(),
            runs: AtomicU64::new(0),
            freed: AtomicU64::new(0),
            cache_bytes: AtomicU64::new(0),
        });
        Ok((gc, warnings))
    }

    /// The policy in force.
    pub fn policy(&self) -> Policy {
        self.policy
            .read()
            .map(|p| p.0.clone())
            .unwrap_or_else(|e| e.into_inner().0.clone())
    }

    /// Replaces the policy (a bad one is an error and the old one stays) and wakes the
    /// periodic loop so the new one applies now; returns the policy's warnings.
    pub fn set_policy(&self, policy: Policy) -> Result<Vec<String>> {
        let mut warnings = Vec::new();
        let compiled = compile(&policy, &mut warnings)?;
        match self.policy.write() {
            Ok(mut p) => *p = (policy, compiled),
            Err(e) => *e.into_inner() = (policy, compiled),
        }
        self.wake.notify_one();
        Ok(warnings)
    }

    /// The counters.
    pub fn stats(&self) -> GcStats {
        GcStats {
            runs: self.runs.load(Ordering::SeqCst),
            freed_bytes: self.freed.load(Ordering::SeqCst),
            cache_bytes: self.cache_bytes.load(Ordering::SeqCst),
        }
    }

    fn compiled(&self) -> (bool, Vec<Compiled>) {
        let read = |p: &(Policy, Vec<Compiled>)| (p.0.enabled, p.1.clone());
        match self.policy.read() {
            Ok(p) => read(&p),
            Err(e) => read(&e.into_inner()),
        }
    }

    /// Applies the policy once (nothing when it is disabled). Blocking.
    pub fn run(&self) -> Result<Report> {
        let (enabled, rules) = self.compiled();
        if !enabled {
            return Ok(Report::default());
        }
        self.apply(&rules)
    }

    /// Control.Prune: one rule with absolute limits, through the same code as the policy
    /// (nothing a build holds is removed). Blocking.
    pub fn prune(&self, all: bool, filters: &[String], limits: Resolved) -> Result<Report> {
        let matcher = Matcher::new(all, filters, &mut Vec::new())?;
        let _one = self.running.lock().unwrap_or_else(|e| e.into_inner());
        self.cache.flush_last_used()?;
        let mut records = self.cache.usage()?;
        let disk = disk_space(&self.root)?;
        let mut report = Report::default();
        let doomed = plan(
            |r| matcher.matches(r),
            &limits,
            &records,
            disk.free,
            super::unix_now(),
        );
        self.remove(&doomed, &mut records, &mut report)?;
        self.finish(&records, &report);
        Ok(report)
    }

    /// The cache's records that `filters` match (any one; none: all), as DiskUsage lists
    /// them. Blocking.
    pub fn usage(&self, filters: &[String]) -> Result<Vec<LayerUsage>> {
        let matcher = Matcher::new(true, filters, &mut Vec::new())?;
        Ok(self
            .cache
            .usage()?
            .into_iter()
            .filter(|r| matcher.matches(r))
            .collect())
    }

    /// Before a build: when free space is below a rule's `min-free-space` (or the cache
    /// above a `max-used-space`, as last measured), runs the policy now. Blocking.
    pub fn before_build(&self) -> Result<Option<Report>> {
        let (enabled, rules) = self.compiled();
        if !enabled {
            return Ok(None);
        }
        let disk = disk_space(&self.root)?;
        let cache_bytes = self.cache_bytes.load(Ordering::SeqCst);
        let short = rules.iter().any(|r| {
            let l = r.limits.resolve(disk.total);
            (l.min_free_space > 0 && disk.free < l.min_free_space)
                || (l.max_used_space > 0 && cache_bytes > l.max_used_space)
        });
        if !short {
            return Ok(None);
        }
        tracing::info!(
            free = disk.free,
            "free space below the gc policy before a build: collecting"
        );
        self.apply(&rules).map(Some)
    }

    fn apply(&self, rules: &[Compiled]) -> Result<Report> {
        let _one = self.running.lock().unwrap_or_else(|e| e.into_inner());
        self.cache.flush_last_used()?;
        let mut records = self.cache.usage()?;
        let mut report = Report::default();
        let now = super::unix_now();
        for rule in rules {
            let disk = disk_space(&self.root)?;
            let limits = rule.limits.resolve(disk.total);
            let doomed = plan(
                |r| rule.matcher.matches(r),
                &limits,
                &records,
                disk.free,
                now,
            );
            self.remove(&doomed, &mut records, &mut report)?;
        }
        self.finish(&records, &report);
        Ok(report)
    }

    fn remove(
        &self,
        doomed: &[LayerUsage],
        records: &mut Vec<LayerUsage>,
        report: &mut Report,
    ) -> Result<()> {
        if doomed.is_empty() {
            return Ok(());
        }
        let removed = self.cache.remove(doomed)?;
        records.retain(|r| !removed.iter().any(|d| d.id == r.id));
        report.freed += removed.iter().map(|r| r.size).sum::<u64>();
        report.removed.extend(removed);
        Ok(())
    }

    fn finish(&self, records: &[LayerUsage], report: &Report) {
        self.runs.fetch_add(1, Ordering::SeqCst);
        self.freed.fetch_add(report.freed, Ordering::SeqCst);
        self.cache_bytes
            .store(records.iter().map(|r| r.size).sum(), Ordering::SeqCst);
        if !report.removed.is_empty() {
            tracing::info!(
                layers = report.removed.len(),
                freed = report.freed,
                "gc removed unused cache records"
            );
        }
    }

    /// Asks the periodic loop to run now (after a build).
    pub fn trigger(&self) {
        self.wake.notify_one();
    }

    /// Runs the policy every interval and whenever [`Gc::trigger`] or a policy change asks,
    /// until the runtime stops. Must be called inside a tokio runtime.
    pub fn spawn(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let gc = self.clone();
        tokio::spawn(async move {
            loop {
                let interval = gc.policy().interval.unwrap_or(DEFAULT_INTERVAL);
                let wake = gc.wake.notified();
                let this = gc.clone();
                match tokio::task::spawn_blocking(move || this.run()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => tracing::warn!(%error, "gc run failed"),
                    Err(error) => tracing::warn!(%error, "gc run panicked"),
                }
                let _ = tokio::time::timeout(interval, wake).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u64, size: u64, last_used: u64, kind: &str) -> LayerUsage {
        LayerUsage {
            id,
            size,
            created: last_used,
            last_used,
            kind: kind.into(),
            ..Default::default()
        }
    }

    fn limits(reserved: u64, max: u64, min: u64, keep: Option<u64>) -> Resolved {
        Resolved {
            keep_duration: keep.map(Duration::from_secs),
            reserved_space: reserved,
            max_used_space: max,
            min_free_space: min,
        }
    }

    fn ids(v: &[LayerUsage]) -> Vec<u64> {
        v.iter().map(|r| r.id).collect()
    }

    #[test]
    fn over_max_used_removes_least_recently_used_until_under() {
        let records = vec![
            rec(1, 40, 100, "regular"),
            rec(2, 30, 300, "regular"),
            rec(3, 20, 200, "regular"),
            rec(4, 10, 400, "regular"),
        ];
        // 100 used, cap 60: 1 (oldest, 40) then done at 60.
        let out = plan(|_| true, &limits(0, 60, 0, None), &records, 1000, 500);
        assert_eq!(ids(&out), vec![1]);
        // Cap 35: 1, 3, 2 (by last use) leaves 10.
        let out = plan(|_| true, &limits(0, 35, 0, None), &records, 1000, 500);
        assert_eq!(ids(&out), vec![1, 3, 2]);
        // Under the cap: nothing.
        let out = plan(|_| true, &limits(0, 100, 0, None), &records, 1000, 500);
        assert!(out.is_empty());
    }

    #[test]
    fn held_records_stay_and_reserved_is_a_floor() {
        let mut records = vec![
            rec(1, 40, 100, "regular"),
            rec(2, 30, 200, "regular"),
            rec(3, 30, 300, "regular"),
        ];
        records[0].in_use = true;
        // Cap 10 but 1 is held: 2 and 3 go.
        let out = plan(|_| true, &limits(0, 10, 0, None), &records, 1000, 500);
        assert_eq!(ids(&out), vec![2, 3]);
        // Reserved 65: removing 2 leaves 70, still above, so 3 goes too; 70 stops after 2.
        let out = plan(|_| true, &limits(65, 10, 0, None), &records, 1000, 500);
        assert_eq!(ids(&out), vec![2, 3]);
        let out = plan(|_| true, &limits(70, 10, 0, None), &records, 1000, 500);
        assert_eq!(ids(&out), vec![2]);
    }

    #[test]
    fn min_free_space_frees_what_the_disk_lacks() {
        let records = vec![
            rec(1, 40, 100, "regular"),
            rec(2, 30, 200, "regular"),
            rec(3, 30, 300, "regular"),
        ];
        // 15 free, 50 wanted: 35 must go → 1 (40).
        let out = plan(|_| true, &limits(0, 0, 50, None), &records, 15, 500);
        assert_eq!(ids(&out), vec![1]);
        // 60 wanted: 45 must go → 1 and 2.
        let out = plan(|_| true, &limits(0, 0, 60, None), &records, 15, 500);
        assert_eq!(ids(&out), vec![1, 2]);
        // Enough free: nothing.
        assert!(plan(|_| true, &limits(0, 0, 10, None), &records, 15, 500).is_empty());
    }

    #[test]
    fn keep_duration_spares_recent_records() {
        let records = vec![
            rec(1, 10, 100, "regular"),
            rec(2, 10, 450, "regular"),
            rec(3, 10, 200, "regular"),
        ];
        // No space limit: every record unused for 100 s or more goes.
        let out = plan(|_| true, &limits(0, 0, 0, Some(100)), &records, 1000, 500);
        assert_eq!(ids(&out), vec![1, 3]);
        // With a cap that holds, nothing goes (BuildKit: stale records over the cap only).
        assert!(plan(|_| true, &limits(0, 50, 0, Some(100)), &records, 1000, 500).is_empty());
        // Over the cap: only stale ones, oldest first.
        let out = plan(|_| true, &limits(0, 15, 0, Some(100)), &records, 1000, 500);
        assert_eq!(ids(&out), vec![1, 3]);
    }

    #[test]
    fn filters_select_by_type_and_unsupported_ones_are_named() -> anyhow::Result<()> {
        let records = vec![rec(1, 10, 100, "regular"), rec(2, 10, 100, "source.local")];
        let mut warnings = Vec::new();
        let m = Matcher::new(false, &["type==source.local".into()], &mut warnings)?;
        let out = plan(|r| m.matches(r), &limits(0, 0, 0, None), &records, 0, 500);
        assert_eq!(ids(&out), vec![2]);
        let m = Matcher::new(true, &["type!=source.local,id==1".into()], &mut warnings)?;
        assert!(m.matches(&records[0]) && !m.matches(&records[1]));
        assert!(warnings.is_empty());
        Matcher::new(false, &["type==exec.cachemount".into()], &mut warnings)?;
        assert!(
            warnings[0].contains("not garbage-collected"),
            "{warnings:?}"
        );
        for (bad, want) in [
            ("description~=RUN", "regular-expression"),
            ("type==bogus", "unknown record type"),
            ("until==24h", "unsupported term"),
        ] {
            let e = Matcher::new(false, &[bad.into()], &mut Vec::new())
                .err()
                .ok_or_else(|| anyhow::anyhow!("{bad} must fail"))?;
            assert!(
                e.to_string().contains(want) && e.to_string().contains(bad),
                "{e}"
            );
        }
        Ok(())
    }

    #[test]
    fn empty_policy_means_the_worker_default() -> anyhow::Result<()> {
        let rules = compile(&Policy::default(), &mut Vec::new())?;
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].limits, Policy::worker_default().limits);
        Ok(())
    }
}
