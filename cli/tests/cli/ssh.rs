//! `RUN --mount=type=ssh` with a real `ssh-agent` on the client side: daemonless (the
//! build reaches the agent socket directly) and through the `kiln-worker` daemon (the
//! agent's bytes travel over the session's `moby.sshforward.v1.SSH` service). The build
//! runs the host's own `ssh-add -l` (copied into the image with its libraries) against the
//! forwarded socket, so the agent protocol is exercised end to end.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use kiln_e2e::registry::Registry;

use super::daemon::Daemon;
use super::{kiln, ok};

/// A real ssh-agent holding one fresh ed25519 key; killed when dropped.
struct Agent {
    child: Child,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    fn start(comment: &str) -> anyhow::Result<Agent> {
        let dir = tempfile::tempdir()?;
        let key = dir.path().join("id");
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
            .arg(&key)
            .status()
            .context("running ssh-keygen (openssh-client)")?;
        if !st.success() {
            bail!("ssh-keygen failed: {st}");
        }
        let sock = dir.path().join("agent.sock");
        let child = Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("running ssh-agent (openssh-client)")?;
        let agent = Agent {
            child,
            sock,
            _dir: dir,
        };
        for _ in 0..200 {
            if agent.sock.exists() {
                let st = Command::new("ssh-add")
                    .arg(&key)
                    .env("SSH_AUTH_SOCK", &agent.sock)
                    .stderr(Stdio::null())
                    .status()?;
                if !st.success() {
                    bail!("ssh-add failed: {st}");
                }
                return Ok(agent);
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        bail!("ssh-agent did not create {}", agent.sock.display())
    }
}

/// Copies `ssh-add` and the shared libraries it loads into `root` at their host paths.
fn copy_ssh_add(root: &Path) -> anyhow::Result<()> {
    let bin = Path::new("/usr/bin/ssh-add");
    let ldd = Command::new("ldd").arg(bin).output()?;
    let mut files = vec![bin.to_path_buf()];
    for word in String::from_utf8_lossy(&ldd.stdout).split_whitespace() {
        if word.starts_with('/') {
            files.push(PathBuf::from(word));
        }
    }
    for f in files {
        let dest = root.join(f.strip_prefix("/")?);
        std::fs::create_dir_all(dest.parent().context("parent")?)?;
        // Follows symlinks: the image gets the real contents under the linked name.
        std::fs::copy(&f, &dest).with_context(|| format!("copying {}", f.display()))?;
    }
    Ok(())
}

const DOCKERFILE: &str = "ARG BASE\nFROM ${BASE}\nCOPY tools/ /\n\
RUN --mount=type=ssh ssh-add -l > /keys && echo \"$SSH_AUTH_SOCK\" > /sock\n\
RUN --mount=type=ssh,id=absent,target=/absent.sock test ! -e /absent.sock && echo skipped > /optional\n";

fn context() -> anyhow::Result<tempfile::TempDir> {
    let ctx = tempfile::tempdir()?;
    std::fs::write(ctx.path().join("Dockerfile"), DOCKERFILE)?;
    copy_ssh_add(&ctx.path().join("tools"))?;
    Ok(ctx)
}

fn check_output(out: &Path, comment: &str) -> anyhow::Result<()> {
    let keys = std::fs::read_to_string(out.join("keys"))?;
    assert!(
        keys.contains(comment) && keys.contains("ED25519"),
        "ssh-add -l in the build saw: {keys}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("sock"))?,
        "/run/buildkit/ssh_agent.0\n"
    );
    assert_eq!(std::fs::read_to_string(out.join("optional"))?, "skipped\n");
    Ok(())
}

#[test]
fn ssh_agent_is_forwarded_daemonless_and_through_the_daemon() -> anyhow::Result<()> {
    let reg = Registry::start()?;
    kiln_e2e::base::push_base(&reg.addr(), "kiln/base:1")?;
    let arg = format!("BASE={}/kiln/base:1", reg.addr());
    let agent = Agent::start("kiln-ssh-test")?;
    let ctx = context()?;
    let c = ctx.path().to_str().context("path")?;
    let work = tempfile::tempdir()?;
    let ssh = format!("default={}", agent.sock.display());

    // Daemonless.
    let root = work.path().join("root");
    let out1 = work.path().join("out1");
    let local1 = format!("type=local,dest={}", out1.display());
    let r = root.to_str().context("path")?;
    ok(kiln(&[
        "build",
        "--root",
        r,
        "--build-arg",
        &arg,
        "--ssh",
        &ssh,
        "-o",
        &local1,
        c,
    ])?)?;
    check_output(&out1, "kiln-ssh-test")?;

    // Through the daemon, with the agent named by SSH_AUTH_SOCK (`--ssh default`).
    let unix = format!("unix://{}", work.path().join("kiln.sock").display());
    let _daemon = Daemon::start(&["--addr", &unix])?;
    let out2 = work.path().join("out2");
    let local2 = format!("type=local,dest={}", out2.display());
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "build",
            "--addr",
            &unix,
            "--build-arg",
            &arg,
            "--ssh",
            "default",
        ])
        .args(["-o", &local2, c])
        .env("SSH_AUTH_SOCK", &agent.sock)
        .output()?;
    ok(out)?;
    check_output(&out2, "kiln-ssh-test")?;

    // A required agent the client does not forward fails the build, naming it.
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "ARG BASE\nFROM ${BASE}\nRUN --mount=type=ssh,id=deploy,required=true true\n",
    )?;
    for via in [["--root", r], ["--addr", &unix]] {
        let out = kiln(&[
            "build",
            via[0],
            via[1],
            "--build-arg",
            &arg,
            "--ssh",
            &ssh,
            c,
        ])?;
        assert!(!out.status.success(), "{via:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("ssh agent \"deploy\" not found"),
            "{via:?}: {err}"
        );
    }
    // A key file instead of an agent socket is refused up front, naming the file.
    let key = work.path().join("id_rsa");
    std::fs::write(&key, "-----BEGIN OPENSSH PRIVATE KEY-----\n")?;
    let out = kiln(&[
        "build",
        "--root",
        r,
        "--ssh",
        &format!("default={}", key.display()),
        c,
    ])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("id_rsa") && err.contains("not an agent socket"),
        "{err}"
    );
    Ok(())
}
