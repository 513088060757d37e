//! Remote build contexts through the `kiln-worker` daemon: `--opt context=` naming a git
//! repository on a real `git daemon`, or a tarball / a lone Dockerfile on a loopback HTTP
//! server; the client's own context directory is not used.

use kiln_e2e::git::GitDaemon;
use kiln_e2e::http::FileServer;

use super::daemon::unix_daemon;
use super::{kiln, ok};

const REMOTE_DOCKERFILE: &str =
    "ARG BASE\nFROM ${BASE}\nCOPY f.txt /f.txt\nRUN cat /f.txt > /out\n";

/// A client context directory whose Dockerfile must not be used.
fn decoy() -> anyhow::Result<tempfile::TempDir> {
    let d = tempfile::tempdir()?;
    std::fs::write(d.path().join("Dockerfile"), "FROM scratch\nRUN exit 9\n")?;
    Ok(d)
}

#[test]
fn daemon_builds_from_git_and_http_contexts() -> anyhow::Result<()> {
    let (reg, run, unix, _daemon) = unix_daemon()?;
    let arg = format!("BASE={}/kiln/base:1", reg.addr());
    let decoy = decoy()?;
    let decoy = decoy.path().to_string_lossy().to_string();
    let build = |context: &str, out: &str| -> anyhow::Result<String> {
        let dest = run.path().join(out);
        ok(kiln(&[
            "build",
            "--addr",
            &unix,
            "--build-arg",
            &arg,
            "--opt",
            &format!("context={context}"),
            "-o",
            &format!("type=local,dest={}", dest.display()),
            &decoy,
        ])?)?;
        Ok(std::fs::read_to_string(dest.join("out"))?)
    };

    // git: a subdir of a branch, then the branch moved.
    let gitd = GitDaemon::start()?;
    let work = gitd.repo(
        "app",
        &[
            ("svc/Dockerfile", REMOTE_DOCKERFILE),
            ("svc/f.txt", "git v1\n"),
            ("README", "root\n"),
        ],
    )?;
    let url = format!("{}#main:svc", gitd.url("app"));
    assert_eq!(build(&url, "g1")?, "git v1\n");
    gitd.commit(&work, &[("svc/f.txt", "git v2\n")], "second")?;
    assert_eq!(build(&url, "g2")?, "git v2\n");
    // contextsubdir applies on top of the repository root.
    let dest = run.path().join("g3");
    ok(kiln(&[
        "build",
        "--addr",
        &unix,
        "--build-arg",
        &arg,
        "--opt",
        &format!("context={}#main", gitd.url("app")),
        "--opt",
        "contextsubdir=svc",
        "-o",
        &format!("type=local,dest={}", dest.display()),
        &decoy,
    ])?)?;
    assert_eq!(std::fs::read_to_string(dest.join("out"))?, "git v2\n");
    // An unknown branch names the remote and the ref.
    let bad = kiln(&[
        "build",
        "--addr",
        &unix,
        "--opt",
        &format!("context={}#nope", gitd.url("app")),
        &decoy,
    ])?;
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(
        stderr.contains(&gitd.url("app")) && stderr.contains("nope"),
        "{stderr}"
    );

    // http: a gzip tarball is the context; a lone file is the Dockerfile.
    let served = tempfile::tempdir()?;
    let mut tarball = tar::Builder::new(flate2::write::GzEncoder::new(
        std::fs::File::create(served.path().join("ctx.tar.gz"))?,
        flate2::Compression::default(),
    ));
    for (name, body) in [("Dockerfile", REMOTE_DOCKERFILE), ("f.txt", "tarball\n")] {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tarball.append_data(&mut h, name, body.as_bytes())?;
    }
    tarball.into_inner()?.finish()?;
    std::fs::write(
        served.path().join("Dockerfile.txt"),
        "ARG BASE\nFROM ${BASE}\nRUN echo lone > /out\n",
    )?;
    let http = FileServer::start(served.path())?;
    assert_eq!(
        build(&format!("http://{}/ctx.tar.gz", http.addr), "h1")?,
        "tarball\n"
    );
    assert_eq!(
        build(&format!("http://{}/Dockerfile.txt", http.addr), "h2")?,
        "lone\n"
    );
    let missing = kiln(&[
        "build",
        "--addr",
        &unix,
        "--opt",
        &format!("context=http://{}/missing.tar", http.addr),
        &decoy,
    ])?;
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success());
    assert!(
        stderr.contains("missing.tar") && stderr.contains("404"),
        "{stderr}"
    );
    Ok(())
}
