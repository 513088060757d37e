//! Kiln's garbage-collection policy, the admin contract between the controller (which renders
//! it from a `BuildWorkerPool`) and the worker (which reads it from the `[gc]` table of its
//! `--config` file and enforces it). Owns the policy types, the parsing of sizes (bytes, binary
//! units, percentages of the filesystem) and durations as BuildKit accepts them, the `[gc]`
//! file form, and the syntax of BuildKit's prune filters. No I/O: percentages are resolved by
//! the caller against the filesystem it measures.
//!
//! Semantics (BuildKit's, per rule, rules in order, the global limits last as a rule that
//! matches everything): records are the candidates a rule's filters match that no build holds;
//! `keep-duration` spares those used more recently; `max-used-space` caps what the matching
//! records may use; `min-free-space` asks for that much free space on the filesystem;
//! `reserved-space` is never freed below. A rule with only `reserved-space` (BuildKit's old
//! `keepBytes`) caps at it; a rule with no space limit removes every candidate.

use std::fmt;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Deserialize;

/// A size, duration or filter that failed to parse; `field` names where it came from.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {what} {value:?} in {field}: {reason}")]
pub struct ParseError {
    /// What was expected (`size`, `duration` or `filter`).
    pub what: &'static str,
    /// The field, e.g. `spec.gc.reservedSpace` or `gc.rules[0].max-used-space`.
    pub field: String,
    /// The text that was given.
    pub value: String,
    /// Why it was rejected.
    pub reason: &'static str,
}

// === Size ===

/// A GC size: absolute bytes or a percentage of the filesystem the cache lives on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Size {
    /// A number of bytes.
    Bytes(u64),
    /// A percentage (0–100) of the filesystem's total size.
    Percent(f64),
}

impl Size {
    /// Parses `s` as BuildKit's GC settings do: plain bytes (`1000000`), a number with a unit
    /// (`512Mi`, `10GB`, `1.5GiB`, `2g`; units are binary, 1k = 1024, as in BuildKit), or a
    /// percentage of the disk (`80%`). `field` names the input in errors.
    pub fn parse(s: &str, field: &str) -> Result<Size, ParseError> {
        let err = |reason| ParseError {
            what: "size",
            field: field.to_string(),
            value: s.to_string(),
            reason,
        };
        let t = s.trim();
        if t.is_empty() {
            return Err(err("empty"));
        }
        if let Some(num) = t.strip_suffix('%') {
            let p = parse_decimal(num).ok_or_else(|| err("expected a number before %"))?;
            if p > 100.0 {
                return Err(err("a percentage cannot exceed 100"));
            }
            return Ok(Size::Percent(p));
        }
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n = parse_decimal(num).ok_or_else(|| err("expected a number"))?;
        let unit = unit.trim_start_matches(' ').to_ascii_lowercase();
        let unit = unit.strip_suffix('b').unwrap_or(&unit);
        let unit = unit.strip_suffix('i').unwrap_or(unit);
        let shift = match unit {
            "" => 0,
            "k" => 10,
            "m" => 20,
            "g" => 30,
            "t" => 40,
            "p" => 50,
            "e" => 60,
            _ => return Err(err("unknown unit (use B, K/KB/KiB, M, G, T, P, E or %)")),
        };
        let bytes = n * (1u64 << shift) as f64;
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            return Err(err("too large"));
        }
        // Whole bytes only: BuildKit truncates fractions the same way.
        Ok(Size::Bytes(bytes as u64))
    }

    /// The absolute size on a filesystem of `disk_bytes` total bytes.
    pub fn resolve(self, disk_bytes: u64) -> u64 {
        match self {
            Size::Bytes(b) => b,
            Size::Percent(p) => (disk_bytes as f64 * p / 100.0) as u64,
        }
    }
}

impl fmt::Display for Size {
    /// Canonical form BuildKit accepts: plain bytes or `N%`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Size::Bytes(b) => write!(f, "{b}"),
            Size::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// Parses a non-negative decimal without exponent or sign (`12`, `1.5`).
fn parse_decimal(s: &str) -> Option<f64> {
    let mut parts = s.splitn(2, '.');
    let int = parts.next()?;
    let frac = parts.next();
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if let Some(frac) = frac {
        if frac.is_empty() || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
    }
    s.parse().ok()
}

// === durations ===

/// Parses a duration: one or more `<number><unit>` terms (`48h`, `1h30m`, `1.5h`, `7d`, `2w`)
/// with units ns, us, µs, ms, s, m, h, d (24h) and w (7d); a bare `0` is zero.
/// `field` names the input in errors.
pub fn parse_duration(s: &str, field: &str) -> Result<Duration, ParseError> {
    let err = |reason| ParseError {
        what: "duration",
        field: field.to_string(),
        value: s.to_string(),
        reason,
    };
    let t = s.trim();
    if t.is_empty() {
        return Err(err("empty"));
    }
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = t;
    let mut total = 0f64;
    while !rest.is_empty() {
        let split = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| err("missing a unit (ns, us, ms, s, m, h, d or w)"))?;
        let (num, after) = rest.split_at(split);
        let n = parse_decimal(num).ok_or_else(|| err("expected a number before each unit"))?;
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let secs = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86_400.0,
            "w" => 604_800.0,
            _ => return Err(err("unknown unit (use ns, us, ms, s, m, h, d or w)")),
        };
        total += n * secs;
        rest = next;
    }
    Duration::try_from_secs_f64(total).map_err(|_| err("too large"))
}

/// Formats a duration as whole seconds (`172800s`), a form Go's `time.ParseDuration` and
/// therefore BuildKit accept; sub-second durations keep their milliseconds (`250ms`).
pub fn format_duration_secs(d: Duration) -> String {
    if d.as_secs() == 0 && d.subsec_millis() > 0 {
        return format!("{}ms", d.as_millis());
    }
    format!("{}s", d.as_secs())
}

// === filters ===

/// How a filter term compares a field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FilterOp {
    /// `field==value`
    Eq,
    /// `field!=value`
    Ne,
    /// `field~=regexp`
    Matches,
    /// a bare `field` (the field is set / true)
    Present,
}

/// One `field<op>value` term of a filter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilterTerm {
    /// The field, e.g. `type`.
    pub field: String,
    /// The comparison.
    pub op: FilterOp,
    /// The value (empty for [`FilterOp::Present`]).
    pub value: String,
}

/// A BuildKit (containerd-syntax) prune filter: terms joined by `,` that must all match.
/// A list of filters matches a record when any one of them does, as in BuildKit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    /// The terms, all of which must match.
    pub terms: Vec<FilterTerm>,
}

impl Filter {
    /// Parses `type==source.local`, `type!=regular,id==abc`, `description~=^RUN`, `inuse`;
    /// values may be double-quoted. `field` names the input in errors.
    pub fn parse(s: &str, field: &str) -> Result<Filter, ParseError> {
        let err = |reason| ParseError {
            what: "filter",
            field: field.to_string(),
            value: s.to_string(),
            reason,
        };
        let mut terms = Vec::new();
        for part in s.split(',') {
            let part = part.trim();
            if part.is_empty() {
                return Err(err("empty term"));
            }
            let (name, op, value) = if let Some(i) = part.find("==") {
                (&part[..i], FilterOp::Eq, &part[i + 2..])
            } else if let Some(i) = part.find("!=") {
                (&part[..i], FilterOp::Ne, &part[i + 2..])
            } else if let Some(i) = part.find("~=") {
                (&part[..i], FilterOp::Matches, &part[i + 2..])
            } else {
                (part, FilterOp::Present, "")
            };
            let name = name.trim();
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
            {
                return Err(err(
                    "expected field==value, field!=value, field~=value or a bare field",
                ));
            }
            let value = value.trim();
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value);
            if op != FilterOp::Present && value.is_empty() {
                return Err(err("missing a value after the operator"));
            }
            terms.push(FilterTerm {
                field: name.to_string(),
                op,
                value: value.to_string(),
            });
        }
        Ok(Filter { terms })
    }
}

// === policy ===

/// The limits of one rule (or of the whole policy).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Limits {
    /// Records used more recently than this are kept.
    pub keep_duration: Option<Duration>,
    /// Never free below this.
    pub reserved_space: Option<Size>,
    /// Most space the matching records may use.
    pub max_used_space: Option<Size>,
    /// Free space wanted on the filesystem.
    pub min_free_space: Option<Size>,
}

impl Limits {
    /// True when no limit is set.
    pub fn is_empty(&self) -> bool {
        *self == Limits::default()
    }

    /// The limits with sizes resolved against a filesystem of `disk_bytes` bytes.
    pub fn resolve(&self, disk_bytes: u64) -> Resolved {
        let r = |s: Option<Size>| s.map(|s| s.resolve(disk_bytes)).unwrap_or(0);
        Resolved {
            keep_duration: self.keep_duration,
            reserved_space: r(self.reserved_space),
            max_used_space: r(self.max_used_space),
            min_free_space: r(self.min_free_space),
        }
    }
}

/// Limits in bytes (0 = unset), as BuildKit's `PruneRequest` carries them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    /// Records used more recently than this are kept.
    pub keep_duration: Option<Duration>,
    /// Never free below this many bytes.
    pub reserved_space: u64,
    /// Most bytes the matching records may use.
    pub max_used_space: u64,
    /// Free bytes wanted on the filesystem.
    pub min_free_space: u64,
}

impl Resolved {
    /// How many bytes of matching records to keep, given their `total` and the filesystem's
    /// `free` bytes: `None` means no cap (every candidate goes). BuildKit's rule: the
    /// `max-used-space` cap, lowered by what `min-free-space` lacks, never below
    /// `reserved-space`; with neither of the first two, `reserved-space` alone is the cap.
    pub fn keep_bytes(&self, total: u64, free: u64) -> Option<u64> {
        if self.max_used_space == 0 && self.min_free_space == 0 {
            return (self.reserved_space > 0).then_some(self.reserved_space);
        }
        let mut keep = if self.max_used_space > 0 {
            self.max_used_space
        } else {
            total
        };
        if self.min_free_space > free {
            let lack = self.min_free_space - free;
            keep = keep.min(total.saturating_sub(lack));
        }
        Some(keep.max(self.reserved_space))
    }
}

/// One GC rule: the records its filters match are pruned by its limits.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rule {
    /// Also match records BuildKit treats as internal or frontend.
    pub all: bool,
    /// Prune filters (any one matching is enough); none matches every record.
    pub filters: Vec<String>,
    /// The rule's limits.
    pub limits: Limits,
}

/// A worker's whole GC policy.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Automatic GC runs (Prune works either way).
    pub enabled: bool,
    /// Time between periodic runs (`None`: the worker's default).
    pub interval: Option<Duration>,
    /// Limits over every record, applied after the rules.
    pub limits: Limits,
    /// Rules, in order.
    pub rules: Vec<Rule>,
}

impl Default for Policy {
    /// GC on, no rule, no limit: the worker substitutes [`Policy::worker_default`].
    fn default() -> Self {
        Policy {
            enabled: true,
            interval: None,
            limits: Limits::default(),
            rules: Vec::new(),
        }
    }
}

impl Policy {
    /// What a worker enforces when its policy sets no limit and no rule: keep the cache
    /// under 60% of its filesystem, never freeing below 10%.
    pub fn worker_default() -> Policy {
        Policy {
            limits: Limits {
                reserved_space: Some(Size::Percent(10.0)),
                max_used_space: Some(Size::Percent(60.0)),
                ..Limits::default()
            },
            ..Policy::default()
        }
    }

    /// The rules in the order they apply: the configured ones, then the global limits as a
    /// rule matching everything (when set).
    pub fn effective_rules(&self) -> Vec<Rule> {
        let mut rules = self.rules.clone();
        if !self.limits.is_empty() || rules.is_empty() {
            rules.push(Rule {
                all: true,
                filters: Vec::new(),
                limits: self.limits.clone(),
            });
        }
        rules
    }

    /// The `[gc]` table of a worker's config file (canonical: sizes as bytes or `N%`,
    /// durations as seconds), or an empty string for the default policy.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        if *self == Policy::default() {
            return out;
        }
        // Writing to a String cannot fail; the results are ignored for that reason.
        let _ = writeln!(out, "[gc]");
        let _ = writeln!(out, "enabled = {}", self.enabled);
        if let Some(i) = self.interval {
            let _ = writeln!(out, "interval = {}", toml_string(&format_duration_secs(i)));
        }
        write_limits(&mut out, &self.limits);
        for rule in &self.rules {
            let _ = writeln!(out, "\n[[gc.rules]]");
            let _ = writeln!(out, "all = {}", rule.all);
            let filters: Vec<String> = rule.filters.iter().map(|f| toml_string(f)).collect();
            let _ = writeln!(out, "filters = [{}]", filters.join(", "));
            write_limits(&mut out, &rule.limits);
        }
        out
    }
}

fn write_limits(out: &mut String, l: &Limits) {
    if let Some(d) = l.keep_duration {
        let _ = writeln!(
            out,
            "keep-duration = {}",
            toml_string(&format_duration_secs(d))
        );
    }
    for (key, value) in [
        ("reserved-space", l.reserved_space),
        ("max-used-space", l.max_used_space),
        ("min-free-space", l.min_free_space),
    ] {
        if let Some(v) = value {
            let _ = writeln!(out, "{key} = {}", toml_string(&v.to_string()));
        }
    }
}

/// A TOML basic string (escapes `\`, `"` and control characters).
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

// === file form ===

/// The `[gc]` table as written in a worker's config file (kebab-case keys, sizes and
/// durations as strings). [`GcSection::parse`] checks and converts it.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct GcSection {
    /// Automatic GC on or off (default on).
    pub enabled: Option<bool>,
    /// Time between periodic runs.
    pub interval: Option<String>,
    /// See [`Limits::reserved_space`].
    pub reserved_space: Option<String>,
    /// See [`Limits::max_used_space`].
    pub max_used_space: Option<String>,
    /// See [`Limits::min_free_space`].
    pub min_free_space: Option<String>,
    /// See [`Limits::keep_duration`].
    pub keep_duration: Option<String>,
    /// `[[gc.rules]]`, in order.
    #[serde(default)]
    pub rules: Vec<GcRuleSection>,
}

/// One `[[gc.rules]]` entry as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct GcRuleSection {
    /// See [`Rule::all`].
    pub all: Option<bool>,
    /// See [`Rule::filters`].
    #[serde(default)]
    pub filters: Vec<String>,
    /// See [`Limits::reserved_space`].
    pub reserved_space: Option<String>,
    /// See [`Limits::max_used_space`].
    pub max_used_space: Option<String>,
    /// See [`Limits::min_free_space`].
    pub min_free_space: Option<String>,
    /// See [`Limits::keep_duration`].
    pub keep_duration: Option<String>,
}

/// Parses the four limits, naming fields `<prefix>.<key>` in errors; `names` gives the
/// keys of keep-duration, reserved, max-used and min-free space in the caller's spelling.
pub fn parse_limits(
    prefix: &str,
    names: [&str; 4],
    values: [Option<&str>; 4],
) -> Result<Limits, ParseError> {
    let [kd, rs, mu, mf] = values;
    let size = |v: Option<&str>, name: &str| {
        v.map(|v| Size::parse(v, &format!("{prefix}.{name}")))
            .transpose()
    };
    Ok(Limits {
        keep_duration: kd
            .map(|v| parse_duration(v, &format!("{prefix}.{}", names[0])))
            .transpose()?,
        reserved_space: size(rs, names[1])?,
        max_used_space: size(mu, names[2])?,
        min_free_space: size(mf, names[3])?,
    })
}

const FILE_NAMES: [&str; 4] = [
    "keep-duration",
    "reserved-space",
    "max-used-space",
    "min-free-space",
];

impl GcSection {
    /// The policy this table describes; errors name the key (`gc.rules[1].max-used-space`).
    pub fn parse(&self) -> Result<Policy, ParseError> {
        let limits = parse_limits(
            "gc",
            FILE_NAMES,
            [
                self.keep_duration.as_deref(),
                self.reserved_space.as_deref(),
                self.max_used_space.as_deref(),
                self.min_free_space.as_deref(),
            ],
        )?;
        let interval = self
            .interval
            .as_deref()
            .map(|v| parse_duration(v, "gc.interval"))
            .transpose()?;
        if interval == Some(Duration::ZERO) {
            return Err(ParseError {
                what: "duration",
                field: "gc.interval".into(),
                value: self.interval.clone().unwrap_or_default(),
                reason: "must be more than zero",
            });
        }
        let mut rules = Vec::with_capacity(self.rules.len());
        for (i, r) in self.rules.iter().enumerate() {
            let prefix = format!("gc.rules[{i}]");
            for f in &r.filters {
                Filter::parse(f, &format!("{prefix}.filters"))?;
            }
            rules.push(Rule {
                all: r.all.unwrap_or(false),
                filters: r.filters.clone(),
                limits: parse_limits(
                    &prefix,
                    FILE_NAMES,
                    [
                        r.keep_duration.as_deref(),
                        r.reserved_space.as_deref(),
                        r.max_used_space.as_deref(),
                        r.min_free_space.as_deref(),
                    ],
                )?,
            });
        }
        Ok(Policy {
            enabled: self.enabled.unwrap_or(true),
            interval,
            limits,
            rules,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const GIB: u64 = 1 << 30;

    fn size(s: &str) -> Size {
        Size::parse(s, "spec.gc.reservedSpace").unwrap()
    }

    #[test]
    fn percentages_resolve_against_the_disk() {
        assert_eq!(size("50%").resolve(10 * GIB), 5 * GIB);
        assert_eq!(size("1Gi").resolve(10 * GIB), GIB);
        assert_eq!(size("80%").to_string(), "80%");
        assert_eq!(size("1Ki").to_string(), "1024");
    }

    #[test]
    fn bad_sizes_name_field_and_reason() {
        for bad in [
            "", "GB", "-1G", "1.G", "1e3", "10XB", "101%", "abc%", "1..2M", "1Gx",
        ] {
            let e = Size::parse(bad, "spec.gc.maxUsedSpace").unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains("spec.gc.maxUsedSpace"), "{msg}");
            assert!(msg.contains("invalid size"), "{msg}");
        }
        let e = Size::parse("10XB", "f").unwrap_err();
        assert!(e.reason.contains("unknown unit"), "{e}");
        assert!(Size::parse("99999999E", "f")
            .unwrap_err()
            .reason
            .contains("too large"));
    }

    #[test]
    fn durations() {
        let d = |s| parse_duration(s, "spec.gc.keepDuration").unwrap();
        assert_eq!(d("48h"), Duration::from_secs(48 * 3600));
        assert_eq!(d("30m"), Duration::from_secs(1800));
        assert_eq!(d("7d"), Duration::from_secs(7 * 86_400));
        assert_eq!(d("2w"), Duration::from_secs(14 * 86_400));
        assert_eq!(d("1h30m"), Duration::from_secs(5400));
        assert_eq!(d("1.5h"), Duration::from_secs(5400));
        assert_eq!(d("250ms"), Duration::from_millis(250));
        assert_eq!(d("0"), Duration::ZERO);
        assert_eq!(format_duration_secs(d("7d")), "604800s");
    }

    #[test]
    fn bad_durations_name_field_and_reason() {
        for bad in ["", "48", "h", "5y", "1h30", "-1h", "1.h", "3 h"] {
            let e = parse_duration(bad, "spec.tls.renewBefore").unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains("spec.tls.renewBefore"), "{msg}");
            assert!(msg.contains("invalid duration"), "{msg}");
        }
        assert!(parse_duration("5y", "f")
            .unwrap_err()
            .reason
            .contains("unknown unit"));
        assert!(parse_duration("48", "f")
            .unwrap_err()
            .reason
            .contains("missing a unit"));
    }

    #[test]
    fn sizes_in_every_form_buildkit_accepts() {
        assert_eq!(size("1000000"), Size::Bytes(1_000_000));
        assert_eq!(size("512Mi"), Size::Bytes(512 << 20));
        assert_eq!(size("10GB"), Size::Bytes(10 * GIB));
        assert_eq!(size("1.5GiB"), Size::Bytes(GIB + GIB / 2));
        assert_eq!(size("3 k"), Size::Bytes(3072));
        assert_eq!(size("80%"), Size::Percent(80.0));
        assert_eq!(size("50%").resolve(10 * GIB), 5 * GIB);
        assert_eq!(size("80%").to_string(), "80%");
        let e = Size::parse("10XB", "gc.max-used-space").unwrap_err();
        assert!(e.to_string().contains("gc.max-used-space"), "{e}");
    }

    #[test]
    fn durations_round_trip() {
        let d = |s| parse_duration(s, "gc.keep-duration").unwrap();
        assert_eq!(d("48h"), Duration::from_secs(48 * 3600));
        assert_eq!(d("1h30m"), Duration::from_secs(5400));
        assert_eq!(format_duration_secs(d("7d")), "604800s");
        assert_eq!(format_duration_secs(d("250ms")), "250ms");
        assert_eq!(d(&format_duration_secs(d("250ms"))), d("250ms"));
    }

    #[test]
    fn keep_bytes_follows_buildkit() {
        let r = |reserved, max, min| Resolved {
            keep_duration: None,
            reserved_space: reserved,
            max_used_space: max,
            min_free_space: min,
        };
        // Nothing set: no cap. Reserved alone: the old keepBytes cap.
        assert_eq!(r(0, 0, 0).keep_bytes(100, 10), None);
        assert_eq!(r(30, 0, 0).keep_bytes(100, 10), Some(30));
        // The max-used cap.
        assert_eq!(r(0, 60, 0).keep_bytes(100, 10), Some(60));
        // Min free lacking 25 bytes: keep 75 of 100, or less if max-used says so.
        assert_eq!(r(0, 0, 35).keep_bytes(100, 10), Some(75));
        assert_eq!(r(0, 60, 35).keep_bytes(100, 10), Some(60));
        assert_eq!(r(0, 80, 35).keep_bytes(100, 10), Some(75));
        // Enough free space: only max-used counts (or nothing above the total).
        assert_eq!(r(0, 0, 5).keep_bytes(100, 10), Some(100));
        // Never below reserved, even when free space lacks.
        assert_eq!(r(90, 60, 35).keep_bytes(100, 10), Some(90));
        assert_eq!(r(20, 0, 500).keep_bytes(100, 10), Some(20));
    }

    #[test]
    fn filters_parse_and_bad_ones_are_named() {
        let f = Filter::parse("type==source.local", "f").unwrap();
        assert_eq!(
            f.terms,
            vec![FilterTerm {
                field: "type".into(),
                op: FilterOp::Eq,
                value: "source.local".into()
            }]
        );
        let f = Filter::parse("type!=regular, id==\"12\",inuse", "f").unwrap();
        assert_eq!(f.terms.len(), 3);
        assert_eq!(f.terms[1].value, "12");
        assert_eq!(f.terms[2].op, FilterOp::Present);
        assert_eq!(
            Filter::parse("description~=^RUN", "f").unwrap().terms[0].op,
            FilterOp::Matches
        );
        for bad in ["", "type==", "==x", "a b==c", "type==x,"] {
            let e = Filter::parse(bad, "gc.rules[2].filters").unwrap_err();
            assert!(e.to_string().contains("gc.rules[2].filters"), "{e}");
        }
    }

    #[test]
    fn section_parses_and_renders_canonically() {
        let section = GcSection {
            enabled: Some(true),
            interval: Some("1m".into()),
            reserved_space: Some("10GB".into()),
            max_used_space: Some("80%".into()),
            keep_duration: Some("2d".into()),
            rules: vec![GcRuleSection {
                filters: vec!["type==source.local".into()],
                keep_duration: Some("48h".into()),
                max_used_space: Some("512Mi".into()),
                ..GcRuleSection::default()
            }],
            ..GcSection::default()
        };
        let p = section.parse().unwrap();
        assert_eq!(p.interval, Some(Duration::from_secs(60)));
        assert_eq!(p.limits.max_used_space, Some(Size::Percent(80.0)));
        assert_eq!(
            p.rules[0].limits.max_used_space,
            Some(Size::Bytes(512 << 20))
        );
        let text = p.to_toml();
        assert_eq!(
            text,
            "[gc]\nenabled = true\ninterval = \"60s\"\nkeep-duration = \"172800s\"\n\
             reserved-space = \"10737418240\"\nmax-used-space = \"80%\"\n\n[[gc.rules]]\n\
             all = false\nfilters = [\"type==source.local\"]\nkeep-duration = \"172800s\"\n\
             max-used-space = \"536870912\"\n"
        );
        // The global limits apply last, as a rule matching everything.
        let rules = p.effective_rules();
        assert_eq!(rules.len(), 2);
        assert!(rules[1].all && rules[1].filters.is_empty());
        assert_eq!(Policy::default().to_toml(), "");
    }

    #[test]
    fn bad_section_names_the_key() {
        let s = GcSection {
            rules: vec![
                GcRuleSection::default(),
                GcRuleSection {
                    min_free_space: Some("lots".into()),
                    ..GcRuleSection::default()
                },
            ],
            ..GcSection::default()
        };
        let e = s.parse().unwrap_err().to_string();
        assert!(e.contains("gc.rules[1].min-free-space"), "{e}");
        let s = GcSection {
            rules: vec![GcRuleSection {
                filters: vec!["type=".into()],
                ..GcRuleSection::default()
            }],
            ..GcSection::default()
        };
        let e = s.parse().unwrap_err().to_string();
        assert!(e.contains("gc.rules[0].filters"), "{e}");
        let s = GcSection {
            interval: Some("0".into()),
            ..GcSection::default()
        };
        assert!(s.parse().unwrap_err().to_string().contains("gc.interval"));
    }

    #[test]
    fn toml_strings_escape() {
        assert_eq!(toml_string("say \"hi\""), "\"say \\\"hi\\\"\"");
        assert_eq!(toml_string("a\\b\n"), "\"a\\\\b\\n\"");
    }
}
