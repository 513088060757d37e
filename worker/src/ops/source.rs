//! Source ops: `docker-image://` (resolve, fetch layer blobs, unpack each into a layer once
//! per blob digest), `local://` (a client directory, keyed by its content) and `git://`
//! (a commit of a remote, keyed by the commit the ref resolves to) and `http(s)://` (one
//! downloaded file, keyed by its checksum when given, else by its content).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::OnceCell;

use super::{blocking, BuildCtx, Error};
use crate::cache::{Layer, Ref};
use crate::export::LayerBlob;
use crate::image::Platform;
use crate::progress::{Event, VertexStatus};
use crate::snapshot::layer::unpack_blob;
use crate::solver::{BoxError, VertexCtx};
use crate::source::image::BlobDesc;
use crate::source::local::{scan, Scan};

/// A `docker-image://` source.
pub struct ImageSource {
    reference: String,
    platform: Platform,
    pinned: bool,
}

// === impl ImageSource ===

impl ImageSource {
    /// The source for `reference` (the identifier without its scheme).
    pub fn new(reference: &str, platform: &Platform) -> ImageSource {
        ImageSource {
            reference: reference.to_string(),
            platform: platform.clone(),
            pinned: reference.contains("@sha256:"),
        }
    }

    /// The manifest digest when the reference is not pinned (a moved tag is a new key).
    pub async fn cache_key(&self, build: &BuildCtx, ctx: &VertexCtx) -> Result<String, BoxError> {
        if self.pinned {
            return Ok(String::new());
        }
        let _ = ctx;
        let resolved = build
            .images
            .resolve(&self.reference, &self.platform)
            .await?;
        Ok(format!("@{}", resolved.digest))
    }

    /// Pulls the image: each layer blob not unpacked before is fetched and unpacked.
    pub async fn exec(
        &self,
        build: &Arc<BuildCtx>,
        ctx: &VertexCtx,
        platform: &Platform,
    ) -> Result<Ref, BoxError> {
        let resolved = build.images.resolve(&self.reference, platform).await?;
        let limit = Arc::new(tokio::sync::Semaphore::new(4));
        let tasks = resolved.layers.iter().map(|desc| {
            let limit = limit.clone();
            let build = build.clone();
            let ctx = ctx.clone();
            let reference = self.reference.clone();
            let desc = desc.clone();
            async move {
                let _permit = limit.acquire().await?;
                pull_layer(&build, &ctx, &reference, &desc).await
            }
        });
        let layers = futures::future::try_join_all(tasks).await?;
        Ok(Ref::new(layers))
    }
}

async fn pull_layer(
    build: &Arc<BuildCtx>,
    ctx: &VertexCtx,
    reference: &str,
    desc: &BlobDesc,
) -> Result<Layer, BoxError> {
    let worker = build.worker.clone();
    if let Some(layer) = worker.cache.layer_for_blob(&desc.digest)? {
        return Ok(layer);
    }
    let started = SystemTime::now();
    let status = |current: u64, total: u64, done: bool| {
        ctx.progress.send(Event::Status(VertexStatus {
            vertex: ctx.digest.clone(),
            id: desc.digest.clone(),
            name: desc.digest.clone(),
            current,
            total,
            timestamp: SystemTime::now(),
            started: Some(started),
            completed: done.then(SystemTime::now),
        }))
    };
    let report = |done: u64, total: u64| status(done, total, false);
    let path = build.images.fetch_blob(reference, desc, &report).await?;
    status(desc.size, desc.size, true);
    let new = worker.cache.new_layer()?;
    let dest = new.fs();
    let media_type = desc.media_type.clone();
    let digest = desc.digest.clone();
    let limits = worker.unpack_limits.clone();
    let (new, stats) = blocking(move || {
        let stats = unpack_blob(&path, &media_type, &dest, &limits)
            .map_err(|e| -> BoxError { Box::new(e) })?;
        Ok((new, stats))
    })
    .await?;
    let blob = LayerBlob {
        media_type: desc.media_type.clone(),
        digest,
        size: desc.size,
        diff_id: stats.diff_id,
    };
    let cache = worker.cache.clone();
    let mut layers = blocking(move || Ok(cache.commit_layers(vec![(new, vec![blob])])?)).await?;
    layers
        .pop()
        .ok_or_else(|| -> BoxError { "layer commit returned nothing".into() })
}

/// A `local://` source.
pub struct LocalSource {
    name: String,
    excludes: Vec<String>,
    scanned: OnceCell<Arc<Scan>>,
}

// === impl LocalSource ===

impl LocalSource {
    /// The source for local `name` with its `local.*` attributes.
    pub fn new(name: &str, attrs: &HashMap<String, String>) -> super::Result<LocalSource> {
        let list = |key: &str| -> super::Result<Vec<String>> {
            match attrs.get(key) {
                None => Ok(Vec::new()),
                Some(v) if v.is_empty() => Ok(Vec::new()),
                Some(v) => serde_json::from_str(v)
                    .map_err(|e| Error::Invalid(format!("local {name}: {key}: {e}"))),
            }
        };
        let includes = list("local.includepattern")?;
        let includes2 = list("local.includepatterns")?;
        if !includes.is_empty() || !includes2.is_empty() {
            return Err(Error::Unsupported(format!(
                "local {name}: include patterns are not implemented yet"
            )));
        }
        Ok(LocalSource {
            name: name.to_string(),
            excludes: list("local.excludepatterns")?,
            scanned: OnceCell::new(),
        })
    }

    async fn scan(&self, build: &BuildCtx) -> Result<Arc<Scan>, BoxError> {
        let dir = build
            .locals
            .get(&self.name)
            .cloned()
            .ok_or_else(|| Error::LocalNotFound(self.name.clone()))?;
        let name = self.name.clone();
        let excludes = self.excludes.clone();
        let s = self
            .scanned
            .get_or_try_init(|| async move {
                blocking(move || Ok(Arc::new(scan(&name, &dir, &excludes)?))).await
            })
            .await?;
        Ok(s.clone())
    }

    /// The content digest of the directory.
    pub async fn cache_key(&self, build: &BuildCtx) -> Result<String, BoxError> {
        let s = self.scan(build).await?;
        blocking(move || Ok(s.digest()?)).await
    }

    /// Copies the directory into a new layer.
    pub async fn exec(&self, build: &Arc<BuildCtx>, ctx: &VertexCtx) -> Result<Ref, BoxError> {
        let s = self.scan(build).await?;
        let total: u64 = s.entries.iter().map(|e| e.size).sum();
        let cache = build.worker.cache.clone();
        let started = SystemTime::now();
        let layer = blocking(move || {
            let new = cache.new_layer()?;
            s.copy_into(&new.fs())?;
            let mut l = cache.commit_layers_as(Some("source.local"), vec![(new, Vec::new())])?;
            l.pop()
                .ok_or_else(|| -> BoxError { "layer commit returned nothing".into() })
        })
        .await?;
        ctx.progress.send(Event::Status(VertexStatus {
            vertex: ctx.digest.clone(),
            id: format!("transferring {}:", self.name),
            name: "transferring".to_string(),
            current: total,
            total: 0,
            timestamp: SystemTime::now(),
            started: Some(started),
            completed: Some(SystemTime::now()),
        }));
        Ok(Ref::new(vec![layer]))
    }
}

/// A `git://` source.
pub struct GitSource {
    spec: crate::source::git::GitSpec,
    commit: OnceCell<String>,
}

// === impl GitSource ===

impl GitSource {
    /// The source for the identifier without `git://` and its `git.*` attributes.
    pub fn new(rest: &str, attrs: &HashMap<String, String>) -> super::Result<GitSource> {
        let spec = crate::source::git::GitSpec::parse(rest, attrs)
            .map_err(|e| Error::Invalid(e.to_string()))?;
        Ok(GitSource {
            spec,
            commit: OnceCell::new(),
        })
    }

    async fn commit(&self, build: &BuildCtx) -> Result<String, BoxError> {
        let spec = self.spec.clone();
        let auth = spec.auth_header(&build.secrets);
        let c = self
            .commit
            .get_or_try_init(|| async move {
                blocking(move || Ok(crate::source::git::resolve(&spec, auth.as_deref())?)).await
            })
            .await?;
        Ok(c.clone())
    }

    /// The commit the ref resolves to (a moved branch is a new key).
    pub async fn cache_key(&self, build: &BuildCtx) -> Result<String, BoxError> {
        Ok(format!("@{}", self.commit(build).await?))
    }

    /// Fetches the commit into the worker's mirror of the remote and checks it out into a
    /// new layer.
    pub async fn exec(&self, build: &Arc<BuildCtx>, ctx: &VertexCtx) -> Result<Ref, BoxError> {
        let commit = self.commit(build).await?;
        let (repo, lock) = crate::source::git::repo_for(&build.worker.root, &self.spec.remote);
        let _guard = lock.lock().await;
        let spec = self.spec.clone();
        let auth = spec.auth_header(&build.secrets);
        let cache = build.worker.cache.clone();
        let started = SystemTime::now();
        let (layer, submodules) = blocking(move || {
            crate::source::git::ensure_commit(&repo, &spec, &commit, auth.as_deref())?;
            let new = cache.new_layer()?;
            let submodules = crate::source::git::checkout(&repo, &spec, &commit, &new.fs())?;
            let mut l = cache.commit_layers(vec![(new, Vec::new())])?;
            let layer = l
                .pop()
                .ok_or_else(|| -> BoxError { "layer commit returned nothing".into() })?;
            Ok((layer, submodules))
        })
        .await?;
        if submodules {
            ctx.progress.warn(
                Some(&ctx.digest),
                format!(
                    "git source {}: .gitmodules found; submodules are not fetched yet",
                    crate::source::git::redact(&self.spec.remote)
                ),
            );
        }
        ctx.progress.send(Event::Status(VertexStatus {
            vertex: ctx.digest.clone(),
            id: format!("checkout {}", crate::source::git::redact(&self.spec.remote)),
            name: "checkout".to_string(),
            current: 0,
            total: 0,
            timestamp: SystemTime::now(),
            started: Some(started),
            completed: Some(SystemTime::now()),
        }));
        Ok(Ref::new(vec![layer]))
    }
}

/// An `http://` or `https://` source: one file.
pub struct HttpSource {
    spec: crate::source::http::HttpSpec,
    downloaded: OnceCell<Arc<(tempfile::NamedTempFile, String)>>,
}

// === impl HttpSource ===

impl HttpSource {
    /// The source for `url` (the whole identifier) and its `http.*` attributes.
    pub fn new(url: &str, attrs: &HashMap<String, String>) -> super::Result<HttpSource> {
        let spec = crate::source::http::HttpSpec::parse(url, attrs)
            .map_err(|e| Error::Invalid(e.to_string()))?;
        Ok(HttpSource {
            spec,
            downloaded: OnceCell::new(),
        })
    }

    /// Downloads the URL once per build into a temporary file under the worker root and
    /// checks it against `http.checksum`; the file and its digest.
    async fn download(
        &self,
        build: &BuildCtx,
    ) -> Result<Arc<(tempfile::NamedTempFile, String)>, BoxError> {
        let dir = build.worker.root.join("tmp");
        let url = self.spec.url.clone();
        let checksum = self.spec.checksum.clone();
        let d = self
            .downloaded
            .get_or_try_init(|| async move {
                std::fs::create_dir_all(&dir)?;
                let file = tempfile::NamedTempFile::new_in(&dir)?;
                let digest = crate::source::http::download(&url, file.path()).await?;
                crate::source::http::verify(&url, checksum.as_deref(), &digest)?;
                Ok::<_, BoxError>(Arc::new((file, digest)))
            })
            .await?;
        Ok(d.clone())
    }

    /// The given checksum, else the digest of the downloaded content.
    pub async fn cache_key(&self, build: &BuildCtx) -> Result<String, BoxError> {
        if let Some(c) = &self.spec.checksum {
            return Ok(format!("@{c}"));
        }
        Ok(format!("@{}", self.download(build).await?.1))
    }

    /// Puts the downloaded file into a new layer with its name, mode and owner.
    pub async fn exec(&self, build: &Arc<BuildCtx>, ctx: &VertexCtx) -> Result<Ref, BoxError> {
        let started = SystemTime::now();
        let got = self.download(build).await?;
        let spec = self.spec.clone();
        let cache = build.worker.cache.clone();
        let layer = blocking(move || {
            use std::os::unix::fs::PermissionsExt as _;
            let new = cache.new_layer()?;
            let dest = new.fs().join(&spec.filename);
            std::fs::copy(got.0.path(), &dest)?;
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(spec.perm))?;
            std::os::unix::fs::chown(&dest, Some(spec.uid), Some(spec.gid))?;
            let mut l = cache.commit_layers(vec![(new, Vec::new())])?;
            l.pop()
                .ok_or_else(|| -> BoxError { "layer commit returned nothing".into() })
        })
        .await?;
        ctx.progress.send(Event::Status(VertexStatus {
            vertex: ctx.digest.clone(),
            id: format!("downloading {}", crate::source::git::redact(&self.spec.url)),
            name: "downloading".to_string(),
            current: 0,
            total: 0,
            timestamp: SystemTime::now(),
            started: Some(started),
            completed: Some(SystemTime::now()),
        }));
        Ok(Ref::new(vec![layer]))
    }
}
