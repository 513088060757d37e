//! Test helpers shared by the layer and exporter tests: a sample tree and a description
//! of a tree to compare.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use nix::sys::stat::{Mode, SFlag};
use sha2::{Digest, Sha256};

/// Everything about a tree an exporter must keep, by relative path.
pub(crate) fn describe(root: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut inodes: HashMap<u64, String> = HashMap::new();
    for e in walkdir::WalkDir::new(root).min_depth(1).sort_by_file_name() {
        let e = e?;
        let rel = e.path().strip_prefix(root)?.to_string_lossy().into_owned();
        let m = std::fs::symlink_metadata(e.path())?;
        let ft = m.file_type();
        let kind = if ft.is_dir() {
            "dir".to_string()
        } else if ft.is_symlink() {
            format!("link->{}", std::fs::read_link(e.path())?.display())
        } else if ft.is_file() {
            let first = inodes.entry(m.ino()).or_insert_with(|| rel.clone()).clone();
            format!(
                "file {} ino-of {first}",
                hex::encode(Sha256::digest(std::fs::read(e.path())?))
            )
        } else if ft.is_char_device() {
            format!("chr {}", m.rdev())
        } else if ft.is_fifo() {
            "fifo".to_string()
        } else {
            format!("other {}", m.rdev())
        };
        let mut xs: Vec<String> = Vec::new();
        for n in xattr::list(e.path())? {
            let v = xattr::get(e.path(), &n)?.unwrap_or_default();
            xs.push(format!(
                "{}={}",
                n.to_string_lossy(),
                String::from_utf8_lossy(&v)
            ));
        }
        xs.sort();
        let mode = if ft.is_symlink() {
            0
        } else {
            m.mode() & 0o7777
        };
        out.insert(
            rel,
            format!(
                "{kind} mode={mode:o} {}:{} mtime={} xattrs={xs:?}",
                m.uid(),
                m.gid(),
                m.mtime()
            ),
        );
    }
    Ok(out)
}

/// A tree with files, dirs, links, a fifo and owners; `layer` adds a whiteout device and
/// an opaque dir.
pub(crate) fn sample_tree(root: &Path, layer: bool) -> anyhow::Result<()> {
    std::fs::create_dir_all(root.join("etc/app"))?;
    std::fs::write(root.join("etc/app/conf"), b"key=value\n")?;
    std::fs::set_permissions(root.join("etc/app/conf"), PermissionsExt::from_mode(0o640))?;
    std::os::unix::fs::lchown(root.join("etc/app/conf"), Some(1000), Some(2000))?;
    xattr::set(root.join("etc/app/conf"), "user.note", b"hi")?;
    std::fs::create_dir(root.join("bin"))?;
    std::fs::write(root.join("bin/tool"), vec![3u8; 70_000])?;
    std::fs::set_permissions(root.join("bin/tool"), PermissionsExt::from_mode(0o755))?;
    std::fs::hard_link(root.join("bin/tool"), root.join("bin/tool2"))?;
    std::os::unix::fs::symlink("tool", root.join("bin/t"))?;
    std::fs::create_dir(root.join("tmp"))?;
    std::fs::set_permissions(root.join("tmp"), PermissionsExt::from_mode(0o1777))?;
    nix::sys::stat::mknod(
        &root.join("fifo"),
        SFlag::S_IFIFO,
        Mode::from_bits_truncate(0o600),
        0,
    )?;
    if layer {
        nix::sys::stat::mknod(
            &root.join("etc/gone"),
            SFlag::S_IFCHR,
            Mode::empty(),
            nix::sys::stat::makedev(0, 0),
        )?;
        std::fs::create_dir(root.join("var"))?;
        xattr::set(root.join("var"), "trusted.overlay.opaque", b"y")?;
        std::fs::write(root.join("var/new"), b"new")?;
    }
    for e in walkdir::WalkDir::new(root).contents_first(true) {
        let e = e?;
        let ts = nix::sys::time::TimeSpec::new(1_650_000_000, 0);
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            e.path(),
            &ts,
            &ts,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )?;
    }
    Ok(())
}
