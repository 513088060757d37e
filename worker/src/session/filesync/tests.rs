//! FileSync through the whole stack: a `Control.Session` stream over a unix socket (or a
//! pair of in-memory pipes), HTTP/2 inside it, and `DiffCopy` over that.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use kiln_proto::fsutil::mode;
use kiln_proto::fsutil::types::packet::PacketType;
use kiln_proto::fsutil::types::{Packet, Stat};
use kiln_proto::moby::buildkit::v1::control_client::ControlClient;
use kiln_proto::moby::buildkit::v1::control_server::{Control, ControlServer};
use kiln_proto::moby::buildkit::v1::BytesMessage;
use kiln_proto::moby::filesync::v1::file_sync_client::FileSyncClient;
use kiln_proto::moby::filesync::v1::file_sync_server::{FileSync, FileSyncServer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::BoxStream;
use tonic::service::Routes;
use tonic::{Request, Response, Status, Streaming};

use super::*;
use crate::session::transport::{self, connect_client, health_service, pipe, serve, SessionPipe};
use crate::session::{SessionError, SessionHeaders};

const LIMIT: Duration = Duration::from_secs(60);

/// A Control service whose `Session` hands the daemon-side pipe to the test.
struct SessionOnly(mpsc::Sender<(SessionHeaders, SessionPipe)>);

#[tonic::async_trait]
impl Control for SessionOnly {
    async fn session(
        &self,
        request: Request<Streaming<BytesMessage>>,
    ) -> Result<Response<BoxStream<BytesMessage>>, Status> {
        let headers = SessionHeaders::from_metadata(request.metadata())
            .ok_or_else(|| Status::invalid_argument("no session id"))?;
        let (pipe, response) = transport::accept(request.into_inner());
        self.0
            .send((headers, pipe))
            .await
            .map_err(|_| Status::unavailable("test gone"))?;
        Ok(Response::new(response))
    }
}

/// Runs a daemon (Control over a unix socket) and a CLI session serving `dirs`; returns
/// the daemon's channel into the session.
async fn session_over_unix_socket(
    dirs: LocalDirs,
    tmp: &Path,
) -> anyhow::Result<(
    tonic::transport::Channel,
    tokio::task::JoinHandle<Result<(), SessionError>>,
)> {
    let sock = tmp.join("kiln.sock");
    let listener = tokio::net::UnixListener::bind(&sock)?;
    let (tx, mut rx) = mpsc::channel(1);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ControlServer::new(SessionOnly(tx)))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
    let control = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let sock = sock.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(sock).await?,
                ))
            }
        }))
        .await?;

    // CLI side: open the session and serve FileSync + health inside it.
    let (out_tx, out_rx) = mpsc::channel(16);
    let mut request = Request::new(ReceiverStream::new(out_rx));
    SessionHeaders {
        id: "testsession".into(),
        shared_key: "key".into(),
        methods: vec![
            "/moby.filesync.v1.FileSync/DiffCopy".into(),
            "/grpc.health.v1.Health/Check".into(),
        ],
        name: None,
    }
    .to_metadata(request.metadata_mut())?;
    let mut client = ControlClient::new(control);
    let inbound = client.session(request).await?.into_inner();
    let cli_pipe = pipe(inbound, out_tx);
    let routes = Routes::new(dirs.into_service()).add_service(health_service());
    let cli = tokio::spawn(serve(cli_pipe, routes));

    // Daemon side.
    let (headers, daemon_pipe) = rx.recv().await.context("no session arrived")?;
    assert_eq!(headers.id, "testsession");
    assert!(headers.supports("/moby.filesync.v1.filesync/diffcopy"));
    Ok((connect_client(daemon_pipe).await?, cli))
}

/// Two pipes back to back (no socket), serving `service` on one end.
async fn session_in_memory<S>(service: S) -> anyhow::Result<tonic::transport::Channel>
where
    S: FileSync,
{
    let (a_tx, a_rx) = mpsc::channel(16);
    let (b_tx, b_rx) = mpsc::channel(16);
    let daemon = pipe(ReceiverStream::new(b_rx).map(Ok), a_tx);
    let cli = pipe(ReceiverStream::new(a_rx).map(Ok), b_tx);
    tokio::spawn(serve(cli, Routes::new(FileSyncServer::new(service))));
    Ok(connect_client(daemon).await?)
}

#[derive(Debug, PartialEq, Eq)]
enum Node {
    Dir {
        mode: u32,
        mtime: (i64, i64),
        uid: u32,
        gid: u32,
    },
    File {
        mode: u32,
        mtime: (i64, i64),
        uid: u32,
        gid: u32,
        content: Vec<u8>,
    },
    Link(String),
}

/// Everything the transfer must keep, keyed by relative path.
fn snapshot(root: &Path) -> anyhow::Result<BTreeMap<String, Node>> {
    let mut out = BTreeMap::new();
    for e in walkdir::WalkDir::new(root).min_depth(1).sort_by_file_name() {
        let e = e?;
        let rel = e.path().strip_prefix(root)?.to_string_lossy().into_owned();
        let md = std::fs::symlink_metadata(e.path())?;
        let mtime = (md.mtime(), md.mtime_nsec());
        let node = if md.file_type().is_symlink() {
            Node::Link(std::fs::read_link(e.path())?.to_string_lossy().into_owned())
        } else if md.is_dir() {
            Node::Dir {
                mode: md.mode() & 0o7777,
                mtime,
                uid: md.uid(),
                gid: md.gid(),
            }
        } else {
            Node::File {
                mode: md.mode() & 0o7777,
                mtime,
                uid: md.uid(),
                gid: md.gid(),
                content: std::fs::read(e.path())?,
            }
        };
        out.insert(rel, node);
    }
    Ok(out)
}

fn set_mtime(path: &Path, secs: i64, nsecs: i64) -> anyhow::Result<()> {
    let t = nix::sys::time::TimeSpec::new(secs, nsecs);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )?;
    Ok(())
}

/// dirs, nested files, relative and absolute symlinks, an executable, an empty file, a
/// 1 MiB file, a hard link, a setuid file, a 0700 directory, odd mtimes.
fn sample_tree(root: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(root.join("src/deep/er"))?;
    std::fs::create_dir(root.join("private"))?;
    std::fs::write(root.join("Dockerfile"), "FROM scratch\nCOPY . /\n")?;
    std::fs::write(root.join("src/main.rs"), "fn main() {}\n")?;
    std::fs::write(root.join("src/deep/er/data.txt"), "deep")?;
    std::fs::write(root.join("empty"), "")?;
    let big: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(root.join("big.bin"), &big)?;
    std::fs::write(root.join("run.sh"), "#!/bin/sh\necho hi\n")?;
    std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o755))?;
    std::fs::write(root.join("suid"), "x")?;
    std::fs::set_permissions(root.join("suid"), std::fs::Permissions::from_mode(0o4750))?;
    std::fs::write(root.join("private/secret"), "s")?;
    std::fs::set_permissions(
        root.join("private/secret"),
        std::fs::Permissions::from_mode(0o600),
    )?;
    std::fs::set_permissions(root.join("private"), std::fs::Permissions::from_mode(0o700))?;
    std::fs::hard_link(root.join("src/main.rs"), root.join("src/main-link.rs"))?;
    std::os::unix::fs::symlink("deep/er/data.txt", root.join("src/rel-link"))?;
    std::os::unix::fs::symlink("/etc/passwd", root.join("abs-link"))?;
    std::os::unix::fs::symlink("missing", root.join("dangling"))?;
    std::os::unix::fs::lchown(root.join("src/deep/er/data.txt"), Some(1234), Some(5678))?;
    for (i, e) in walkdir::WalkDir::new(root)
        .min_depth(1)
        .contents_first(true)
        .into_iter()
        .enumerate()
    {
        let e = e?;
        set_mtime(
            e.path(),
            1_600_000_000 + i as i64,
            123_456_789 * (i as i64 % 7),
        )?;
    }
    Ok(())
}

#[tokio::test]
async fn tree_arrives_intact_through_control_session_http2_and_diffcopy() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("src");
    let dest = tmp.path().join("dest");
    sample_tree(&src)?;
    let dirs = LocalDirs::new()
        .with_dir("context", &src)
        .keep_ownership(true);
    let (channel, cli) = session_over_unix_socket(dirs, tmp.path()).await?;
    let stats = tokio::time::timeout(
        LIMIT,
        receive(channel, "context", &dest, &ReceiveOptions::default()),
    )
    .await??;
    // `receive` consumed the daemon's only channel: the nested connection closes and
    // the client's server returns cleanly.
    tokio::time::timeout(LIMIT, cli).await???;

    let want = snapshot(&src)?;
    let got = snapshot(&dest)?;
    assert_eq!(
        want.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>()
    );
    for (path, node) in &want {
        let other = &got[path];
        match (node, other, nix::unistd::geteuid().is_root()) {
            // Without root, ownership cannot be kept.
            (
                Node::File {
                    content,
                    mode,
                    mtime,
                    ..
                },
                Node::File {
                    content: c2,
                    mode: m2,
                    mtime: t2,
                    ..
                },
                false,
            ) => {
                assert!(content == c2, "{path}: content differs");
                assert_eq!((mode, mtime), (m2, t2), "{path}");
            }
            (
                Node::Dir { mode, mtime, .. },
                Node::Dir {
                    mode: m2,
                    mtime: t2,
                    ..
                },
                false,
            ) => {
                assert_eq!((mode, mtime), (m2, t2), "{path}");
            }
            _ => assert!(node == other, "{path}: {node:?} != {other:?}"),
        }
    }
    let big = std::fs::metadata(dest.join("big.bin"))?;
    assert_eq!(big.len(), 1 << 20);
    // The hard link stays a hard link.
    assert_eq!(
        std::fs::metadata(dest.join("src/main.rs"))?.ino(),
        std::fs::metadata(dest.join("src/main-link.rs"))?.ino()
    );
    // The returned listing is in fsutil order with Go mode bits.
    let paths: Vec<&str> = stats.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(paths.len(), want.len());
    let sorted = {
        let mut p = paths.clone();
        p.sort_by_key(|p| {
            p.bytes()
                .map(|b| if b == b'/' { 0 } else { b })
                .collect::<Vec<_>>()
        });
        p
    };
    assert_eq!(paths, sorted);
    let by_path: BTreeMap<&str, &Stat> = stats.iter().map(|s| (s.path.as_str(), s)).collect();
    assert_eq!(by_path["src"].mode, mode::DIR | 0o755);
    assert_eq!(by_path["run.sh"].mode, 0o755);
    assert_eq!(by_path["suid"].mode, mode::SETUID | 0o750);
    assert_eq!(by_path["abs-link"].mode & mode::SYMLINK, mode::SYMLINK);
    // The first path in walk order is the link target: `-` sorts before `.`.
    assert_eq!(by_path["src/main-link.rs"].linkname, "");
    assert_eq!(by_path["src/main.rs"].linkname, "src/main-link.rs");
    Ok(())
}

#[tokio::test]
async fn ownership_is_reset_to_root_by_default() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("src");
    std::fs::create_dir(&src)?;
    std::fs::write(src.join("f"), "x")?;
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::lchown(src.join("f"), Some(1000), Some(1000))?;
    }
    let channel = session_in_memory(LocalDirs::new().with_dir("context", &src)).await?;
    let stats = receive(
        channel,
        "context",
        &tmp.path().join("d"),
        &ReceiveOptions::default(),
    )
    .await?;
    assert_eq!((stats[0].uid, stats[0].gid), (0, 0));
    Ok(())
}

async fn received_paths(src: &Path, opts: &ReceiveOptions) -> anyhow::Result<Vec<String>> {
    let dest = tempfile::tempdir()?;
    let channel = session_in_memory(LocalDirs::new().with_dir("context", src)).await?;
    let stats =
        tokio::time::timeout(LIMIT, receive(channel, "context", dest.path(), opts)).await??;
    let on_disk: Vec<String> = snapshot(dest.path())?.into_keys().collect();
    let listed: Vec<String> = stats.into_iter().map(|s| s.path).collect();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(sorted, on_disk, "listing and disk disagree");
    Ok(listed)
}

#[tokio::test]
async fn exclude_patterns_are_respected_with_exceptions() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let src = tmp.path();
    std::fs::create_dir_all(src.join("build/sub"))?;
    std::fs::create_dir_all(src.join("node_modules/x"))?;
    std::fs::create_dir_all(src.join("app"))?;
    for f in [
        "build/out.o",
        "build/keep.txt",
        "build/sub/a.o",
        "node_modules/x/index.js",
        "app/main.go",
        "app/debug.log",
        "top.log",
        "README",
    ] {
        std::fs::write(src.join(f), f)?;
    }
    let opts = ReceiveOptions {
        exclude_patterns: vec![
            "**/*.log".into(),
            "node_modules".into(),
            "build".into(),
            "!build/keep.txt".into(),
        ],
        ..ReceiveOptions::default()
    };
    let got = received_paths(src, &opts).await?;
    assert_eq!(
        got,
        ["README", "app", "app/main.go", "build", "build/keep.txt"]
    );
    Ok(())
}

#[tokio::test]
async fn include_patterns_and_followpaths_select_paths_and_parents() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let src = tmp.path();
    std::fs::create_dir_all(src.join("docker/files"))?;
    std::fs::create_dir_all(src.join("other"))?;
    std::fs::write(src.join("docker/real.Dockerfile"), "FROM scratch")?;
    std::fs::write(src.join("docker/files/a.txt"), "a")?;
    std::fs::write(src.join("other/b.txt"), "b")?;
    std::fs::write(src.join(".dockerignore"), "other")?;
    std::os::unix::fs::symlink("docker/real.Dockerfile", src.join("Dockerfile"))?;

    let follow = ReceiveOptions {
        follow_paths: vec![
            "Dockerfile".into(),
            ".dockerignore".into(),
            "dockerfile".into(),
        ],
        ..ReceiveOptions::default()
    };
    let got = received_paths(src, &follow).await?;
    assert_eq!(
        got,
        [
            ".dockerignore",
            "Dockerfile",
            "docker",
            "docker/real.Dockerfile"
        ]
    );

    let include = ReceiveOptions {
        include_patterns: vec!["docker/files".into(), "*.txt".into()],
        ..ReceiveOptions::default()
    };
    let got = received_paths(src, &include).await?;
    assert_eq!(got, ["docker", "docker/files", "docker/files/a.txt"]);
    Ok(())
}

#[tokio::test]
async fn unknown_dir_name_is_not_found() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let channel = session_in_memory(LocalDirs::new().with_dir("context", tmp.path())).await?;
    let err = receive(
        channel,
        "secret",
        &tmp.path().join("d"),
        &ReceiveOptions::default(),
    )
    .await
    .err()
    .context("expected an error")?;
    match err {
        SessionError::Rpc { call, source } => {
            assert_eq!(source.code(), tonic::Code::NotFound);
            assert!(call.contains("secret"), "{call}");
        }
        other => anyhow::bail!("unexpected error {other}"),
    }
    Ok(())
}

#[test]
fn non_ascii_header_values_are_query_escaped() -> anyhow::Result<()> {
    let sel = Selection {
        dir_name: "context".into(),
        include_patterns: vec!["dé jà/*.txt".into(), "plain+x".into()],
        exclude_patterns: vec!["a b".into()],
        follow_paths: Vec::new(),
    };
    let mut meta = tonic::metadata::MetadataMap::new();
    sel.to_metadata(&mut meta)?;
    assert_eq!(
        meta.get("include-patterns-encoded")
            .map(|v| v.to_str())
            .transpose()?,
        Some("1")
    );
    let raw: Vec<&str> = meta
        .get_all("include-patterns")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    assert_eq!(raw, ["d%C3%A9+j%C3%A0%2F%2A.txt", "plain%2Bx"]);
    // Printable ASCII is sent as is.
    assert!(meta.get("exclude-patterns-encoded").is_none());
    assert_eq!(Selection::from_metadata(&meta)?, sel);
    Ok(())
}

/// A sender that ignores the receiver and plays a fixed script.
struct Scripted(Vec<Packet>);

#[tonic::async_trait]
impl FileSync for Scripted {
    async fn diff_copy(
        &self,
        _request: Request<Streaming<Packet>>,
    ) -> Result<Response<BoxStream<Packet>>, Status> {
        let packets: Vec<Result<Packet, Status>> = self.0.iter().cloned().map(Ok).collect();
        Ok(Response::new(futures::stream::iter(packets).boxed()))
    }
}

fn stat(path: &str, mode: u32, linkname: &str) -> Packet {
    Packet {
        r#type: PacketType::PacketStat as i32,
        stat: Some(Stat {
            path: path.into(),
            mode,
            linkname: linkname.into(),
            mod_time: 1_700_000_000_000_000_000,
            ..Stat::default()
        }),
        ..Packet::default()
    }
}

fn data(id: u32, bytes: &[u8]) -> Packet {
    Packet {
        r#type: PacketType::PacketData as i32,
        id,
        data: bytes.to_vec(),
        ..Packet::default()
    }
}

fn end() -> Packet {
    Packet::default()
}

fn fin() -> Packet {
    Packet {
        r#type: PacketType::PacketFin as i32,
        ..Packet::default()
    }
}

/// Receives a scripted transfer into `<tmp>/box/dest`; returns the error.
async fn hostile(script: Vec<Packet>, tmp: &Path) -> anyhow::Result<SessionError> {
    let channel = session_in_memory(Scripted(script)).await?;
    let dest = tmp.join("box/dest");
    let res = tokio::time::timeout(
        LIMIT,
        receive(channel, "context", &dest, &ReceiveOptions::default()),
    )
    .await?;
    res.err().context("hostile transfer succeeded")
}

/// Every file under `tmp` except inside `box/dest`.
fn outside(tmp: &Path) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for e in walkdir::WalkDir::new(tmp).min_depth(1) {
        let e = e?;
        let rel = e.path().strip_prefix(tmp)?.to_string_lossy().into_owned();
        if rel != "box" && rel != "box/dest" && !rel.starts_with("box/dest/") {
            out.push(rel);
        }
    }
    Ok(out)
}

#[tokio::test]
async fn hostile_paths_cannot_escape_the_destination() -> anyhow::Result<()> {
    let cases: Vec<(&str, Vec<Packet>, &str)> = vec![
        (
            "dotdot",
            vec![
                stat("../x", 0o644, ""),
                end(),
                data(0, b"pwned"),
                data(0, b""),
                fin(),
            ],
            "../x",
        ),
        (
            "nested dotdot",
            vec![
                stat("a", mode::DIR | 0o755, ""),
                stat("a/../../x", 0o644, ""),
                end(),
            ],
            "a/../../x",
        ),
        ("absolute", vec![stat("/abs", 0o644, ""), end()], "/abs"),
        (
            "file under symlink",
            vec![
                stat("link", mode::SYMLINK | 0o777, "../.."),
                stat("link/pwned", 0o644, ""),
                end(),
                data(1, b"pwned"),
                data(1, b""),
                fin(),
            ],
            "link/pwned",
        ),
        (
            "dir under symlink",
            vec![
                stat("l", mode::SYMLINK | 0o777, "/tmp"),
                stat("l/d", mode::DIR | 0o755, ""),
                end(),
            ],
            "l/d",
        ),
    ];
    for (name, script, bad) in cases {
        let tmp = tempfile::tempdir()?;
        let err = hostile(script, tmp.path()).await?;
        match &err {
            SessionError::UnsafePath { path, .. } => assert_eq!(path, bad, "{name}"),
            other => anyhow::bail!("{name}: expected an unsafe path error, got {other}"),
        }
        assert!(err.to_string().contains(bad), "{name}: {err}");
        assert_eq!(outside(tmp.path())?, Vec::<String>::new(), "{name}");
        // Nothing was written at all: validation happens before any write.
        assert_eq!(
            std::fs::read_dir(tmp.path().join("box/dest"))?.count(),
            0,
            "{name}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn existing_symlinks_in_the_destination_are_replaced_not_followed() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dest = tmp.path().join("box/dest");
    std::fs::create_dir_all(&dest)?;
    std::fs::create_dir(tmp.path().join("victim"))?;
    std::os::unix::fs::symlink("../../victim", dest.join("d"))?;
    std::os::unix::fs::symlink("../../victim/f", dest.join("f"))?;
    let script = vec![
        stat("d", mode::DIR | 0o755, ""),
        stat("d/x", 0o644, ""),
        stat("f", 0o644, ""),
        end(),
        data(1, b"inside"),
        data(1, b""),
        data(2, b"file"),
        data(2, b""),
        fin(),
    ];
    let channel = session_in_memory(Scripted(script)).await?;
    receive(channel, "context", &dest, &ReceiveOptions::default()).await?;
    assert_eq!(std::fs::read_dir(tmp.path().join("victim"))?.count(), 0);
    assert!(std::fs::symlink_metadata(dest.join("d"))?.is_dir());
    assert_eq!(std::fs::read(dest.join("d/x"))?, b"inside");
    assert_eq!(std::fs::read(dest.join("f"))?, b"file");
    Ok(())
}

#[tokio::test]
async fn malformed_streams_give_clear_errors() -> anyhow::Result<()> {
    let cases: Vec<(&str, Vec<Packet>, &str)> = vec![
        (
            "out of order",
            vec![stat("b", 0o644, ""), stat("a", 0o644, ""), end()],
            "out of order",
        ),
        (
            "duplicate",
            vec![stat("a", 0o644, ""), stat("a", 0o644, ""), end()],
            "out of order",
        ),
        (
            "missing parent",
            vec![stat("dir/f", 0o644, ""), end()],
            "before its parent",
        ),
        (
            "hard link to unknown path",
            vec![stat("a", 0o644, "nowhere"), end()],
            "invalid link",
        ),
        (
            "data for another id while files are pending",
            vec![stat("a", 0o644, ""), end(), data(5, b"x")],
            "unrequested entry id 5",
        ),
        (
            "data before the end of the listing",
            vec![stat("a", 0o644, ""), data(0, b"x")],
            "PACKET_DATA before the end",
        ),
        (
            "unknown packet type",
            vec![Packet {
                r#type: 42,
                ..Packet::default()
            }],
            "unknown packet type 42",
        ),
        (
            "stream ends early",
            vec![stat("a", 0o644, "")],
            "before the end of the listing",
        ),
        (
            "files never sent",
            vec![stat("a", 0o644, ""), end(), fin()],
            "PACKET_FIN while receiving",
        ),
        (
            "sender error",
            vec![Packet {
                r#type: PacketType::PacketErr as i32,
                data: b"disk on fire".to_vec(),
                ..Packet::default()
            }],
            "disk on fire",
        ),
        (
            "symlink without target",
            vec![stat("l", mode::SYMLINK, ""), end()],
            "no target",
        ),
        (
            "unclean path",
            vec![stat("a//b", 0o644, ""), end()],
            "unclean",
        ),
        ("empty path", vec![stat("", 0o644, ""), end()], "empty path"),
    ];
    for (name, script, want) in cases {
        let tmp = tempfile::tempdir()?;
        let err = hostile(script, tmp.path()).await?;
        assert!(err.to_string().contains(want), "{name}: {err}");
        assert_eq!(outside(tmp.path())?, Vec::<String>::new(), "{name}");
    }

    // Data after the receiver's FIN. The session receiver has all it asked for and returns
    // (the sender's closing packets are read off the build's path and written nowhere);
    // the stream receiver, which waits for the closing FIN, rejects it.
    let script = vec![stat("d", mode::DIR | 0o755, ""), end(), data(0, b"x")];
    let tmp = tempfile::tempdir()?;
    let dest = tmp.path().join("box/dest");
    let channel = session_in_memory(Scripted(script.clone())).await?;
    let got = tokio::time::timeout(
        LIMIT,
        receive(channel, "context", &dest, &ReceiveOptions::default()),
    )
    .await??;
    assert_eq!(got.len(), 1);
    assert!(dest.join("d").is_dir());
    assert_eq!(std::fs::read_dir(dest.join("d"))?.count(), 0);
    assert_eq!(outside(tmp.path())?, Vec::<String>::new());
    let mut inbound = futures::stream::iter(script.into_iter().map(Ok));
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let err = super::receive_stream(&mut inbound, tx, &tmp.path().join("box/dest2"))
        .await
        .err()
        .context("data after FIN accepted by the stream receiver")?;
    assert!(err.to_string().contains("unrequested entry id 0"), "{err}");
    Ok(())
}

#[tokio::test]
async fn sender_rejects_bad_requests_with_an_err_packet() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    std::fs::create_dir(tmp.path().join("d"))?;
    std::fs::write(tmp.path().join("f"), vec![7u8; 100_000])?;
    for (reqs, want) in [
        (vec![0u32], "invalid file id 0"),
        (vec![99], "invalid file id 99"),
        (vec![1, 1], "requested twice"),
    ] {
        let channel = session_in_memory(LocalDirs::new().with_dir("context", tmp.path())).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut request = Request::new(tokio_stream::wrappers::UnboundedReceiverStream::new(rx));
        Selection {
            dir_name: "context".into(),
            ..Selection::default()
        }
        .to_metadata(request.metadata_mut())?;
        for id in &reqs {
            tx.send(Packet {
                r#type: PacketType::PacketReq as i32,
                id: *id,
                ..Packet::default()
            })?;
        }
        let mut inbound = FileSyncClient::new(channel)
            .diff_copy(request)
            .await?
            .into_inner();
        let mut chunks = Vec::new();
        let err = loop {
            let p = tokio::time::timeout(LIMIT, inbound.message())
                .await??
                .context("stream ended without an error packet")?;
            if p.r#type == PacketType::PacketErr as i32 {
                break String::from_utf8(p.data)?;
            }
            if p.r#type == PacketType::PacketData as i32 {
                chunks.push(p.data.len());
            }
        };
        assert!(err.contains(want), "{reqs:?}: {err}");
        if reqs == [1, 1] {
            // The first request was served in ≤ 32 KiB chunks and an empty end chunk.
            assert_eq!(
                chunks,
                [MAX_CHUNK, MAX_CHUNK, MAX_CHUNK, 100_000 - 3 * MAX_CHUNK, 0]
            );
        }
    }
    Ok(())
}
