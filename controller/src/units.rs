//! Parsing of the sizes and durations a pool spec holds as strings: GC sizes as BuildKit
//! accepts them (bytes, binary units, percentages of the disk) and durations (`48h`, `7d`).
//!
//! Pure functions with no Kubernetes types; `render` and `tls` use them.

use std::fmt;
use std::time::Duration;

/// A size that failed to parse, or a duration; `field` names the spec field it came from.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {what} {value:?} in {field}: {reason}")]
pub struct ParseError {
    /// What was expected (`size` or `duration`).
    pub what: &'static str,
    /// The spec field, e.g. `spec.gc.reservedSpace`.
    pub field: String,
    /// The text that was given.
    pub value: String,
    /// Why it was rejected.
    pub reason: &'static str,
}

/// A GC size: absolute bytes or a percentage of the disk the cache lives on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Size {
    /// A number of bytes.
    Bytes(u64),
    /// A percentage (0–100) of the disk's total size.
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

    /// The absolute size on a disk of `disk_bytes` total bytes.
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
/// therefore BuildKit accept.
pub fn format_duration_secs(d: Duration) -> String {
    format!("{}s", d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn size(s: &str) -> Size {
        Size::parse(s, "spec.gc.reservedSpace").unwrap()
    }

    #[test]
    fn sizes_in_every_form_buildkit_accepts() {
        assert_eq!(size("1000000"), Size::Bytes(1_000_000));
        assert_eq!(size("512Mi"), Size::Bytes(512 << 20));
        assert_eq!(size("10GB"), Size::Bytes(10 * GIB));
        assert_eq!(size("10gb"), Size::Bytes(10 * GIB));
        assert_eq!(size("1.5GiB"), Size::Bytes(GIB + GIB / 2));
        assert_eq!(size("2g"), Size::Bytes(2 * GIB));
        assert_eq!(size("3 k"), Size::Bytes(3072));
        assert_eq!(size("7B"), Size::Bytes(7));
        assert_eq!(size("1T"), Size::Bytes(1 << 40));
        assert_eq!(size("80%"), Size::Percent(80.0));
        assert_eq!(size("12.5%"), Size::Percent(12.5));
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
    fn schema_patterns_agree_with_the_parsers() {
        // The CRD patterns must accept what the parsers accept (and reject the obvious junk),
        // or the API server and the controller disagree on the same input.
        let size_ok = ["1000000", "512Mi", "10GB", "1.5GiB", "2g", "80%", "12.5%"];
        let dur_ok = ["48h", "30m", "7d", "1h30m", "250ms", "2w"];
        let size_re = simple_regex(crate::crd::SIZE_PATTERN);
        let dur_re = simple_regex(crate::crd::DURATION_PATTERN);
        for s in size_ok {
            assert!(size_re(s), "pattern rejects {s}");
        }
        for s in dur_ok {
            assert!(dur_re(s), "pattern rejects {s}");
        }
        for s in ["GB", "-1", "10XB"] {
            assert!(!size_re(s), "pattern accepts {s}");
        }
        for s in ["48", "5y", "h"] {
            assert!(!dur_re(s), "pattern accepts {s}");
        }
    }

    /// The patterns are checked with the `regex` engine the API server's (RE2) semantics match.
    fn simple_regex(p: &'static str) -> impl Fn(&str) -> bool {
        let re = regex::Regex::new(p).unwrap();
        move |s| re.is_match(s)
    }
}
