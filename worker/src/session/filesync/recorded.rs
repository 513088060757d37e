//! The fsutil packet protocol pinned by a recording: `worker/tests/data/fsutil-exchange/
//! exchange.txt` holds every packet that fsutil's own Go sender and receiver (the library
//! buildctl and BuildKit run) put on the wire for a small tree, made by `record.sh` there.
//! Kiln's receiver, fed the Go sender's packets, must answer with the Go receiver's bytes
//! and write the same tree; Kiln's sender, listing the same tree and fed the Go receiver's
//! requests, must send the Go sender's bytes.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use kiln_proto::fsutil::types::Packet;
use prost::Message as _;
use tokio::sync::mpsc;

const EXCHANGE: &str = include_str!("../../../tests/data/fsutil-exchange/exchange.txt");

/// The recorded packets of one direction (`S` sender→receiver, `R` receiver→sender), as
/// bytes, in the order sent.
fn recorded(dir: &str) -> Vec<Vec<u8>> {
    EXCHANGE
        .lines()
        .filter_map(|l| {
            let (d, hex) = l.split_once(' ').unwrap_or((l, ""));
            (d == dir).then(|| hex::decode(hex.trim()).expect("hex in exchange.txt"))
        })
        .collect()
}

fn decode(b: &[u8]) -> Packet {
    Packet::decode(b).expect("a recorded packet decodes")
}

/// The tree record.sh builds (names, contents, modes, owners 0:0, times to the ns).
fn tree(root: &Path) -> anyhow::Result<()> {
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    std::fs::create_dir_all(root.join("src"))?;
    std::fs::write(root.join("Dockerfile"), "FROM scratch\nCOPY . /\n")?;
    std::fs::write(root.join("src/main.sh"), "#!/bin/sh\necho hi\n")?;
    std::fs::write(root.join("empty"), "")?;
    std::os::unix::fs::symlink("src/main.sh", root.join("link"))?;
    for (p, mode) in [
        ("Dockerfile", 0o644),
        ("src/main.sh", 0o755),
        ("src", 0o755),
        ("empty", 0o600),
        ("", 0o755),
    ] {
        std::fs::set_permissions(root.join(p), std::fs::Permissions::from_mode(mode))?;
    }
    // 2026-01-02T03:04:05.123456789Z and, for the directory, 03:04:06.5.
    let t = TimeSpec::new(1_767_323_045, 123_456_789);
    for p in ["Dockerfile", "src/main.sh", "empty", "link"] {
        utimensat(
            nix::fcntl::AT_FDCWD,
            &root.join(p),
            &t,
            &t,
            UtimensatFlags::NoFollowSymlink,
        )?;
    }
    let d = TimeSpec::new(1_767_323_046, 500_000_000);
    utimensat(
        nix::fcntl::AT_FDCWD,
        &root.join("src"),
        &d,
        &d,
        UtimensatFlags::NoFollowSymlink,
    )?;
    Ok(())
}

#[tokio::test]
async fn kiln_receiver_answers_the_go_sender_like_the_go_receiver() -> anyhow::Result<()> {
    let from_go: Vec<Result<Packet, tonic::Status>> =
        recorded("S").iter().map(|b| Ok(decode(b))).collect();
    let mut inbound = futures::stream::iter(from_go);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let dir = tempfile::tempdir()?;
    let dest = dir.path().join("dest");
    super::receive_stream(&mut inbound, tx, &dest).await?;
    let mut answered = Vec::new();
    while let Ok(p) = rx.try_recv() {
        answered.push(p.encode_to_vec());
    }
    let hexes = |v: &[Vec<u8>]| v.iter().map(hex::encode).collect::<Vec<_>>();
    assert_eq!(hexes(&answered), hexes(&recorded("R")));
    // And the tree is the sender's.
    let want = tempfile::tempdir()?;
    tree(want.path())?;
    for p in ["Dockerfile", "src/main.sh", "empty"] {
        assert_eq!(
            std::fs::read(dest.join(p))?,
            std::fs::read(want.path().join(p))?,
            "{p}"
        );
    }
    assert_eq!(
        std::fs::read_link(dest.join("link"))?,
        Path::new("src/main.sh")
    );
    use std::os::unix::fs::MetadataExt as _;
    for p in ["Dockerfile", "src/main.sh", "empty", "src", "link"] {
        let (a, b) = (
            std::fs::symlink_metadata(dest.join(p))?,
            std::fs::symlink_metadata(want.path().join(p))?,
        );
        assert_eq!(a.mode(), b.mode(), "{p} mode");
        assert_eq!(
            (a.mtime(), a.mtime_nsec()),
            (b.mtime(), b.mtime_nsec()),
            "{p} mtime"
        );
    }
    Ok(())
}

#[tokio::test]
async fn kiln_sender_lists_and_sends_like_the_go_sender() -> anyhow::Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        // The recorded owners are 0:0; as another user the listing differs by design.
        eprintln!("skipped: needs root for owners 0:0");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("src");
    tree(&root)?;
    // The Go receiver's packets, each sent once Kiln's sender has answered the one before
    // as the Go sender did (so requests never run ahead of the listing).
    let from_go: Vec<Packet> = recorded("R").iter().map(|b| decode(b)).collect();
    let (in_tx, in_rx) = mpsc::channel::<Result<Packet, tonic::Status>>(16);
    let (out_tx, mut out_rx) = mpsc::channel(64);
    let sender = tokio::spawn(super::send::send_dir(
        root,
        tokio_stream::wrappers::ReceiverStream::new(in_rx),
        out_tx,
    ));
    let go_sent = recorded("S");
    let mut sent: Vec<Vec<u8>> = Vec::new();
    let mut requests = from_go.into_iter();
    // Feed a request whenever Kiln has sent what the Go sender had sent by then; the Go
    // receiver closes its side after its FIN.
    let order: Vec<(char, usize)> = {
        let (mut s, mut r) = (0, 0);
        EXCHANGE
            .lines()
            .map(|l| {
                if l.starts_with('S') {
                    s += 1;
                    ('S', s)
                } else {
                    r += 1;
                    ('R', r)
                }
            })
            .collect()
    };
    for (dir, _) in order {
        match dir {
            'S' => {
                let p = tokio::time::timeout(std::time::Duration::from_secs(10), out_rx.recv())
                    .await?
                    .ok_or_else(|| {
                        anyhow::anyhow!("the sender stopped after {} packets", sent.len())
                    })??;
                sent.push(p.encode_to_vec());
            }
            _ => {
                let p = requests.next().expect("as many requests as recorded");
                in_tx.send(Ok(p)).await?;
            }
        }
    }
    drop(in_tx);
    sender.await??;
    let hexes = |v: &[Vec<u8>]| v.iter().map(hex::encode).collect::<Vec<_>>();
    assert_eq!(hexes(&sent), hexes(&go_sent));
    Ok(())
}
