//! Parsing of the sizes and durations a pool spec holds as strings: GC sizes as BuildKit
//! accepts them (bytes, binary units, percentages of the disk) and durations (`48h`, `7d`).
//!
//! The parsers are Kiln's admin contract with the worker and live in [`kiln_proto::gc`];
//! this module re-exports them for `render` and `tls` and checks that the CRD's schema
//! patterns agree with them.

pub use kiln_proto::gc::{format_duration_secs, parse_duration, ParseError, Size};

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
