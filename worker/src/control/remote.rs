//! Remote build contexts: a Dockerfile build whose `context` attribute is a git or
//! http(s) URL takes its context (and its Dockerfile, unless the client sends one under
//! `dockerfilekey`) from that remote instead of the client's session. The remote is
//! materialized into a directory that then serves as the build's `context` local, so the
//! rest of the build (and its cache keys, by content) is the same as for a local context.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::source::git::{self, GitSpec};
use crate::source::{http, Error};

/// A remote context named by the `context` attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteContext {
    /// A git repository: remote URL, ref (`HEAD` when none) and optional subdirectory.
    Git {
        /// The URL git fetches from.
        remote: String,
        /// The ref.
        reference: String,
        /// `#ref:subdir`'s subdir.
        subdir: Option<String>,
    },
    /// A URL: a tarball (the context) or a single file (the Dockerfile).
    Http {
        /// The URL.
        url: String,
    },
}

/// Whether `context` is a remote context, by BuildKit's rules: `git://`, `ssh://`,
/// `git@host:path`, `github.com/…`, and http(s) URLs whose path ends in `.git` or that
/// carry a `#ref` fragment are git; other http(s) URLs are downloads.
pub fn parse(context: &str) -> Option<RemoteContext> {
    if let Some((remote, reference, subdir)) = git::parse_url(context) {
        return Some(RemoteContext::Git {
            remote,
            reference,
            subdir,
        });
    }
    (context.starts_with("http://") || context.starts_with("https://")).then(|| {
        RemoteContext::Http {
            url: context.to_string(),
        }
    })
}

/// Where a materialized remote context lives.
#[derive(Debug)]
pub struct Materialized {
    /// The context directory.
    pub context: PathBuf,
    /// The directory holding the Dockerfile.
    pub dockerfile: PathBuf,
    /// The Dockerfile's name in it, when the remote was a single file.
    pub filename: Option<String>,
}

fn join_subdirs(a: Option<&str>, b: Option<&str>) -> Option<String> {
    let parts: Vec<&str> = [a, b]
        .into_iter()
        .flatten()
        .filter(|s| !s.is_empty())
        .collect();
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// Fetches `remote` into `dir` (empty, on the worker): a git checkout under the worker
/// `root`'s per-remote mirror, or a download unpacked when it is a tarball.
/// `contextsubdir` narrows the context; `secrets` may hold git credentials.
pub async fn materialize(
    root: &Path,
    remote: &RemoteContext,
    contextsubdir: Option<&str>,
    keep_git_dir: bool,
    secrets: &HashMap<String, Vec<u8>>,
    dir: &Path,
) -> Result<Materialized, Error> {
    match remote {
        RemoteContext::Git {
            remote,
            reference,
            subdir,
        } => {
            let err = |m: String| Error::Git {
                remote: git::redact(remote),
                reference: reference.clone(),
                message: m,
            };
            let subdir = match join_subdirs(subdir.as_deref(), contextsubdir) {
                Some(s) => git::clean_subdir(&s).map_err(err)?,
                None => None,
            };
            let spec = GitSpec {
                remote: remote.clone(),
                reference: reference.clone(),
                subdir,
                keep_git_dir,
                token_secret: git::DEFAULT_TOKEN_SECRET.into(),
                header_secret: git::DEFAULT_HEADER_SECRET.into(),
            };
            let auth = spec.auth_header(secrets);
            let (repo, lock) = git::repo_for(root, &spec.remote);
            let _guard = lock.lock().await;
            let dest = dir.join("checkout");
            let out = dest.clone();
            tokio::task::spawn_blocking(move || -> Result<(), Error> {
                let commit = git::resolve(&spec, auth.as_deref())?;
                git::ensure_commit(&repo, &spec, &commit, auth.as_deref())?;
                std::fs::create_dir_all(&dest).map_err(|e| spec.error(e))?;
                git::checkout(&repo, &spec, &commit, &dest)?;
                Ok(())
            })
            .await
            .map_err(|e| err(format!("worker thread failed: {e}")))??;
            Ok(Materialized {
                context: out.clone(),
                dockerfile: out,
                filename: None,
            })
        }
        RemoteContext::Http { url } => {
            let err = |m: String| Error::Http {
                url: git::redact(url),
                message: m,
            };
            let download = dir.join("download");
            http::download(url, &download).await?;
            let context = dir.join("context");
            std::fs::create_dir_all(&context).map_err(|e| err(e.to_string()))?;
            let kind = http::archive_kind(&download).map_err(|e| err(e.to_string()))?;
            let Some(kind) = kind else {
                // Not a tarball: the download is the Dockerfile and the context is empty.
                let df = dir.join("dockerfile");
                std::fs::create_dir_all(&df).map_err(|e| err(e.to_string()))?;
                std::fs::rename(&download, df.join("Dockerfile"))
                    .map_err(|e| err(e.to_string()))?;
                return Ok(Materialized {
                    context,
                    dockerfile: df,
                    filename: Some("Dockerfile".into()),
                });
            };
            let (src, dst) = (download.clone(), context.clone());
            tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                let f = std::fs::File::open(&src)?;
                let reader: Box<dyn std::io::Read> = if kind == "gzip" {
                    Box::new(flate2::read::GzDecoder::new(f))
                } else {
                    Box::new(f)
                };
                let mut ar = tar::Archive::new(reader);
                ar.set_preserve_permissions(true);
                ar.set_overwrite(true);
                ar.unpack(&dst)?;
                std::fs::remove_file(&src)
            })
            .await
            .map_err(|e| err(format!("worker thread failed: {e}")))?
            .map_err(|e| err(format!("unpacking the tarball: {e}")))?;
            let context = match contextsubdir {
                Some(s) if !s.is_empty() => {
                    let s = git::clean_subdir(s).map_err(err)?;
                    let sub = match &s {
                        Some(s) => crate::snapshot::resolve_in_root(&context, s, true)
                            .map_err(|e| err(format!("contextsubdir {s:?}: {e}")))?,
                        None => context,
                    };
                    if !sub.is_dir() {
                        return Err(err(format!(
                            "contextsubdir {s:?} is not a directory in the tarball"
                        )));
                    }
                    sub
                }
                _ => context,
            };
            Ok(Materialized {
                context: context.clone(),
                dockerfile: context,
                filename: None,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_forms() {
        let git = |r: &str, f: &str, s: Option<&str>| {
            Some(RemoteContext::Git {
                remote: r.into(),
                reference: f.into(),
                subdir: s.map(str::to_string),
            })
        };
        assert_eq!(
            parse("https://host/repo.git#v1:svc"),
            git("https://host/repo.git", "v1", Some("svc"))
        );
        assert_eq!(
            parse("git://127.0.0.1:9/app.git"),
            git("git://127.0.0.1:9/app.git", "HEAD", None)
        );
        assert_eq!(
            parse("git@github.com:o/r.git#main"),
            git("git@github.com:o/r.git", "main", None)
        );
        assert_eq!(
            parse("github.com/o/r"),
            git("https://github.com/o/r", "HEAD", None)
        );
        assert_eq!(
            parse("https://host/ctx.tar.gz"),
            Some(RemoteContext::Http {
                url: "https://host/ctx.tar.gz".into()
            })
        );
        assert_eq!(parse("."), None);
        assert_eq!(parse("/tmp/ctx"), None);
    }
}
