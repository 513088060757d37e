//! The exec op: mounts its inputs (root filesystem, bind, cache, tmpfs, secret and SSH agent
//! mounts),
//! runs the process in a container and commits each writable mount as a new layer on top
//! of its input.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::{BuildCtx, Error};
use crate::cache::{NewLayer, Ref};
use crate::executor::{LogChunk, MountKind, MountSpec, Network, ProcessSpec};
use crate::llb::pb;
use crate::snapshot::{resolve_in_root, ActiveMount};
use crate::solver::{BoxError, VertexCtx};

/// An exec op.
pub struct ExecOpImpl {
    op: pb::ExecOp,
    outputs: usize,
}

/// A writable mount being built, and where its result goes.
struct Writable {
    output: usize,
    base: Ref,
    layer: NewLayer,
    mount: ActiveMount,
}

// === impl ExecOpImpl ===

impl ExecOpImpl {
    /// Validates mounts against the op's `inputs` count.
    pub fn new(op: pb::ExecOp, inputs: usize) -> super::Result<ExecOpImpl> {
        let meta = op
            .meta
            .as_ref()
            .ok_or_else(|| Error::Invalid("exec op without meta".into()))?;
        if meta.args.is_empty() {
            return Err(Error::Invalid("exec op without args".into()));
        }
        let mut outputs = Vec::new();
        let mut has_root = false;
        for m in &op.mounts {
            if m.input >= inputs as i64 || m.input < -1 {
                return Err(Error::Invalid(format!(
                    "mount {} uses input {} of {}",
                    m.dest, m.input, inputs
                )));
            }
            if m.output >= 0 {
                outputs.push(m.output);
            }
            if m.dest == "/" {
                has_root = true;
            }
        }
        if !has_root {
            return Err(Error::Invalid("exec op without a root mount".into()));
        }
        outputs.sort_unstable();
        if outputs.iter().enumerate().any(|(i, o)| *o != i as i64) {
            return Err(Error::Invalid(format!(
                "exec op output indexes {outputs:?} are not 0..n"
            )));
        }
        Ok(ExecOpImpl {
            outputs: outputs.len(),
            op,
        })
    }

    /// How many outputs.
    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// Runs the process.
    pub async fn exec(
        &self,
        build: &Arc<BuildCtx>,
        ctx: &VertexCtx,
        inputs: &[Ref],
    ) -> Result<Vec<Ref>, BoxError> {
        let worker = &build.worker;
        let meta = self
            .op
            .meta
            .as_ref()
            .ok_or_else(|| Error::Invalid("exec op without meta".into()))?;
        let scratch_root = worker.root.join("mounts");
        std::fs::create_dir_all(&scratch_root)?;
        let tmp = tempfile::Builder::new()
            .prefix("exec-")
            .tempdir_in(&scratch_root)?;

        let mut writable: Vec<Writable> = Vec::new();
        let mut readonly: Vec<ActiveMount> = Vec::new();
        let mut throwaway: Vec<NewLayer> = Vec::new();
        let mut rootfs: Option<PathBuf> = None;
        let mut mounts = Vec::new();
        let mut locks = Vec::new();
        // SSH agent sockets: served while the process runs, closed when this returns.
        let mut agents: Vec<AgentSocket> = Vec::new();

        for (n, m) in self.op.mounts.iter().enumerate() {
            let base = if m.input >= 0 {
                inputs[m.input as usize].clone()
            } else {
                Ref::scratch()
            };
            let target = tmp.path().join(format!("m{n}"));
            std::fs::create_dir_all(&target)?;
            let path: PathBuf = match m.mount_type() {
                pb::MountType::Bind => {
                    let view = if m.output >= 0 || !m.readonly {
                        let layer = worker.cache.new_layer()?;
                        let mount = worker.snapshotter.mount(
                            &base.layer_dirs(),
                            &layer.fs(),
                            &layer.work(),
                            &target,
                        )?;
                        let p = mount.path().to_path_buf();
                        if m.output >= 0 {
                            writable.push(Writable {
                                output: m.output as usize,
                                base,
                                layer,
                                mount,
                            });
                        } else {
                            throwaway.push(layer);
                            readonly.push(mount);
                        }
                        p
                    } else {
                        let mount = worker
                            .snapshotter
                            .mount_readonly(&base.layer_dirs(), &target)?;
                        let p = mount.path().to_path_buf();
                        readonly.push(mount);
                        p
                    };
                    if m.selector.is_empty() || m.selector == "/" {
                        view
                    } else {
                        let p = resolve_in_root(&view, &m.selector, true)?;
                        // Say so here rather than let the runtime fail on a host path.
                        if std::fs::symlink_metadata(&p).is_err() {
                            return Err(Box::new(Error::Invalid(format!(
                                "mount {}: source {:?} not found",
                                m.dest, m.selector
                            ))));
                        }
                        p
                    }
                }
                pb::MountType::Cache => {
                    let opt = m.cache_opt.clone().unwrap_or_default();
                    let id = if opt.id.is_empty() {
                        m.dest.clone()
                    } else {
                        opt.id.clone()
                    };
                    let dir = crate::cache::mounts::dir(&worker.root, &id);
                    if !dir.exists() {
                        std::fs::create_dir_all(&dir)?;
                        // A new cache starts from its seed (the frontend's mkdir carrying
                        // uid/gid/mode): take the seed directory's owner and mode.
                        if m.input >= 0 {
                            seed_cache_dir(&base, &m.selector, &dir)?;
                        }
                    }
                    if opt.sharing() == pb::CacheSharingOpt::Locked {
                        let lock = {
                            let mut locks = worker
                                .cache_mount_locks
                                .lock()
                                .map_err(|_| -> BoxError { "cache mount lock poisoned".into() })?;
                            locks.entry(id.clone()).or_default().clone()
                        };
                        locks.push(lock.lock_owned().await);
                    }
                    dir
                }
                pb::MountType::Tmpfs => {
                    let size = m
                        .tmpfs_opt
                        .as_ref()
                        .map(|t| t.size.max(0) as u64)
                        .unwrap_or(0);
                    mounts.push(MountSpec {
                        dest: m.dest.clone(),
                        kind: MountKind::Tmpfs(size),
                        readonly: false,
                    });
                    continue;
                }
                pb::MountType::Secret => {
                    let opt = m.secret_opt.clone().unwrap_or_default();
                    let Some(data) = build.secrets.get(&opt.id) else {
                        if opt.optional {
                            continue;
                        }
                        return Err(Box::new(Error::SecretNotFound(opt.id)));
                    };
                    let dir = tmp.path().join(format!("secret{n}"));
                    std::fs::create_dir_all(&dir)?;
                    let file = dir.join("secret");
                    write_secret(&file, data, opt.uid, opt.gid, opt.mode)?;
                    file
                }
                pb::MountType::Ssh => {
                    let opt = m.ssh_opt.clone().unwrap_or_default();
                    let id = if opt.id.is_empty() {
                        crate::session::sshforward::DEFAULT_ID.to_string()
                    } else {
                        opt.id.clone()
                    };
                    let session = match &build.session {
                        Some(s) if s.has_ssh_agent(&id).await.map_err(BoxError::from)? => s.clone(),
                        _ if opt.optional => continue,
                        _ => return Err(Box::new(Error::SshAgentNotFound(id))),
                    };
                    let (sock, server) = agent_socket(session, &id, &opt)?;
                    agents.push(server);
                    sock
                }
            };
            if m.dest == "/" {
                rootfs = Some(path);
            } else {
                mounts.push(MountSpec {
                    dest: m.dest.clone(),
                    kind: MountKind::Bind(path),
                    readonly: m.readonly,
                });
            }
        }
        let rootfs = rootfs.ok_or_else(|| Error::Invalid("exec op without a root mount".into()))?;
        let root_readonly = self.op.mounts.iter().any(|m| m.dest == "/" && m.readonly);

        let mut env = meta.env.clone();
        if let Some(p) = &meta.proxy_env {
            // Both spellings, as BuildKit sets them.
            for (name, value) in [
                ("HTTP_PROXY", &p.http_proxy),
                ("HTTPS_PROXY", &p.https_proxy),
                ("FTP_PROXY", &p.ftp_proxy),
                ("NO_PROXY", &p.no_proxy),
                ("ALL_PROXY", &p.all_proxy),
            ] {
                if !value.is_empty() {
                    env.push(format!("{name}={value}"));
                    env.push(format!("{}={value}", name.to_ascii_lowercase()));
                }
            }
        }
        for se in &self.op.secretenv {
            match build.secrets.get(&se.id) {
                Some(v) => env.push(format!("{}={}", se.name, String::from_utf8_lossy(v))),
                None if se.optional => {}
                None => return Err(Box::new(Error::SecretNotFound(se.id.clone()))),
            }
        }
        let spec = ProcessSpec {
            args: meta.args.clone(),
            env,
            cwd: if meta.cwd.is_empty() {
                "/".into()
            } else {
                meta.cwd.clone()
            },
            user: meta.user.clone(),
            hostname: if meta.hostname.is_empty() {
                "kiln".into()
            } else {
                meta.hostname.clone()
            },
            network: match self.op.network() {
                pb::NetMode::None => Network::None,
                _ => Network::Host,
            },
            extra_hosts: meta
                .extra_hosts
                .iter()
                .map(|h| (h.host.clone(), h.ip.clone()))
                .collect(),
            mounts,
            readonly_rootfs: root_readonly,
        };

        let (tx, mut rx) = mpsc::unbounded_channel::<LogChunk>();
        let progress = ctx.progress.clone();
        let vertex = ctx.digest.clone();
        let forward = tokio::spawn(async move {
            while let Some(chunk) = rx.recv().await {
                progress.log(&vertex, chunk.stream, chunk.data);
            }
        });
        let id = format!(
            "kiln-{}-{}",
            &ctx.digest.trim_start_matches("sha256:")[..12.min(ctx.digest.len())],
            std::process::id()
        );
        let id = format!("{id}-{}", unique());
        let run = worker
            .executor
            .run(&id, &rootfs, &spec, tx, ctx.cancel.clone())
            .await;
        let _ = forward.await;
        drop(locks);
        // Unmount everything before committing; the layers must not be in use.
        for m in readonly {
            m.commit()?;
        }
        drop(throwaway);
        if let Err(e) = run {
            // A process writing to a full disk often reports it vaguely ("I/O error").
            let layers: Vec<String> = writable.iter().map(|w| w.layer.id().to_string()).collect();
            let what = format!("the step's new layers ({})", layers.join(", "));
            return Err(match worker.cache.no_space(&what) {
                Some(note) => format!("{e}\n{note}").into(),
                None => Box::new(e),
            });
        }

        let mut committed = Vec::new();
        let mut order = Vec::new();
        for w in writable {
            w.mount.commit()?;
            order.push((w.output, w.base));
            committed.push((w.layer, Vec::new()));
        }
        let cache = worker.cache.clone();
        let layers = super::blocking(move || Ok(cache.commit_layers(committed)?)).await?;
        let mut outs: Vec<(usize, Ref)> = order
            .into_iter()
            .zip(layers)
            .map(|((o, base), l)| (o, base.with(l)))
            .collect();
        outs.sort_by_key(|(o, _)| *o);
        drop(tmp);
        Ok(outs.into_iter().map(|(_, r)| r).collect())
    }
}

/// Gives a new cache directory the owner and mode of the seed path in `base`.
fn seed_cache_dir(base: &Ref, selector: &str, dir: &std::path::Path) -> Result<(), BoxError> {
    use std::os::unix::fs::MetadataExt;
    let layers = base.layer_dirs();
    // The seed is a small file-op result; look the path up from the top layer down.
    let sel = if selector.is_empty() { "/" } else { selector };
    for layer in layers.iter().rev() {
        let p = resolve_in_root(layer, sel, true)?;
        if let Ok(md) = std::fs::metadata(&p) {
            std::os::unix::fs::chown(dir, Some(md.uid()), Some(md.gid()))?;
            std::fs::set_permissions(
                dir,
                std::os::unix::fs::PermissionsExt::from_mode(md.mode() & 0o7777),
            )?;
            return Ok(());
        }
    }
    Ok(())
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// An SSH agent socket a RUN mounts: a listener in a private temporary directory whose
/// connections are carried to the client's agent. Dropping it stops serving.
struct AgentSocket {
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for AgentSocket {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Makes the socket of agent `id` (owner and mode from `opt`, default 0600) and serves it.
/// The socket lives outside the worker root so its path stays short (unix socket paths
/// are limited to 108 bytes) and in a 0700 directory only root can reach.
fn agent_socket(
    session: Arc<dyn crate::control::SessionServices>,
    id: &str,
    opt: &pb::SshOpt,
) -> Result<(PathBuf, AgentSocket), BoxError> {
    let dir = tempfile::Builder::new().prefix("kiln-ssh-").tempdir()?;
    let sock = dir.path().join("agent.sock");
    let listener = tokio::net::UnixListener::bind(&sock)?;
    std::os::unix::fs::chown(&sock, Some(opt.uid), Some(opt.gid))?;
    let mode = if opt.mode == 0 {
        0o600
    } else {
        opt.mode & 0o777
    };
    std::fs::set_permissions(&sock, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    let id = id.to_string();
    let task = tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let (session, id) = (session.clone(), id.clone());
            tokio::spawn(async move {
                match session.ssh_agent(&id).await {
                    Ok(Some(mut agent)) => {
                        let _ = tokio::io::copy_bidirectional(&mut conn, &mut agent).await;
                    }
                    Ok(None) => tracing::warn!(%id, "ssh agent went away"),
                    Err(e) => tracing::warn!(%id, error = %e, "cannot reach the ssh agent"),
                }
            });
        }
    });
    Ok((sock, AgentSocket { _dir: dir, task }))
}

fn write_secret(
    path: &std::path::Path,
    data: &[u8],
    uid: u32,
    gid: u32,
    mode: u32,
) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mode = if mode == 0 { 0o400 } else { mode & 0o7777 };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
}
