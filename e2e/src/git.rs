//! A real `git daemon` on 127.0.0.1 serving bare repositories made in a temp directory,
//! for tests of git sources and remote build contexts.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A `git daemon` serving every repository under its base path.
pub struct GitDaemon {
    child: Child,
    /// Where the repositories live (`<base>/<name>.git`).
    pub base: tempfile::TempDir,
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `git -C dir args` with a fixed identity; its trimmed stdout.
pub fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "kiln")
        .env("GIT_AUTHOR_EMAIL", "kiln@example.invalid")
        .env("GIT_COMMITTER_NAME", "kiln")
        .env("GIT_COMMITTER_EMAIL", "kiln@example.invalid")
        .output()?;
    if !out.status.success() {
        bail!(
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl GitDaemon {
    /// Starts the daemon on a free loopback port.
    pub fn start() -> anyhow::Result<GitDaemon> {
        let base = tempfile::tempdir()?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        // Run `git-daemon` itself: `git daemon` would leave it running as an orphan when the
        // `git` wrapper is killed.
        let exec_path = Command::new("git").arg("--exec-path").output()?;
        let exec_path = String::from_utf8_lossy(&exec_path.stdout)
            .trim()
            .to_string();
        let child = Command::new(Path::new(&exec_path).join("git-daemon"))
            .arg("--export-all")
            .arg("--reuseaddr")
            .arg("--listen=127.0.0.1")
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", base.path().display()))
            .arg(base.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting git daemon")?;
        let addr = format!("127.0.0.1:{port}");
        let d = GitDaemon { child, base, addr };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&d.addr).is_err() {
            if Instant::now() > deadline {
                bail!("git daemon did not listen on {}", d.addr);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(d)
    }

    /// Creates `<name>.git` on branch `main` with one commit of `files`; returns the
    /// work tree used to make further commits.
    pub fn repo(&self, name: &str, files: &[(&str, &str)]) -> anyhow::Result<PathBuf> {
        let work = self.base.path().join(format!("{name}.work"));
        std::fs::create_dir_all(&work)?;
        git(&work, &["init", "-q", "-b", "main"])?;
        self.commit(&work, files, "initial")?;
        git(
            self.base.path(),
            &[
                "clone",
                "-q",
                "--bare",
                &format!("{name}.work"),
                &format!("{name}.git"),
            ],
        )?;
        git(
            &work,
            &["remote", "add", "origin", &format!("../{name}.git")],
        )?;
        Ok(work)
    }

    /// Commits `files` in `work` and pushes `main`; returns the commit id.
    pub fn commit(&self, work: &Path, files: &[(&str, &str)], msg: &str) -> anyhow::Result<String> {
        for (p, c) in files {
            let path = work.join(p);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(path, c)?;
        }
        git(work, &["add", "-A"])?;
        git(work, &["commit", "-q", "-m", msg])?;
        if git(work, &["remote"])?.contains("origin") {
            git(work, &["push", "-q", "origin", "main"])?;
        }
        git(work, &["rev-parse", "HEAD"])
    }

    /// The `git://` URL of `<name>.git`.
    pub fn url(&self, name: &str) -> String {
        format!("git://{}/{name}.git", self.addr)
    }
}
