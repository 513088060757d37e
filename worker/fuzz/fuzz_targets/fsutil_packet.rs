//! Feeds an arbitrary fsutil packet sequence (the sender's side of `DiffCopy`) to the
//! worker's real receiver ([`receive_stream`]) writing into a temp dir. Any sequence
//! must give a tree or an error, never a panic, and nothing outside the destination may
//! be created or changed: not next to it, not at the absolute paths the packets name.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use kiln_proto::fsutil::mode;
use kiln_proto::fsutil::types::{Packet, Stat};
use kiln_worker::session::filesync::receive_stream;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

const CANARY: &[u8] = b"kiln fuzz canary: must never change\n";
/// An absolute path the packets may name; it must never be created.
const ABS: &str = "/tmp/kiln-fuzz-fsutil-escape";

const PARTS: &[&str] = &[
    "a",
    "b",
    "c",
    "..",
    ".",
    "",
    "/",
    "a/b",
    "../a",
    "../../canary",
    "a/../b",
    ABS,
    "\0",
    "x/",
    "canary",
];

fn path(u: &mut Unstructured) -> Result<String> {
    if u.ratio(1, 6)? {
        return u.arbitrary();
    }
    let n = u.int_in_range(1..=3)?;
    let mut parts = Vec::with_capacity(n);
    for _ in 0..n {
        parts.push(*u.choose(PARTS)?);
    }
    Ok(parts.join("/"))
}

fn stat(u: &mut Unstructured) -> Result<Stat> {
    let modes = [
        mode::DIR | 0o755,
        0o644,
        0o4755,
        mode::SYMLINK | 0o777,
        mode::DEVICE | 0o600,
        mode::DEVICE | mode::CHAR_DEVICE | 0o600,
        mode::NAMED_PIPE | 0o600,
        mode::SOCKET | 0o600,
        mode::IRREGULAR,
    ];
    let m = if u.ratio(1, 8)? {
        u.arbitrary()?
    } else {
        *u.choose(&modes)?
    };
    let linkname = if u.ratio(1, 2)? {
        String::new()
    } else {
        path(u)?
    };
    let mut xattrs = std::collections::HashMap::new();
    if u.ratio(1, 8)? {
        let keys = [
            "user.k",
            "trusted.overlay.opaque",
            "security.capability",
            "",
        ];
        xattrs.insert(u.choose(&keys)?.to_string(), u.arbitrary::<Vec<u8>>()?);
    }
    Ok(Stat {
        path: path(u)?,
        mode: m,
        uid: u.int_in_range(0..=2)?,
        gid: u.int_in_range(0..=2)?,
        size: u.int_in_range(0..=64)?,
        mod_time: u.arbitrary()?,
        linkname,
        devmajor: u.int_in_range(0..=2)?,
        devminor: u.int_in_range(0..=2)?,
        xattrs,
    })
}

fn packets(u: &mut Unstructured) -> Result<Vec<Packet>> {
    let mut out = Vec::new();
    while !u.is_empty() && out.len() < 48 {
        // STAT (twice as likely), end of listing, DATA, FIN, ERR, REQ (not the sender's).
        let (kind, stat, data) = match u.int_in_range(0..=6)? {
            0 | 5 => (0, Some(stat(u)?), false),
            1 => (0, None, false),
            2 => (2, None, true),
            3 => (3, None, false),
            4 => (4, None, true),
            _ => (1, None, false),
        };
        let mut p = Packet {
            r#type: kind,
            stat,
            ..Packet::default()
        };
        if data {
            p.id = u.int_in_range(0..=8)?;
            p.data = if u.ratio(1, 3)? {
                Vec::new()
            } else {
                u.arbitrary()?
            };
        }
        out.push(p);
    }
    Ok(out)
}

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

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(packets) = packets(&mut Unstructured::new(data)) else {
        return;
    };
    let Ok(t) = tempfile::Builder::new()
        .prefix("kiln-fuzz-fsutil-")
        .tempdir()
    else {
        return;
    };
    // outer/{canary, a/b/root}: an escape lands in a/b, a or outer.
    let outer = t.path();
    let canary = outer.join("canary");
    let dest = outer.join("a/b/root");
    if std::fs::write(&canary, CANARY).is_err() || std::fs::create_dir_all(&dest).is_err() {
        return;
    }
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let mut inbound = futures::stream::iter(packets.into_iter().map(Ok));
    let _ = runtime().block_on(receive_stream(&mut inbound, tx, &dest));
    assert_eq!(names(outer), ["a", "canary"]);
    assert_eq!(names(&outer.join("a")), ["b"]);
    assert_eq!(names(&outer.join("a/b")), ["root"]);
    assert!(std::fs::symlink_metadata(&dest).is_ok_and(|m| m.is_dir()));
    assert_eq!(std::fs::read(&canary).ok().as_deref(), Some(CANARY));
    assert!(std::fs::symlink_metadata(ABS).is_err(), "{ABS} was created");
});
