//! The content store: blobs (layers, configs, manifests) by digest under one directory,
//! written through a temporary file and renamed into place only after the digest
//! checks out, so a crash never leaves a blob whose name lies about its bytes.
//!
//! Layout: `root/blobs/sha256/<hex>` for blobs, `root/ingest/` for writes in flight
//! (cleared when the store is opened).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

/// What can go wrong in the content store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A filesystem operation failed.
    #[error("content store: {op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A digest string is malformed.
    #[error("content store: invalid digest {0:?}")]
    InvalidDigest(String),
    /// Bytes written do not match the digest they were expected to have.
    #[error("content store: digest mismatch: expected {expected}, got {actual}")]
    Mismatch {
        /// What the caller expected.
        expected: String,
        /// What the bytes hash to.
        actual: String,
    },
    /// The blob is not in the store.
    #[error("content store: blob {0} not found")]
    NotFound(String),
    /// Not written yet.
    #[error("{0} is not implemented yet")]
    NotImplemented(&'static str),
}

/// Crate-local result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Checks that `digest` is `sha256:<64 lowercase hex>` and returns the hex part.
pub fn validate_digest(digest: &str) -> Result<&str> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| Error::InvalidDigest(digest.to_string()))?;
    if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(Error::InvalidDigest(digest.to_string()));
    }
    Ok(hex)
}

/// The `sha256:…` digest of `bytes`.
pub fn digest_bytes(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

static INGEST_SEQ: AtomicU64 = AtomicU64::new(0);

/// Blobs by digest.
#[derive(Debug, Clone)]
pub struct ContentStore {
    root: PathBuf,
}

impl ContentStore {
    /// Opens (creating) a store at `root`; leftover writes in `ingest/` of processes that
    /// are gone (a crash) are removed.
    pub fn open(root: &Path) -> Result<ContentStore> {
        let blobs = root.join("blobs").join("sha256");
        std::fs::create_dir_all(&blobs).map_err(io("create", &blobs))?;
        let ingest = root.join("ingest");
        std::fs::create_dir_all(&ingest).map_err(io("create", &ingest))?;
        let store = ContentStore {
            root: root.to_path_buf(),
        };
        store.clean_ingest()?;
        Ok(store)
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn clean_ingest(&self) -> Result<()> {
        let ingest = self.root.join("ingest");
        let entries = std::fs::read_dir(&ingest).map_err(io("read", &ingest))?;
        for entry in entries {
            let entry = entry.map_err(io("read", &ingest))?;
            let path = entry.path();
            // Temp files are named `<pid>-<seq>`: keep those of live processes (this one,
            // or another sharing the store); anything else is left over from a crash.
            let name = entry.file_name();
            let owner = name
                .to_str()
                .and_then(|n| n.split_once('-'))
                .and_then(|(pid, _)| pid.parse::<u32>().ok());
            if let Some(pid) = owner {
                if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
                    continue;
                }
            }
            let res = if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            if let Err(error) = res {
                tracing::warn!(%error, path = %path.display(), "removing stale ingest file");
            }
        }
        Ok(())
    }

    /// Where the blob with `digest` lives (whether or not it exists).
    pub fn path(&self, digest: &str) -> Result<PathBuf> {
        let hex = validate_digest(digest)?;
        Ok(self.root.join("blobs").join("sha256").join(hex))
    }

    /// True when the blob is present.
    pub fn has(&self, digest: &str) -> bool {
        self.path(digest).map(|p| p.exists()).unwrap_or(false)
    }

    /// A writer for a new blob; call [`BlobWriter::finish`] to store it.
    pub fn writer(&self) -> Result<BlobWriter> {
        let ingest = self.root.join("ingest");
        let seq = INGEST_SEQ.fetch_add(1, Ordering::Relaxed);
        let tmp = ingest.join(format!("{}-{seq}", std::process::id()));
        let file = File::create(&tmp).map_err(io("create", &tmp))?;
        Ok(BlobWriter {
            store: self.clone(),
            tmp,
            file: Some(std::io::BufWriter::with_capacity(1 << 16, file)),
            hasher: Sha256::new(),
            size: 0,
        })
    }

    /// Stores `bytes` and returns `(digest, size)`.
    pub fn write_bytes(&self, bytes: &[u8]) -> Result<(String, u64)> {
        let digest = digest_bytes(bytes);
        if self.has(&digest) {
            return Ok((digest, bytes.len() as u64));
        }
        let mut w = self.writer()?;
        w.write_all(bytes).map_err(io("write", &w.tmp.clone()))?;
        w.finish(Some(&digest))
    }

    /// Opens the blob for reading (`open` is taken by the constructor).
    pub fn open_blob(&self, digest: &str) -> Result<File> {
        let path = self.path(digest)?;
        File::open(&path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                Error::NotFound(digest.to_string())
            } else {
                Error::Io {
                    op: "open",
                    path,
                    source,
                }
            }
        })
    }

    /// Reads the whole blob into memory (for manifests and configs).
    pub fn read(&self, digest: &str) -> Result<Vec<u8>> {
        let path = self.path(digest)?;
        std::fs::read(&path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                Error::NotFound(digest.to_string())
            } else {
                Error::Io {
                    op: "read",
                    path,
                    source,
                }
            }
        })
    }

    /// The blob's size in bytes.
    pub fn size(&self, digest: &str) -> Result<u64> {
        let path = self.path(digest)?;
        match std::fs::metadata(&path) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(Error::NotFound(digest.to_string()))
            }
            Err(source) => Err(Error::Io {
                op: "stat",
                path,
                source,
            }),
        }
    }

    /// Removes the blob; removing a missing blob is not an error.
    pub fn delete(&self, digest: &str) -> Result<()> {
        let path = self.path(digest)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::Io {
                op: "remove",
                path,
                source,
            }),
        }
    }

    /// Digests of all blobs, sorted.
    pub fn list(&self) -> Result<Vec<String>> {
        let dir = self.root.join("blobs").join("sha256");
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io("read", &dir))? {
            let entry = entry.map_err(io("read", &dir))?;
            let name = entry.file_name();
            let digest = format!("sha256:{}", name.to_string_lossy());
            if validate_digest(&digest).is_ok() {
                out.push(digest);
            }
        }
        out.sort();
        Ok(out)
    }
}

// === impl BlobWriter ===

/// A blob being written: bytes go to a temporary file in `ingest/` and are hashed on the
/// way; [`BlobWriter::finish`] verifies and moves the file into place. Dropping an
/// unfinished writer removes the temporary file.
#[derive(Debug)]
pub struct BlobWriter {
    store: ContentStore,
    tmp: PathBuf,
    file: Option<std::io::BufWriter<File>>,
    hasher: Sha256,
    size: u64,
}

impl BlobWriter {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.size
    }

    /// The digest of the bytes written so far.
    pub fn current_digest(&self) -> String {
        format!("sha256:{}", hex::encode(self.hasher.clone().finalize()))
    }

    /// Flushes and fsyncs the data, checks it against `expected` (when given) and renames
    /// it into place; returns `(digest, size)`. On a mismatch nothing is stored.
    pub fn finish(mut self, expected: Option<&str>) -> Result<(String, u64)> {
        if let Some(e) = expected {
            validate_digest(e)?;
        }
        let digest = format!("sha256:{}", hex::encode(self.hasher.clone().finalize()));
        let Some(buf) = self.file.take() else {
            return Err(Error::Io {
                op: "finish",
                path: self.tmp.clone(),
                source: std::io::Error::other("blob writer already finished"),
            });
        };
        let file = buf.into_inner().map_err(|e| Error::Io {
            op: "flush",
            path: self.tmp.clone(),
            source: e.into_error(),
        })?;
        if let Some(e) = expected {
            if e != digest {
                return Err(Error::Mismatch {
                    expected: e.to_string(),
                    actual: digest,
                });
            }
        }
        file.sync_all().map_err(io("fsync", &self.tmp))?;
        drop(file);
        let dest = self.store.path(&digest)?;
        std::fs::rename(&self.tmp, &dest).map_err(io("rename", &dest))?;
        if let Some(parent) = dest.parent() {
            if let Ok(d) = File::open(parent) {
                let _ = d.sync_all();
            }
        }
        Ok((digest, self.size))
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let Some(file) = self.file.as_mut() else {
            return Err(std::io::Error::other("blob writer already finished"));
        };
        let n = file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // After a successful finish the temp file was renamed away; this is then a no-op.
        self.file.take();
        let _ = std::fs::remove_file(&self.tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ingest_count(root: &Path) -> anyhow::Result<usize> {
        Ok(std::fs::read_dir(root.join("ingest"))?.count())
    }

    #[test]
    fn write_read_list_delete() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let cs = ContentStore::open(dir.path())?;
        let (d, n) = cs.write_bytes(b"hello")?;
        assert_eq!(d, digest_bytes(b"hello"));
        assert_eq!(n, 5);
        assert!(cs.has(&d));
        assert_eq!(cs.size(&d)?, 5);
        assert_eq!(cs.read(&d)?, b"hello");
        assert_eq!(cs.list()?, vec![d.clone()]);
        cs.delete(&d)?;
        assert!(!cs.has(&d));
        assert!(matches!(cs.open_blob(&d), Err(Error::NotFound(_))));
        assert_eq!(ingest_count(dir.path())?, 0);
        Ok(())
    }

    #[test]
    fn digest_validation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cs = ContentStore::open(dir.path()).expect("open");
        for bad in [
            "sha256:abc",
            "md5:00",
            "sha256:../../../../etc/passwd0000000000000000000000000000000000000",
            &format!("sha256:{}", "A".repeat(64)),
        ] {
            assert!(
                matches!(cs.path(bad), Err(Error::InvalidDigest(_))),
                "{bad}"
            );
        }
        assert!(cs.path(&format!("sha256:{}", "a".repeat(64))).is_ok());
    }

    #[test]
    fn mismatch_leaves_nothing() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let cs = ContentStore::open(dir.path())?;
        let mut w = cs.writer()?;
        w.write_all(b"corrupt bytes")?;
        let want = digest_bytes(b"good bytes");
        let err = w.finish(Some(&want));
        assert!(matches!(err, Err(Error::Mismatch { .. })), "{err:?}");
        assert!(!cs.has(&want));
        assert!(!cs.has(&digest_bytes(b"corrupt bytes")));
        assert!(cs.list()?.is_empty());
        assert_eq!(ingest_count(dir.path())?, 0);
        Ok(())
    }

    #[test]
    fn abandoned_write_leaves_nothing() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let cs = ContentStore::open(dir.path())?;
        {
            let mut w = cs.writer()?;
            w.write_all(b"partial")?;
            assert_eq!(w.written(), 7);
        }
        assert!(cs.list()?.is_empty());
        assert_eq!(ingest_count(dir.path())?, 0);
        Ok(())
    }

    #[test]
    fn stale_ingest_cleaned_on_open() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let cs = ContentStore::open(dir.path())?;
        // Left over by a crashed process (no such pid) and a malformed name.
        std::fs::write(
            dir.path().join("ingest/4194304999-0"),
            b"crash in the middle",
        )?;
        std::fs::write(dir.path().join("ingest/junk"), b"?")?;
        // In flight in this process: must survive a second open.
        let mut w = cs.writer()?;
        w.write_all(b"still writing")?;
        assert_eq!(ingest_count(dir.path())?, 3);
        let cs2 = ContentStore::open(dir.path())?;
        assert_eq!(ingest_count(dir.path())?, 1);
        let (d, _) = w.finish(None)?;
        assert!(cs2.has(&d));
        assert_eq!(ingest_count(dir.path())?, 0);
        Ok(())
    }

    #[test]
    fn streamed_write_matches_expected() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let cs = ContentStore::open(dir.path())?;
        let data = vec![7u8; 300_000];
        let mut w = cs.writer()?;
        for chunk in data.chunks(1000) {
            w.write_all(chunk)?;
        }
        let (d, n) = w.finish(Some(&digest_bytes(&data)))?;
        assert_eq!(n, 300_000);
        assert_eq!(cs.read(&d)?, data);
        Ok(())
    }
}
