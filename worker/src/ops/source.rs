//! Source ops: `docker-image://` (resolve, fetch layer blobs, unpack each into a layer once
//! per blob digest) and `local://` (a client directory, keyed by its content).

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
            let mut l = cache.commit_layers(vec![(new, Vec::new())])?;
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
