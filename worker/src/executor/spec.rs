//! The OCI runtime spec (config.json) of a build step, built with oci-spec: process,
//! user (resolved in the rootfs's `/etc/passwd` and `/etc/group`), Docker-like default
//! capabilities, masked paths and mounts, generated `/etc/hosts`, `/etc/resolv.conf` and
//! `/etc/hostname` bind-mounted read-only from the bundle, and the step's own mounts.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxDeviceCgroupBuilder,
    LinuxResourcesBuilder, Mount, MountBuilder, PosixRlimitBuilder, PosixRlimitType,
    ProcessBuilder, RootBuilder, Spec, SpecBuilder, UserBuilder,
};

use super::{network, Error, MountKind, ProcessSpec, Result};
use crate::snapshot::resolve_in_root;

/// `PATH` given to processes whose environment has none.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Hostname used when the spec has none.
pub const DEFAULT_HOSTNAME: &str = "kiln";

/// Most open files a process may have (lowered to the worker's own hard limit, which
/// it cannot raise without `CAP_SYS_RESOURCE`).
const NOFILE: u64 = 1_048_576;

/// [`NOFILE`], or the worker's hard limit on open files when that is lower.
fn nofile_limit() -> u64 {
    let hard = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(4).map(str::to_string))
        });
    match hard.as_deref().map(str::parse::<u64>) {
        Some(Ok(h)) => h.min(NOFILE),
        _ => NOFILE,
    }
}

/// A resolved process identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary group ids.
    pub additional_gids: Vec<u32>,
}

/// Files generated in the bundle and bind-mounted over the rootfs's.
#[derive(Debug, Clone)]
pub struct EtcFiles {
    /// `/etc/hosts`.
    pub hosts: PathBuf,
    /// `/etc/resolv.conf`.
    pub resolv_conf: PathBuf,
    /// `/etc/hostname`.
    pub hostname: PathBuf,
}

fn spec_err(what: &str) -> impl FnOnce(oci_spec::OciSpecError) -> Error + '_ {
    move |e| Error::Spec(format!("{what}: {e}"))
}

/// Reads `/etc/<name>` of `rootfs` (resolved inside it) as `:`-separated records.
fn read_db(rootfs: &Path, name: &str) -> Result<Option<Vec<Vec<String>>>> {
    let path = resolve_in_root(rootfs, &format!("/etc/{name}"), true)?;
    match std::fs::read_to_string(&path) {
        Ok(s) => Ok(Some(
            s.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(|l| l.split(':').map(str::to_string).collect())
                .collect(),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Io {
            op: "read",
            path,
            source,
        }),
    }
}

fn field_u32(rec: &[String], i: usize) -> Option<u32> {
    rec.get(i).and_then(|s| s.parse().ok())
}

/// Resolves `user[:group]` (names or numbers; empty = root) against the rootfs's
/// `/etc/passwd` and `/etc/group`. Numbers need no files; a name that is not found is
/// an error naming it. Supplementary groups are those listing the user as a member,
/// unless a group is given explicitly.
pub fn resolve_user(rootfs: &Path, user: &str) -> Result<User> {
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let u = if u.is_empty() { "0" } else { u };
    let err = |message: String| Error::User {
        user: user.to_string(),
        message,
    };
    let passwd = read_db(rootfs, "passwd")?;
    let entry = passwd.as_ref().and_then(|db| {
        db.iter()
            .find(|r| match u.parse::<u32>() {
                Ok(n) => field_u32(r, 2) == Some(n),
                Err(_) => r.first().map(String::as_str) == Some(u),
            })
            .cloned()
    });
    let (uid, name, mut gid) = match (u.parse::<u32>(), &entry) {
        (Ok(n), Some(r)) => (n, r.first().cloned(), field_u32(r, 3).unwrap_or(0)),
        (Ok(n), None) => (n, None, 0),
        (Err(_), Some(r)) => (
            field_u32(r, 2).ok_or_else(|| err("malformed /etc/passwd entry".into()))?,
            Some(u.to_string()),
            field_u32(r, 3).ok_or_else(|| err("malformed /etc/passwd entry".into()))?,
        ),
        (Err(_), None) if passwd.is_none() => {
            return Err(err(format!(
                "no /etc/passwd in the rootfs to look up {u:?}"
            )))
        }
        (Err(_), None) => return Err(err(format!("no user {u:?} in /etc/passwd"))),
    };
    let groups = read_db(rootfs, "group")?;
    let mut additional_gids = Vec::new();
    match g {
        Some(g) if !g.is_empty() => {
            gid = match g.parse::<u32>() {
                Ok(n) => n,
                Err(_) => groups
                    .as_ref()
                    .and_then(|db| db.iter().find(|r| r.first().map(String::as_str) == Some(g)))
                    .and_then(|r| field_u32(r, 2))
                    .ok_or_else(|| err(format!("no group {g:?} in /etc/group")))?,
            };
        }
        _ => {
            if let (Some(name), Some(db)) = (&name, &groups) {
                for r in db {
                    let member = r
                        .get(3)
                        .is_some_and(|m| m.split(',').any(|m| m.trim() == name));
                    if let (true, Some(id)) = (member, field_u32(r, 2)) {
                        if id != gid && !additional_gids.contains(&id) {
                            additional_gids.push(id);
                        }
                    }
                }
            }
        }
    }
    Ok(User {
        uid,
        gid,
        additional_gids,
    })
}

/// Creates the working directory `cwd` in `rootfs` (resolved inside it) if missing.
pub fn ensure_cwd(rootfs: &Path, cwd: &str) -> Result<()> {
    let cwd = if cwd.is_empty() { "/" } else { cwd };
    let path = resolve_in_root(rootfs, cwd, true)?;
    std::fs::create_dir_all(&path).map_err(|source| Error::Io {
        op: "mkdir",
        path,
        source,
    })
}

/// Writes `hosts`, `resolv.conf` and `hostname` for `spec` into `bundle`.
pub fn write_etc_files(bundle: &Path, spec: &ProcessSpec) -> Result<EtcFiles> {
    let hostname = hostname(spec);
    let files = EtcFiles {
        hosts: bundle.join("hosts"),
        resolv_conf: bundle.join("resolv.conf"),
        hostname: bundle.join("hostname"),
    };
    let contents = [
        (&files.hosts, network::hosts(hostname, &spec.extra_hosts)),
        (&files.resolv_conf, network::resolv_conf(spec.network)),
        (&files.hostname, format!("{hostname}\n")),
    ];
    for (path, data) in contents {
        std::fs::write(path, data).map_err(|source| Error::Io {
            op: "write",
            path: path.clone(),
            source,
        })?;
    }
    Ok(files)
}

fn hostname(spec: &ProcessSpec) -> &str {
    if spec.hostname.is_empty() {
        DEFAULT_HOSTNAME
    } else {
        &spec.hostname
    }
}

fn mount(dest: &str, typ: &str, source: &Path, options: &[&str]) -> Result<Mount> {
    MountBuilder::default()
        .destination(dest)
        .typ(typ)
        .source(source)
        .options(options.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .build()
        .map_err(spec_err("mount"))
}

fn mounts(spec: &ProcessSpec, etc: &EtcFiles) -> Result<Vec<Mount>> {
    let mut m = vec![
        mount(
            "/proc",
            "proc",
            Path::new("proc"),
            &["nosuid", "noexec", "nodev"],
        )?,
        mount(
            "/dev",
            "tmpfs",
            Path::new("tmpfs"),
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        mount(
            "/dev/pts",
            "devpts",
            Path::new("devpts"),
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        )?,
        mount(
            "/dev/shm",
            "tmpfs",
            Path::new("shm"),
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        )?,
        mount(
            "/dev/mqueue",
            "mqueue",
            Path::new("mqueue"),
            &["nosuid", "noexec", "nodev"],
        )?,
        mount(
            "/sys",
            "sysfs",
            Path::new("sysfs"),
            &["nosuid", "noexec", "nodev", "ro"],
        )?,
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            Path::new("cgroup"),
            &["nosuid", "noexec", "nodev", "relatime", "ro"],
        )?,
        mount("/etc/hosts", "bind", &etc.hosts, &["rbind", "ro"])?,
        mount(
            "/etc/resolv.conf",
            "bind",
            &etc.resolv_conf,
            &["rbind", "ro"],
        )?,
        mount("/etc/hostname", "bind", &etc.hostname, &["rbind", "ro"])?,
    ];
    for ms in &spec.mounts {
        match &ms.kind {
            MountKind::Bind(src) => {
                let opts: &[&str] = if ms.readonly {
                    &["rbind", "ro"]
                } else {
                    &["rbind"]
                };
                m.push(mount(&ms.dest, "bind", src, opts)?);
            }
            MountKind::Tmpfs(size) => {
                let size = format!("size={size}");
                let mut opts = vec!["nosuid", "nodev", "mode=1777"];
                if !size.ends_with("=0") {
                    opts.push(&size);
                }
                if ms.readonly {
                    opts.push("ro");
                }
                m.push(mount(&ms.dest, "tmpfs", Path::new("tmpfs"), &opts)?);
            }
        }
    }
    Ok(m)
}

/// Docker's default capability set.
fn default_caps() -> Vec<Capability> {
    vec![
        Capability::Chown,
        Capability::DacOverride,
        Capability::Fsetid,
        Capability::Fowner,
        Capability::Mknod,
        Capability::NetRaw,
        Capability::Setgid,
        Capability::Setuid,
        Capability::Setfcap,
        Capability::Setpcap,
        Capability::NetBindService,
        Capability::SysChroot,
        Capability::Kill,
        Capability::AuditWrite,
    ]
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The runtime spec for running `spec` as container `id` on `rootfs`, with the
/// generated files `etc`; the user is resolved inside `rootfs`.
pub fn build(id: &str, rootfs: &Path, spec: &ProcessSpec, etc: &EtcFiles) -> Result<Spec> {
    if spec.args.is_empty() {
        return Err(Error::Spec("process has no arguments".into()));
    }
    let user = resolve_user(rootfs, &spec.user)?;
    let mut env = spec.env.clone();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, DEFAULT_PATH.to_string());
    }
    let caps: oci_spec::runtime::Capabilities = default_caps().into_iter().collect();
    let process = ProcessBuilder::default()
        .terminal(false)
        .args(spec.args.clone())
        .env(env)
        .cwd(if spec.cwd.is_empty() { "/" } else { &spec.cwd })
        .user(
            UserBuilder::default()
                .uid(user.uid)
                .gid(user.gid)
                .additional_gids(user.additional_gids)
                .build()
                .map_err(spec_err("user"))?,
        )
        .no_new_privileges(true)
        .rlimits(vec![PosixRlimitBuilder::default()
            .typ(PosixRlimitType::RlimitNofile)
            .soft(nofile_limit())
            .hard(nofile_limit())
            .build()
            .map_err(spec_err("rlimit"))?])
        .capabilities(
            LinuxCapabilitiesBuilder::default()
                .bounding(caps.clone())
                .effective(caps.clone())
                .permitted(caps)
                .build()
                .map_err(spec_err("capabilities"))?,
        )
        .build()
        .map_err(spec_err("process"))?;
    let linux = LinuxBuilder::default()
        .namespaces(network::namespaces(spec.network)?)
        .cgroups_path(PathBuf::from(format!("/kiln/{id}")))
        .resources(
            LinuxResourcesBuilder::default()
                .devices(vec![LinuxDeviceCgroupBuilder::default()
                    .allow(false)
                    .access("rwm")
                    .build()
                    .map_err(spec_err("devices"))?])
                .build()
                .map_err(spec_err("resources"))?,
        )
        .masked_paths(strings(&[
            "/proc/asound",
            "/proc/acpi",
            "/proc/kcore",
            "/proc/keys",
            "/proc/latency_stats",
            "/proc/timer_list",
            "/proc/timer_stats",
            "/proc/sched_debug",
            "/proc/scsi",
            "/sys/firmware",
            "/sys/devices/virtual/powercap",
        ]))
        .readonly_paths(strings(&[
            "/proc/bus",
            "/proc/fs",
            "/proc/irq",
            "/proc/sys",
            "/proc/sysrq-trigger",
        ]))
        .build()
        .map_err(spec_err("linux"))?;
    SpecBuilder::default()
        .version("1.0.2")
        .hostname(hostname(spec))
        .root(
            RootBuilder::default()
                .path(rootfs)
                .readonly(spec.readonly_rootfs)
                .build()
                .map_err(spec_err("root"))?,
        )
        .process(process)
        .mounts(mounts(spec, etc)?)
        .linux(linux)
        .build()
        .map_err(spec_err("spec"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::{MountSpec, Network};

    fn rootfs_with_users() -> anyhow::Result<tempfile::TempDir> {
        let t = tempfile::tempdir()?;
        std::fs::create_dir_all(t.path().join("etc"))?;
        std::fs::write(
            t.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        )?;
        std::fs::write(
            t.path().join("etc/group"),
            "root:x:0:\napp:x:1000:\nwheel:x:10:root,app\naudio:x:29:app\n",
        )?;
        Ok(t)
    }

    #[test]
    fn users_resolve_by_name_and_number() -> anyhow::Result<()> {
        let t = rootfs_with_users()?;
        let r = t.path();
        assert_eq!(
            resolve_user(r, "app")?,
            User {
                uid: 1000,
                gid: 1000,
                additional_gids: vec![10, 29]
            }
        );
        assert_eq!(resolve_user(r, "")?.uid, 0);
        assert_eq!(resolve_user(r, "")?.additional_gids, vec![10]);
        assert_eq!(resolve_user(r, "app:audio")?.gid, 29);
        assert!(resolve_user(r, "app:audio")?.additional_gids.is_empty());
        assert_eq!(resolve_user(r, "1000")?.gid, 1000);
        assert_eq!(
            resolve_user(r, "1234:55")?,
            User {
                uid: 1234,
                gid: 55,
                additional_gids: vec![]
            }
        );
        let e = resolve_user(r, "nobody")
            .err()
            .ok_or_else(|| anyhow::anyhow!("expected an error"))?;
        assert!(e.to_string().contains("nobody"), "{e}");
        let e = resolve_user(r, "app:nogroup")
            .err()
            .ok_or_else(|| anyhow::anyhow!("expected an error"))?;
        assert!(e.to_string().contains("nogroup"), "{e}");
        let empty = tempfile::tempdir()?;
        assert_eq!(resolve_user(empty.path(), "5:6")?.gid, 6);
        assert!(resolve_user(empty.path(), "app").is_err());
        Ok(())
    }

    #[test]
    fn passwd_symlink_cannot_escape_rootfs() -> anyhow::Result<()> {
        let t = tempfile::tempdir()?;
        std::fs::create_dir_all(t.path().join("etc"))?;
        std::os::unix::fs::symlink("../../../../../etc/passwd", t.path().join("etc/passwd"))?;
        // The host's /etc/passwd has root; inside the rootfs there is no passwd at all.
        assert!(resolve_user(t.path(), "root").is_err());
        Ok(())
    }

    #[test]
    fn spec_has_namespaces_mounts_and_user() -> anyhow::Result<()> {
        let t = rootfs_with_users()?;
        let bundle = tempfile::tempdir()?;
        let spec = ProcessSpec {
            args: vec!["true".into()],
            user: "app".into(),
            network: Network::None,
            mounts: vec![MountSpec {
                dest: "/cache".into(),
                kind: MountKind::Tmpfs(1 << 20),
                readonly: false,
            }],
            ..ProcessSpec::default()
        };
        let etc = write_etc_files(bundle.path(), &spec)?;
        let s = build("x1", t.path(), &spec, &etc)?;
        let json = serde_json::to_value(&s)?;
        assert_eq!(json["process"]["user"]["uid"], 1000);
        assert_eq!(json["process"]["env"][0], DEFAULT_PATH);
        assert_eq!(json["hostname"], DEFAULT_HOSTNAME);
        assert_eq!(json["linux"]["cgroupsPath"], "/kiln/x1");
        let ns: Vec<String> = json["linux"]["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n["type"].as_str().map(str::to_string))
            .collect();
        assert!(ns.contains(&"network".to_string()), "{ns:?}");
        let dests: Vec<&str> = json["mounts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["destination"].as_str())
            .collect();
        for d in [
            "/proc",
            "/dev/pts",
            "/etc/hosts",
            "/etc/resolv.conf",
            "/cache",
        ] {
            assert!(dests.contains(&d), "{d} missing in {dests:?}");
        }
        assert!(std::fs::read_to_string(&etc.hosts)?.contains(DEFAULT_HOSTNAME));
        Ok(())
    }
}
