//! RFC 3339 timestamps with nanoseconds in UTC, as Go's `time.Time` marshals them.

use std::time::{SystemTime, UNIX_EPOCH};

/// `2026-11-27T08:14:53.123456789Z` (trailing zeros of the fraction trimmed).
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    kiln_worker::image::rfc3339(d.as_secs() as i64, d.subsec_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_like_go() {
        let t = UNIX_EPOCH + Duration::new(1_795_768_493, 120_000_000);
        assert_eq!(rfc3339(t), "2026-11-27T08:34:53.12Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
    }
}
