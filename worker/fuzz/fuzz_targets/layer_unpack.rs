//! Unpacks arbitrary bytes as a layer blob (plain, gzip or zstd tar, sniffed as the
//! worker does when the media type says nothing) with the worker's real unpacking code
//! into a temp dir. Any input must give a layer or an error, never a panic, and nothing
//! outside the layer directory may be created, removed or changed.
#![no_main]

use std::path::Path;

use kiln_worker::snapshot::layer::{unpack_blob, UnpackLimits};
use libfuzzer_sys::fuzz_target;

const CANARY: &[u8] = b"kiln fuzz canary: must never change\n";

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fuzz_target!(|data: &[u8]| {
    let Ok(t) = tempfile::Builder::new()
        .prefix("kiln-fuzz-layer-")
        .tempdir()
    else {
        return;
    };
    // outer/{canary, blob, a/b/layer}: an escape lands in a/b, a or outer.
    let outer = t.path();
    let canary = outer.join("canary");
    let blob = outer.join("blob");
    let dest = outer.join("a/b/layer");
    if std::fs::write(&canary, CANARY).is_err()
        || std::fs::write(&blob, data).is_err()
        || std::fs::create_dir_all(&dest).is_err()
    {
        return;
    }
    let limits = UnpackLimits {
        max_bytes: 16 << 20,
    };
    let _ = unpack_blob(&blob, "", &dest, &limits);
    assert_eq!(names(outer), ["a", "blob", "canary"]);
    assert_eq!(names(&outer.join("a")), ["b"]);
    assert_eq!(names(&outer.join("a/b")), ["layer"]);
    assert!(std::fs::symlink_metadata(&dest).is_ok_and(|m| m.is_dir()));
    assert_eq!(std::fs::read(&canary).ok().as_deref(), Some(CANARY));
});
