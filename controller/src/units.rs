//! Parsing of the sizes and durations a pool spec holds as strings: GC sizes as BuildKit
//! accepts them (bytes, binary units, percentages of the disk) and durations (`48h`, `7d`).
//!
//! The parsers are Kiln's admin contract with the worker and live in [`kiln_proto::gc`];
//! this module re-exports them for `render` and `tls` and checks that the CRD's schema
//! patterns agree with them.

pub use kiln_proto::gc::{format_duration_secs, parse_duration, ParseError, Size};

#[cfg(test)]
mod tests {

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
