//! Ops: one [`resolve_op`] match from an LLB op to its implementation ([`source`],
//! [`exec`], [`file`]), each implementing the solver's [`Op`](crate::solver::Op) trait over
//! cache [`Ref`]s. May use `source`, `cache`, `executor` and `snapshot`.

pub mod exec;
pub mod file;
pub mod source;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use prost::Message;

use crate::cache::{Cache, Ref};
use crate::content::ContentStore;
use crate::executor::Executor;
use crate::image::Platform;
use crate::llb::pb;
use crate::snapshot::Snapshotter;
use crate::solver::{BoxError, Op, VertexCtx};
use crate::source::image::ImageResolver;

/// What can go wrong in an op.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The op is not supported.
    #[error("unsupported op: {0}")]
    Unsupported(String),
    /// The op is malformed.
    #[error("invalid op: {0}")]
    Invalid(String),
    /// A file action failed.
    #[error(transparent)]
    File(#[from] file::fsops::Error),
    /// A secret the build asked for was not given.
    #[error("secret {0} not found")]
    SecretNotFound(String),
    /// An SSH agent a RUN mounts was not forwarded by the client.
    #[error("ssh agent {0:?} not found: forward it with `kiln build --ssh {0}` (or ID=SOCKET), or mount it with required=false")]
    SshAgentNotFound(String),
    /// The build names a local directory the client did not provide.
    #[error("local {0:?} was not provided (pass --local {0}=DIR)")]
    LocalNotFound(String),
    /// A local directory fetched when the build first read it could not be fetched.
    #[error("fetching local {name:?} from the client: {message}")]
    LocalFetch {
        /// The local's name.
        name: String,
        /// What went wrong.
        message: String,
    },
}

/// Crate-local result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What every op of every build on this worker shares.
pub struct Worker {
    /// Root of the worker's state.
    pub root: PathBuf,
    /// Results.
    pub cache: Arc<Cache>,
    /// Blobs.
    pub content: Arc<ContentStore>,
    /// Mounts layer stacks.
    pub snapshotter: Snapshotter,
    /// Runs containers.
    pub executor: Executor,
    /// Registries.
    pub images: ImageResolver,
    /// Serializes users of `sharing=locked` cache mounts, by mount id.
    pub cache_mount_locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Bounds on unpacking pulled image layers.
    pub unpack_limits: crate::snapshot::layer::UnpackLimits,
}

/// What the ops of one build share.
pub struct BuildCtx {
    /// The worker.
    pub worker: Arc<Worker>,
    /// Local directories by name (`context`, `dockerfile`).
    pub locals: HashMap<String, PathBuf>,
    /// Secrets by id.
    pub secrets: HashMap<String, Vec<u8>>,
    /// Registries as this build reaches them (with the client's credentials on a daemon).
    pub images: crate::source::image::ImageResolver,
    /// The client's services (SSH agents for `RUN --mount=type=ssh`), when it has any.
    pub session: Option<Arc<dyn crate::control::SessionServices>>,
}

/// One LLB op ready to run.
pub struct LlbOp {
    build: Arc<BuildCtx>,
    /// `sha256` of the op with its inputs removed: the definition part of its cache key.
    def_key: String,
    platform: Platform,
    kind: Kind,
}

enum Kind {
    Image(source::ImageSource),
    Local(source::LocalSource),
    Git(source::GitSource),
    Http(source::HttpSource),
    Exec(Box<exec::ExecOpImpl>),
    File(Box<file::FileOpImpl>),
}

/// Maps an LLB op to its implementation.
pub fn resolve_op(op: &pb::Op, build: &Arc<BuildCtx>) -> Result<LlbOp> {
    let (kind, def_key, platform) = resolve_kind(op)?;
    Ok(LlbOp {
        build: build.clone(),
        def_key,
        platform,
        kind,
    })
}

/// Checks an LLB op as [`resolve_op`] does, without a build: `Ok` with its number of
/// outputs when the worker can run it. No I/O (the `llb_decode` fuzz target's entry).
pub fn check_op(op: &pb::Op) -> Result<usize> {
    let (kind, _, _) = resolve_kind(op)?;
    Ok(kind.outputs())
}

impl Kind {
    fn outputs(&self) -> usize {
        match self {
            Kind::Image(_) | Kind::Local(_) | Kind::Git(_) | Kind::Http(_) => 1,
            Kind::Exec(e) => e.outputs(),
            Kind::File(f) => f.outputs(),
        }
    }
}

/// The implementation of an op, the definition part of its cache key and its platform.
fn resolve_kind(op: &pb::Op) -> Result<(Kind, String, Platform)> {
    let mut stripped = op.clone();
    stripped.inputs.clear();
    let platform = op
        .platform
        .as_ref()
        .map(|p| Platform {
            os: p.os.clone(),
            architecture: p.architecture.clone(),
            variant: p.variant.clone(),
        })
        .unwrap_or_else(Platform::host);
    let kind = match &op.op {
        Some(pb::op::Op::Source(s)) => {
            let (scheme, rest) = s.identifier.split_once("://").ok_or_else(|| {
                Error::Invalid(format!(
                    "source identifier {:?} has no scheme",
                    s.identifier
                ))
            })?;
            match scheme {
                "docker-image" => Kind::Image(source::ImageSource::new(rest, &platform)),
                "local" => {
                    // Session attributes do not change the content; leave them out of the key.
                    if let Some(pb::op::Op::Source(s)) = &mut stripped.op {
                        s.attrs.retain(|k, _| {
                            !matches!(
                                k.as_str(),
                                "local.session" | "local.unique" | "local.sharedkeyhint"
                            )
                        });
                    }
                    Kind::Local(source::LocalSource::new(rest, &s.attrs)?)
                }
                "git" => Kind::Git(source::GitSource::new(rest, &s.attrs)?),
                "http" | "https" => Kind::Http(source::HttpSource::new(&s.identifier, &s.attrs)?),
                other => {
                    return Err(Error::Unsupported(format!(
                        "source {other}:// ({}) is not implemented yet",
                        s.identifier
                    )))
                }
            }
        }
        Some(pb::op::Op::Exec(e)) => {
            Kind::Exec(Box::new(exec::ExecOpImpl::new(e.clone(), op.inputs.len())?))
        }
        Some(pb::op::Op::File(f)) => {
            Kind::File(Box::new(file::FileOpImpl::new(f.clone(), op.inputs.len())?))
        }
        Some(pb::op::Op::Merge(_)) => return Err(Error::Unsupported("merge".into())),
        Some(pb::op::Op::Diff(_)) => return Err(Error::Unsupported("diff".into())),
        Some(pb::op::Op::Build(_)) => return Err(Error::Unsupported("build".into())),
        Some(pb::op::Op::Passthrough(_)) => return Err(Error::Unsupported("passthrough".into())),
        None => return Err(Error::Invalid("op without operation".into())),
    };
    Ok((
        kind,
        crate::llb::digest_of(&stripped.encode_to_vec()),
        platform,
    ))
}

#[async_trait]
impl Op for LlbOp {
    type Output = Ref;

    fn outputs(&self) -> usize {
        self.kind.outputs()
    }

    fn content_inputs(&self) -> Vec<usize> {
        match &self.kind {
            Kind::File(f) => f.content_inputs(),
            _ => Vec::new(),
        }
    }

    fn definition_key(&self) -> Option<String> {
        matches!(self.kind, Kind::File(_)).then(|| self.def_key.clone())
    }

    async fn cache_key(&self, ctx: &VertexCtx, inputs: &[Option<Ref>]) -> Result<String, BoxError> {
        let extra = match &self.kind {
            Kind::Image(i) => i.cache_key(&self.build, ctx).await?,
            Kind::Local(l) => l.cache_key(&self.build).await?,
            Kind::Git(g) => g.cache_key(&self.build).await?,
            Kind::Http(h) => h.cache_key(&self.build).await?,
            Kind::Exec(_) => String::new(),
            Kind::File(f) => f.cache_key(&self.build, inputs).await?,
        };
        Ok(format!("{}{}", self.def_key, extra))
    }

    async fn exec(&self, ctx: &VertexCtx, inputs: &[Ref]) -> Result<Vec<Ref>, BoxError> {
        match &self.kind {
            Kind::Image(i) => Ok(vec![i.exec(&self.build, ctx, &self.platform).await?]),
            Kind::Local(l) => Ok(vec![l.exec(&self.build, ctx).await?]),
            Kind::Git(g) => Ok(vec![g.exec(&self.build, ctx).await?]),
            Kind::Http(h) => Ok(vec![h.exec(&self.build, ctx).await?]),
            Kind::Exec(e) => e.exec(&self.build, ctx, inputs).await,
            Kind::File(f) => f.exec(&self.build, ctx, inputs).await,
        }
    }
}

/// Runs blocking filesystem work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BoxError> + Send + 'static,
) -> Result<T, BoxError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| -> BoxError { format!("worker thread failed: {e}").into() })?
}
