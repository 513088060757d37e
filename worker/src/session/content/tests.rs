//! In-process tests: the store served over a session pipe, the daemon side calling it.

use std::collections::HashMap;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::Routes;

use super::*;
use crate::session::transport::{connect_client, pipe, serve};

/// A session in memory serving `stores`; returns the daemon's channel.
async fn session(stores: HashMap<String, PathBuf>) -> anyhow::Result<Channel> {
    let (a_tx, a_rx) = mpsc::channel(16);
    let (b_tx, b_rx) = mpsc::channel(16);
    let daemon = pipe(ReceiverStream::new(b_rx).map(Ok), a_tx);
    let cli = pipe(ReceiverStream::new(a_rx).map(Ok), b_tx);
    let routes = Routes::new(ContentStores::new(stores).into_service());
    tokio::spawn(serve(cli, routes));
    Ok(connect_client(daemon).await?)
}

fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn blobs(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("blobs/sha256"))
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[tokio::test]
async fn blobs_round_trip_and_existing_blobs_are_skipped() -> anyhow::Result<()> {
    let store = tempfile::tempdir()?;
    let work = tempfile::tempdir()?;
    let channel = session(HashMap::from([(
        "export".to_string(),
        store.path().to_path_buf(),
    )]))
    .await?;
    // Several chunks, not a multiple of the chunk size.
    let data: Vec<u8> = (0..(CHUNK * 2 + 12345)).map(|i| (i % 251) as u8).collect();
    let digest = sha(&data);
    let src = work.path().join("src");
    std::fs::write(&src, &data)?;
    write_blob(channel.clone(), "export", &digest, data.len() as u64, &src).await?;
    let hex = digest_hex(&digest).unwrap_or_default().to_string();
    assert_eq!(blobs(store.path()), vec![hex.clone()]);
    assert_eq!(
        std::fs::read(store.path().join("blobs/sha256").join(&hex))?,
        data
    );
    // No ingest file is left in the store.
    let names: Vec<_> = std::fs::read_dir(store.path())?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("blobs")]);
    // A second write is skipped (the source is gone, so a re-upload would fail).
    std::fs::remove_file(&src)?;
    write_blob(channel.clone(), "export", &digest, data.len() as u64, &src).await?;
    // A containerd-style writer of the existing blob: STAT, a bare STAT, then COMMIT, each
    // answered with the full size and nothing written.
    let (tx, rx) = mpsc::channel(4);
    let base = WriteContentRequest {
        r#ref: "again".into(),
        total: data.len() as i64,
        expected: digest.clone(),
        ..Default::default()
    };
    tx.send(WriteContentRequest {
        action: WriteAction::Stat as i32,
        ..base.clone()
    })
    .await?;
    let mut c = client(channel.clone());
    let mut resp = c
        .write(with_store("export", ReceiverStream::new(rx))?)
        .await?
        .into_inner();
    let next = |m: Option<WriteContentResponse>| m.ok_or_else(|| anyhow::anyhow!("no answer"));
    let first = next(resp.message().await?)?;
    assert_eq!(first.offset, data.len() as i64, "{first:?}");
    tx.send(WriteContentRequest {
        action: WriteAction::Stat as i32,
        ..Default::default()
    })
    .await?;
    let bare = next(resp.message().await?)?;
    assert_eq!(bare.offset, data.len() as i64, "{bare:?}");
    tx.send(WriteContentRequest {
        action: WriteAction::Commit as i32,
        offset: data.len() as i64,
        ..base.clone()
    })
    .await?;
    let commit = next(resp.message().await?)?;
    assert_eq!(commit.offset, data.len() as i64, "{commit:?}");
    assert_eq!(commit.digest, digest);
    assert!(resp.message().await?.is_none());
    drop(tx);
    assert_eq!(blobs(store.path()), vec![hex.clone()]);
    // Read it back, verified.
    let dest = work.path().join("back");
    let n = read_blob(channel.clone(), "export", &digest, &dest).await?;
    assert_eq!(n, data.len() as u64);
    assert_eq!(std::fs::read(&dest)?, data);
    // Read from an offset with a size.
    let mut c = client(channel.clone());
    let mut s = c
        .read(with_store(
            "export",
            ReadContentRequest {
                digest: digest.clone(),
                offset: 10,
                size: 5,
            },
        )?)
        .await?
        .into_inner();
    let first = s
        .message()
        .await?
        .ok_or_else(|| anyhow::anyhow!("no data"))?;
    assert_eq!(first.offset, 10);
    assert_eq!(first.data, data[10..15].to_vec());
    assert!(s.message().await?.is_none());
    Ok(())
}

#[tokio::test]
async fn a_corrupt_commit_leaves_nothing_in_blobs() -> anyhow::Result<()> {
    let store = tempfile::tempdir()?;
    let channel = session(HashMap::from([(
        "export".to_string(),
        store.path().to_path_buf(),
    )]))
    .await?;
    let wrong = sha(b"something else");
    let (tx, rx) = mpsc::channel(4);
    let base = WriteContentRequest {
        r#ref: "r".into(),
        total: 5,
        expected: wrong.clone(),
        ..Default::default()
    };
    tx.send(WriteContentRequest {
        action: WriteAction::Stat as i32,
        ..base.clone()
    })
    .await?;
    let mut c = client(channel.clone());
    let mut resp = c
        .write(with_store("export", ReceiverStream::new(rx))?)
        .await?
        .into_inner();
    let stat = resp
        .message()
        .await?
        .ok_or_else(|| anyhow::anyhow!("no stat"))?;
    assert_eq!(stat.offset, 0);
    tx.send(WriteContentRequest {
        action: WriteAction::Write as i32,
        data: b"hello".to_vec(),
        ..base.clone()
    })
    .await?;
    let w = resp
        .message()
        .await?
        .ok_or_else(|| anyhow::anyhow!("no ack"))?;
    assert_eq!(w.offset, 5);
    tx.send(WriteContentRequest {
        action: WriteAction::Commit as i32,
        offset: 5,
        ..base.clone()
    })
    .await?;
    let err = resp
        .message()
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("commit accepted"))?;
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(err.message().contains(&sha(b"hello")), "{err}");
    drop(tx);
    assert!(blobs(store.path()).is_empty());
    // The ingest file is gone too.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert_eq!(std::fs::read_dir(store.path())?.count(), 0);

    // A stream that ends without a commit leaves nothing either.
    let (tx, rx) = mpsc::channel(4);
    tx.send(WriteContentRequest {
        action: WriteAction::Write as i32,
        data: b"hello".to_vec(),
        ..Default::default()
    })
    .await?;
    let mut resp = c
        .write(with_store("export", ReceiverStream::new(rx))?)
        .await?
        .into_inner();
    resp.message().await?;
    drop(tx);
    assert!(resp.message().await?.is_none());
    assert_eq!(std::fs::read_dir(store.path())?.count(), 0);
    Ok(())
}

#[tokio::test]
async fn bad_digests_and_unknown_stores_are_refused() -> anyhow::Result<()> {
    let store = tempfile::tempdir()?;
    let channel = session(HashMap::from([(
        "export".to_string(),
        store.path().to_path_buf(),
    )]))
    .await?;
    let mut c = client(channel.clone());
    let good = sha(b"x");
    for bad in [
        "sha256:../../etc/passwd".to_string(),
        good.to_uppercase(),
        good.replace("sha256:", "sha512:"),
        format!("{good}0"),
        "sha256:".to_string(),
        String::new(),
    ] {
        let err = c
            .info(with_store(
                "export",
                InfoRequest {
                    digest: bad.clone(),
                },
            )?)
            .await
            .err()
            .ok_or_else(|| anyhow::anyhow!("{bad:?} accepted"))?;
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad:?}: {err}");
        let dest = store.path().join("x");
        let err = read_blob(channel.clone(), "export", &bad, &dest).await;
        assert!(err.is_err(), "{bad:?}");
    }
    let err = c
        .info(with_store(
            "nope",
            InfoRequest {
                digest: good.clone(),
            },
        )?)
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("unknown store accepted"))?;
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(err.message().contains("nope"), "{err}");
    let err = c
        .info(with_store(
            "export",
            InfoRequest {
                digest: good.clone(),
            },
        )?)
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("missing blob found"))?;
    assert_eq!(err.code(), tonic::Code::NotFound);
    let e = read_blob(channel, "export", &good, &store.path().join("y"))
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("missing blob read"))?;
    let msg = crate::solver::error_chain(&e);
    assert!(msg.contains("export") && msg.contains(&good), "{msg}");
    Ok(())
}
