//! Kernel overlayfs mounts. Layer directories are passed to the kernel as
//! `/proc/self/fd/N` paths of descriptors held open during the `mount(2)` call, so the
//! option string stays short (about 20 bytes a layer) whatever the real paths are, and
//! commas or colons in those paths need no escaping. In stacks of more than 128 layers
//! the bottom ones are first mounted as one read-only overlay that serves as the lowest
//! lower (overlay allows one level of such nesting), for at most [`MAX_LAYERS`].
//! Writable mounts disable the
//! overlay features that would make an upper dir depend on its lowers.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::{fsutil, ActiveMount, Error, MountState, Result};

/// Largest option string `mount(2)` accepts (one page, with the terminating NUL).
const MAX_OPTIONS: usize = 4095;

fn mount_err(target: &Path, message: String) -> Error {
    Error::Mount {
        target: target.to_path_buf(),
        message,
    }
}

/// Opens `dir` and returns the descriptor with its `/proc/self/fd` path.
fn open_dir(dir: &Path) -> Result<(File, String)> {
    use std::os::fd::AsRawFd;
    let f = File::open(dir).map_err(fsutil::io_err("open", dir))?;
    if !f.metadata().map_err(fsutil::io_err("stat", dir))?.is_dir() {
        return Err(Error::Io {
            op: "open",
            path: dir.to_path_buf(),
            source: std::io::Error::from_raw_os_error(libc::ENOTDIR),
        });
    }
    let p = format!("/proc/self/fd/{}", f.as_raw_fd());
    Ok((f, p))
}

/// `lowerdir=` value for `layers` (lowest first): overlay wants the top layer first.
fn lowerdir(layers: &[PathBuf], held: &mut Vec<File>) -> Result<String> {
    let mut parts = Vec::with_capacity(layers.len());
    for l in layers.iter().rev() {
        let (f, p) = open_dir(l)?;
        held.push(f);
        parts.push(p);
    }
    Ok(parts.join(":"))
}

fn do_mount(target: &Path, options: &str, flags: MsFlags) -> Result<()> {
    if options.len() > MAX_OPTIONS {
        return Err(mount_err(
            target,
            format!(
                "overlay options are {} bytes, more than the kernel's {MAX_OPTIONS}",
                options.len()
            ),
        ));
    }
    mount(
        Some("overlay"),
        target,
        Some("overlay"),
        flags,
        Some(options),
    )
    .map_err(|e| mount_err(target, format!("overlay: {e}")))
}

/// Most layers passed to one overlay mount; longer stacks are grouped.
const MAX_DIRECT_LAYERS: usize = 128;

/// Most layers an overlay-kind mount may stack: the bottom ones are grouped into one read-only overlay
/// under the rest (overlay nests only one level deep).
pub const MAX_LAYERS: usize = 2 * MAX_DIRECT_LAYERS - 1;

/// A read-only overlay of the bottom layers of a stack too long for one mount's
/// options, standing in for them as the lowest lower. It is detached (lazily: the final
/// overlay keeps it alive) and its mount point removed when this is dropped.
///
/// Only the bottom of a stack can be grouped: a whiteout at the bottom of a group would
/// vanish from the group's merged view instead of hiding what lies below it.
struct Group {
    mount: Option<ActiveMount>,
    dir: PathBuf,
}

impl Drop for Group {
    fn drop(&mut self) {
        self.mount.take();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// `layers` as they are when few enough, else the bottom ones replaced by a read-only
/// overlay of them mounted next to `target`.
fn group_layers(layers: &[PathBuf], target: &Path) -> Result<(Vec<PathBuf>, Option<Group>)> {
    if layers.len() <= MAX_DIRECT_LAYERS {
        return Ok((layers.to_vec(), None));
    }
    if layers.len() > MAX_LAYERS {
        return Err(mount_err(
            target,
            format!(
                "{} layers are more than overlay can stack (at most {MAX_LAYERS})",
                layers.len()
            ),
        ));
    }
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "mnt".into());
    let dir = target
        .parent()
        .unwrap_or(Path::new("/"))
        .join(format!(".{name}.lower-group"));
    std::fs::create_dir_all(&dir).map_err(fsutil::io_err("mkdir", &dir))?;
    let mut group = Group {
        mount: None,
        dir: dir.clone(),
    };
    let split = layers.len() - (MAX_DIRECT_LAYERS - 1);
    group.mount = Some(mount_ro(&layers[..split], &dir)?);
    let mut lowers = vec![dir];
    lowers.extend_from_slice(&layers[split..]);
    Ok((lowers, Some(group)))
}

/// An empty directory to stand in as the only lower layer, next to `beside`.
fn empty_lower(beside: &Path) -> Result<PathBuf> {
    let name = beside
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "work".into());
    let parent = beside.parent().unwrap_or(Path::new("/"));
    let dir = parent.join(format!(".{name}.empty-lower"));
    match std::fs::create_dir(&dir) {
        Ok(()) => Ok(dir),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(dir),
        Err(e) => Err(fsutil::io_err("mkdir", &dir)(e)),
    }
}

/// A writable overlay of `layers` with `upper`/`work` at `target`.
pub(super) fn mount_rw(
    layers: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> Result<ActiveMount> {
    let (layers, group) = group_layers(layers, target)?;
    let layers = layers.as_slice();
    let mut held = Vec::new();
    let mut empty = None;
    let lower = if layers.is_empty() {
        let dir = empty_lower(work)?;
        let (f, p) = open_dir(&dir)?;
        held.push(f);
        empty = Some(dir);
        p
    } else {
        lowerdir(layers, &mut held)?
    };
    let (uf, up) = open_dir(upper)?;
    let (wf, wp) = open_dir(work)?;
    held.push(uf);
    held.push(wf);
    // Keep upper dirs self-contained layer diffs whatever the kernel's defaults: no
    // redirect xattrs for renamed directories (renames fall back to copying, EXDEV),
    // no metadata-only copy-ups, no inode index tying the upper to these lowers.
    let options = format!(
        "lowerdir={lower},upperdir={up},workdir={wp},index=off,redirect_dir=off,metacopy=off"
    );
    let res = do_mount(target, &options, MsFlags::empty());
    drop(held);
    drop(group);
    if let Err(e) = res {
        if let Some(dir) = &empty {
            let _ = std::fs::remove_dir(dir);
        }
        return Err(e);
    }
    Ok(ActiveMount {
        target: target.to_path_buf(),
        state: MountState::Kernel { empty_lower: empty },
    })
}

/// A read-only view of `layers` at `target`: overlay for two or more layers, a
/// read-only bind mount for one, an empty read-only tmpfs for none.
pub(super) fn mount_ro(layers: &[PathBuf], target: &Path) -> Result<ActiveMount> {
    match layers {
        [] => {
            mount(
                Some("tmpfs"),
                target,
                Some("tmpfs"),
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                Some("size=4k,mode=755"),
            )
            .map_err(|e| mount_err(target, format!("tmpfs: {e}")))?;
        }
        [one] => {
            mount(
                Some(one.as_path()),
                target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(|e| mount_err(target, format!("bind {}: {e}", one.display())))?;
            if let Err(e) = mount(
                None::<&str>,
                target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            ) {
                let _ = umount2(target, MntFlags::MNT_DETACH);
                return Err(mount_err(target, format!("remount read-only: {e}")));
            }
        }
        _ => {
            let (layers, group) = group_layers(layers, target)?;
            let mut held = Vec::new();
            let lower = lowerdir(&layers, &mut held)?;
            do_mount(target, &format!("lowerdir={lower}"), MsFlags::MS_RDONLY)?;
            drop(held);
            drop(group);
        }
    }
    Ok(ActiveMount {
        target: target.to_path_buf(),
        state: MountState::Kernel { empty_lower: None },
    })
}

/// Unmounts `target`, detaching lazily if it is busy (always lazily when `lazy`).
pub(super) fn unmount(target: &Path, lazy: bool) -> Result<()> {
    if !lazy {
        match umount2(target, MntFlags::empty()) {
            Ok(()) => return Ok(()),
            Err(Errno::EBUSY) => {}
            Err(e) => return Err(mount_err(target, format!("unmount: {e}"))),
        }
    }
    umount2(target, MntFlags::MNT_DETACH).map_err(|e| mount_err(target, format!("unmount: {e}")))
}

/// True when an overlay mount works in `scratch` (tried and undone).
pub(super) fn probe(scratch: &Path) -> bool {
    let base = scratch.join(format!(".overlay-probe-{}", std::process::id()));
    let dirs = ["lower", "upper", "work", "merged"].map(|d| base.join(d));
    let ok = (|| -> Result<bool> {
        for d in &dirs {
            std::fs::create_dir_all(d).map_err(fsutil::io_err("mkdir", d))?;
        }
        let m = mount_rw(std::slice::from_ref(&dirs[0]), &dirs[1], &dirs[2], &dirs[3])?;
        std::fs::write(dirs[3].join("probe"), b"x").map_err(fsutil::io_err("write", &dirs[3]))?;
        m.commit()?;
        Ok(dirs[1].join("probe").exists())
    })();
    let _ = std::fs::remove_dir_all(&base);
    match ok {
        Ok(v) => v,
        Err(error) => {
            tracing::info!(%error, "overlayfs unavailable, copying snapshots");
            false
        }
    }
}
