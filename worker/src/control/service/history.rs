//! Build history: what `ListenBuildHistory` streams and `UpdateBuildHistory` changes, and
//! where `Status` finds the progress of a build that finished long ago.
//!
//! Every non-internal Solve gets a `BuildHistoryRecord`: active while it runs (in memory),
//! then complete, written to `root/history/<sha256 of ref>.rec` (the record and the build's
//! progress as length-delimited protobuf, written to a temporary file and renamed). The
//! file is not synced: it is written as every Solve returns, and history is not worth an
//! fsync on that path; a record torn by a power loss fails to decode and, like any
//! unreadable file, is skipped with a warning and removed at open. At most [`MAX_RECORDS`] unpinned records are kept,
//! none older than [`MAX_AGE`]; evicted and deleted ones are announced as `DELETED`.
//!
//! Partial: the record's `logs`, `trace` and `externalError` descriptors stay empty (Kiln
//! serves no content store for history blobs yet); a finished build's logs are replayed
//! through `Status` instead. Filters support `key==value` and `key!=value` on `ref`,
//! `frontend` and `status` (`running`, `completed`, `failed`, `canceled`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use kiln_proto::moby::buildkit::v1 as api;
use prost::Message as _;
use tokio::sync::broadcast;
use tonic::Status;

use crate::progress::Event;

/// Most completed, unpinned records kept (BuildKit's default).
pub const MAX_RECORDS: usize = 50;
/// Oldest completed, unpinned record kept (BuildKit's default).
pub const MAX_AGE: Duration = Duration::from_secs(48 * 3600);
/// Most bytes of encoded progress stored with one record; later progress is dropped and a
/// warning says so when it is replayed.
const MAX_PROGRESS_BYTES: usize = 8 << 20;
/// Progress events per stored `StatusResponse`.
const EVENTS_PER_MESSAGE: usize = 256;

/// A completed record and where its progress is.
#[derive(Clone)]
struct Stored {
    record: api::BuildHistoryRecord,
    file: PathBuf,
}

#[derive(Default)]
struct Inner {
    active: BTreeMap<String, api::BuildHistoryRecord>,
    done: BTreeMap<String, Stored>,
}

/// The build history of one worker.
pub struct History {
    dir: PathBuf,
    inner: Mutex<Inner>,
    events: broadcast::Sender<api::BuildHistoryEvent>,
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("History").field("dir", &self.dir).finish()
    }
}

/// A parsed `Filter` entry.
pub struct Filter {
    key: String,
    value: String,
    equal: bool,
}

impl History {
    /// Opens (creating) the history under `dir`, loading the records kept there.
    pub fn open(dir: &Path) -> History {
        let (events, _) = broadcast::channel(256);
        let history = History {
            dir: dir.to_path_buf(),
            inner: Mutex::new(Inner::default()),
            events,
        };
        if let Err(e) = std::fs::create_dir_all(dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "build history: cannot create its directory; records will not be kept");
            return history;
        }
        let mut done = BTreeMap::new();
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rec") {
                continue;
            }
            match read_record(&path) {
                Ok(record) => {
                    done.insert(record.r#ref.clone(), Stored { record, file: path });
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "build history: dropping an unreadable record");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        if let Ok(mut inner) = history.inner.lock() {
            inner.done = done;
        }
        history.evict();
        history
    }

    /// Records that the build `req` started (internal builds are not recorded).
    pub fn started(&self, req: &api::SolveRequest) {
        if req.internal {
            return;
        }
        let mut exporters: Vec<api::Exporter> = req.exporters.clone();
        if exporters.is_empty() && !req.exporter_deprecated.is_empty() {
            exporters.push(api::Exporter {
                r#type: req.exporter_deprecated.clone(),
                attrs: req.exporter_attrs_deprecated.clone(),
            });
        }
        let record = api::BuildHistoryRecord {
            r#ref: req.r#ref.clone(),
            frontend: req.frontend.clone(),
            frontend_attrs: req.frontend_attrs.clone(),
            exporters,
            created_at: Some(SystemTime::now().into()),
            ..Default::default()
        };
        if let Ok(mut inner) = self.inner.lock() {
            inner.active.insert(req.r#ref.clone(), record.clone());
        }
        self.announce(api::BuildHistoryEventType::Started, record);
    }

    /// Records that the build `r#ref` ended with `result` after producing `events`, and
    /// stores it with its progress.
    pub fn completed(
        &self,
        r#ref: &str,
        result: Result<&BTreeMap<String, String>, &Status>,
        events: &[Event],
    ) {
        let Some(mut record) = self
            .inner
            .lock()
            .ok()
            .and_then(|mut inner| inner.active.remove(r#ref))
        else {
            return;
        };
        record.completed_at = Some(SystemTime::now().into());
        match result {
            Ok(resp) => {
                record.exporter_response =
                    resp.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
            }
            Err(status) => {
                record.error = Some(kiln_proto::google::rpc::Status {
                    code: status.code() as i32,
                    message: status.message().to_string(),
                    details: Vec::new(),
                })
            }
        }
        count_steps(&mut record, events);
        let file = self.dir.join(format!("{}.rec", file_stem(r#ref)));
        if let Err(e) = write_record(&file, &record, events) {
            tracing::warn!(r#ref, file = %file.display(), error = %e, "build history: cannot store the record");
        } else if let Ok(mut inner) = self.inner.lock() {
            inner.done.insert(
                r#ref.to_string(),
                Stored {
                    record: record.clone(),
                    file,
                },
            );
        }
        self.announce(api::BuildHistoryEventType::Complete, record);
        self.evict();
    }

    /// The stored progress of the finished build `r#ref`, if it is in the history.
    pub fn progress(&self, r#ref: &str) -> Option<Vec<api::StatusResponse>> {
        let file = self.inner.lock().ok()?.done.get(r#ref)?.file.clone();
        match read_progress(&file) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(r#ref, file = %file.display(), error = %e, "build history: cannot read the stored progress");
                Some(Vec::new())
            }
        }
    }

    /// The events a `ListenBuildHistory` call sees first, and (unless `EarlyExit`) a
    /// receiver of later ones with the request's parsed filters for [`History::wanted`].
    /// Subscribes before taking the snapshot so nothing is missed.
    #[allow(clippy::type_complexity)]
    pub fn listen(
        &self,
        req: &api::BuildHistoryRequest,
    ) -> Result<
        (
            Vec<api::BuildHistoryEvent>,
            Option<(broadcast::Receiver<api::BuildHistoryEvent>, Vec<Filter>)>,
        ),
        Status,
    > {
        let filters = parse_filters(&req.filter)?;
        if req.limit < 0 {
            return Err(Status::invalid_argument(format!(
                "build history: limit {} is negative",
                req.limit
            )));
        }
        let rx = (!req.early_exit).then(|| self.events.subscribe());
        let inner = self
            .inner
            .lock()
            .map_err(|_| Status::internal("build history poisoned"))?;
        let mut out = Vec::new();
        if !req.active_only {
            let mut done: Vec<&api::BuildHistoryRecord> = inner
                .done
                .values()
                .map(|s| &s.record)
                .filter(|r| req.r#ref.is_empty() || r.r#ref == req.r#ref)
                .filter(|r| matches(r, &filters, false))
                .collect();
            // Newest first, as `buildx history ls` shows them; Limit keeps the newest.
            done.sort_by_key(|r| std::cmp::Reverse(created(r)));
            if req.limit > 0 {
                done.truncate(req.limit as usize);
            }
            out.extend(done.into_iter().map(|r| api::BuildHistoryEvent {
                r#type: api::BuildHistoryEventType::Complete as i32,
                record: Some(r.clone()),
            }));
        }
        out.extend(
            inner
                .active
                .values()
                .filter(|r| req.r#ref.is_empty() || r.r#ref == req.r#ref)
                .filter(|r| matches(r, &filters, true))
                .map(|r| api::BuildHistoryEvent {
                    r#type: api::BuildHistoryEventType::Started as i32,
                    record: Some(r.clone()),
                }),
        );
        Ok((out, rx.map(|rx| (rx, filters))))
    }

    /// Whether a later event passes `req`'s ref and its `filters` (as [`History::listen`]
    /// returns them, parsed once per listener).
    pub fn wanted(
        req: &api::BuildHistoryRequest,
        filters: &[Filter],
        ev: &api::BuildHistoryEvent,
    ) -> bool {
        let Some(r) = &ev.record else { return false };
        if !req.r#ref.is_empty() && r.r#ref != req.r#ref {
            return false;
        }
        if req.active_only && ev.r#type != api::BuildHistoryEventType::Started as i32 {
            return false;
        }
        let running = ev.r#type == api::BuildHistoryEventType::Started as i32;
        matches(r, filters, running)
    }

    /// `UpdateBuildHistory`: pin, unpin or delete a finished build's record.
    pub fn update(&self, req: &api::UpdateBuildHistoryRequest) -> Result<(), Status> {
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| Status::internal("build history poisoned"))?;
        if inner.active.contains_key(&req.r#ref) {
            if req.delete {
                return Err(Status::failed_precondition(format!(
                    "build history: {} is still running; it can be deleted when it ends",
                    req.r#ref
                )));
            }
            // Finalize of a running build: nothing to finish before it ends.
            return Ok(());
        }
        let Some(stored) = inner.done.get_mut(&req.r#ref) else {
            return Err(Status::not_found(format!(
                "build history: no record of {}",
                req.r#ref
            )));
        };
        if req.delete {
            let stored = inner.done.remove(&req.r#ref).expect("present");
            drop(inner);
            let _ = std::fs::remove_file(&stored.file);
            self.announce(api::BuildHistoryEventType::Deleted, stored.record);
            return Ok(());
        }
        if stored.record.pinned != req.pinned {
            stored.record.pinned = req.pinned;
            let progress = read_progress(&stored.file).unwrap_or_default();
            rewrite_record(&stored.file, &stored.record, &progress)
                .map_err(|e| Status::internal(format!("build history: {e}")))?;
        }
        Ok(())
    }

    fn announce(&self, kind: api::BuildHistoryEventType, record: api::BuildHistoryRecord) {
        // No listener is fine.
        let _ = self.events.send(api::BuildHistoryEvent {
            r#type: kind as i32,
            record: Some(record),
        });
    }

    /// Drops the oldest unpinned records beyond [`MAX_RECORDS`] or older than [`MAX_AGE`].
    fn evict(&self) {
        let now = SystemTime::now();
        let gone: Vec<Stored> = {
            let Ok(mut inner) = self.inner.lock() else {
                return;
            };
            let mut unpinned: Vec<(SystemTime, String)> = inner
                .done
                .values()
                .filter(|s| !s.record.pinned)
                .map(|s| (created(&s.record), s.record.r#ref.clone()))
                .collect();
            unpinned.sort();
            let excess = unpinned.len().saturating_sub(MAX_RECORDS);
            let mut gone = Vec::new();
            for (i, (at, r)) in unpinned.into_iter().enumerate() {
                let old = now.duration_since(at).is_ok_and(|age| age > MAX_AGE);
                if i < excess || old {
                    if let Some(s) = inner.done.remove(&r) {
                        gone.push(s);
                    }
                }
            }
            gone
        };
        for s in gone {
            let _ = std::fs::remove_file(&s.file);
            self.announce(api::BuildHistoryEventType::Deleted, s.record);
        }
    }
}

fn created(r: &api::BuildHistoryRecord) -> SystemTime {
    r.created_at
        .and_then(|t| SystemTime::try_from(t).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

fn file_stem(r#ref: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(r#ref.as_bytes()))
}

/// Fills the step counts and warnings from the build's progress.
fn count_steps(record: &mut api::BuildHistoryRecord, events: &[Event]) {
    let mut steps: BTreeMap<&str, (bool, bool)> = BTreeMap::new();
    let mut warnings = 0;
    for e in events {
        match e {
            Event::Vertex(v) => {
                let s = steps.entry(v.digest.as_str()).or_default();
                s.0 |= v.cached;
                s.1 |= v.completed.is_some();
            }
            Event::Warning(_) => warnings += 1,
            Event::Status(_) | Event::Log(_) => {}
        }
    }
    record.num_total_steps = steps.len() as i32;
    record.num_cached_steps = steps.values().filter(|s| s.0).count() as i32;
    record.num_completed_steps = steps.values().filter(|s| s.1).count() as i32;
    record.num_warnings = warnings;
}

/// Parses `BuildHistoryRequest.Filter`: `key==value` or `key!=value` on `ref`, `frontend`
/// and `status`; anything else is `InvalidArgument` naming the filter.
fn parse_filters(filters: &[String]) -> Result<Vec<Filter>, Status> {
    filters
        .iter()
        .flat_map(|f| f.split(','))
        .filter(|f| !f.trim().is_empty())
        .map(|f| {
            let (key, value, equal) = if let Some((k, v)) = f.split_once("!=") {
                (k, v, false)
            } else if let Some((k, v)) = f.split_once("==") {
                (k, v, true)
            } else {
                return Err(Status::invalid_argument(format!(
                    "build history filter {f:?}: only key==value and key!=value are supported"
                )));
            };
            let key = key.trim();
            if !matches!(key, "ref" | "frontend" | "status") {
                return Err(Status::invalid_argument(format!(
                    "build history filter {f:?}: unknown key {key:?} (supported: ref, frontend, status)"
                )));
            }
            Ok(Filter {
                key: key.to_string(),
                value: value.trim().trim_matches('"').to_string(),
                equal,
            })
        })
        .collect()
}

fn matches(r: &api::BuildHistoryRecord, filters: &[Filter], running: bool) -> bool {
    filters.iter().all(|f| {
        let actual = match f.key.as_str() {
            "ref" => r.r#ref.as_str(),
            "frontend" => r.frontend.as_str(),
            _ => match &r.error {
                _ if running => "running",
                None => "completed",
                Some(e) if e.code == tonic::Code::Cancelled as i32 => "canceled",
                Some(_) => "failed",
            },
        };
        (actual == f.value) == f.equal
    })
}

/// Writes the record and its progress to `file` atomically.
fn write_record(
    file: &Path,
    record: &api::BuildHistoryRecord,
    events: &[Event],
) -> std::io::Result<()> {
    let mut progress = Vec::new();
    let mut bytes = 0;
    for chunk in events.chunks(EVENTS_PER_MESSAGE) {
        let msg = super::status_response(chunk);
        bytes += msg.encoded_len();
        if bytes > MAX_PROGRESS_BYTES {
            progress.push(api::StatusResponse {
                warnings: vec![api::VertexWarning {
                    short: b"the rest of this build's progress was not kept in its history (over 8 MiB)"
                        .to_vec(),
                    ..Default::default()
                }],
                ..Default::default()
            });
            break;
        }
        progress.push(msg);
    }
    rewrite_record(file, record, &progress)
}

fn rewrite_record(
    file: &Path,
    record: &api::BuildHistoryRecord,
    progress: &[api::StatusResponse],
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    record.encode_length_delimited(&mut buf)?;
    for p in progress {
        p.encode_length_delimited(&mut buf)?;
    }
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, &buf)?;
    std::fs::rename(&tmp, file)
}

fn read_all(file: &Path) -> std::io::Result<(api::BuildHistoryRecord, bytes::Bytes)> {
    let data = bytes::Bytes::from(std::fs::read(file)?);
    let mut rest = data.clone();
    let record = api::BuildHistoryRecord::decode_length_delimited(&mut rest)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    if record.r#ref.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "record without a ref",
        ));
    }
    Ok((record, rest))
}

fn read_record(file: &Path) -> std::io::Result<api::BuildHistoryRecord> {
    let (record, mut rest) = read_all(file)?;
    // Check the progress decodes too, so a torn file is dropped at open.
    while !rest.is_empty() {
        api::StatusResponse::decode_length_delimited(&mut rest)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    }
    Ok(record)
}

fn read_progress(file: &Path) -> std::io::Result<Vec<api::StatusResponse>> {
    let (_, mut rest) = read_all(file)?;
    let mut out = Vec::new();
    while !rest.is_empty() {
        out.push(
            api::StatusResponse::decode_length_delimited(&mut rest)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?,
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::{VertexState, Warning};

    fn solve(r: &str) -> api::SolveRequest {
        api::SolveRequest {
            r#ref: r.to_string(),
            frontend: "dockerfile.v0".into(),
            ..Default::default()
        }
    }

    fn vertex(d: &str, cached: bool) -> Event {
        Event::Vertex(VertexState {
            digest: d.into(),
            inputs: vec![],
            name: d.into(),
            started: Some(SystemTime::now()),
            completed: Some(SystemTime::now()),
            cached,
            error: None,
        })
    }

    #[test]
    fn records_survive_reopen_and_count_steps() {
        let dir = tempfile::tempdir().unwrap();
        let h = History::open(dir.path());
        h.started(&solve("a"));
        let (first, _) = h
            .listen(&api::BuildHistoryRequest {
                early_exit: true,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].r#type, api::BuildHistoryEventType::Started as i32);
        let events = vec![
            vertex("sha256:1", true),
            vertex("sha256:2", false),
            Event::Warning(Warning {
                vertex: None,
                message: "w".into(),
            }),
        ];
        let resp = [("k".to_string(), "v".to_string())].into();
        h.completed("a", Ok(&resp), &events);
        drop(h);

        let h = History::open(dir.path());
        let (evs, _) = h
            .listen(&api::BuildHistoryRequest {
                early_exit: true,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(evs.len(), 1);
        let r = evs[0].record.as_ref().unwrap();
        assert_eq!(evs[0].r#type, api::BuildHistoryEventType::Complete as i32);
        assert_eq!(
            (r.num_total_steps, r.num_cached_steps, r.num_warnings),
            (2, 1, 1)
        );
        assert_eq!(r.exporter_response.get("k").map(String::as_str), Some("v"));
        let p = h.progress("a").unwrap();
        assert_eq!(p.iter().map(|m| m.vertexes.len()).sum::<usize>(), 2);
    }

    #[test]
    fn torn_files_are_dropped_and_filters_checked() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.rec"), b"\x05abc").unwrap();
        std::fs::write(dir.path().join("y.tmp"), b"junk").unwrap();
        let h = History::open(dir.path());
        assert!(!dir.path().join("x.rec").exists());
        assert!(!dir.path().join("y.tmp").exists());
        h.started(&solve("ok"));
        h.completed("ok", Ok(&Default::default()), &[]);
        h.started(&solve("bad"));
        h.completed("bad", Err(&Status::internal("boom")), &[]);
        let refs = |f: &str| {
            h.listen(&api::BuildHistoryRequest {
                early_exit: true,
                filter: vec![f.into()],
                ..Default::default()
            })
            .map(|(e, _)| {
                e.iter()
                    .map(|e| e.record.as_ref().unwrap().r#ref.clone())
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(refs("status==failed").unwrap(), vec!["bad"]);
        assert_eq!(refs("ref!=bad").unwrap(), vec!["ok"]);
        let err = refs("startedAt>1").unwrap_err();
        assert!(err.message().contains("startedAt>1"), "{err:?}");
        // Deleting removes the file; pinning survives a reopen.
        h.update(&api::UpdateBuildHistoryRequest {
            r#ref: "ok".into(),
            pinned: true,
            ..Default::default()
        })
        .unwrap();
        h.update(&api::UpdateBuildHistoryRequest {
            r#ref: "bad".into(),
            delete: true,
            ..Default::default()
        })
        .unwrap();
        let e = h
            .update(&api::UpdateBuildHistoryRequest {
                r#ref: "bad".into(),
                delete: true,
                ..Default::default()
            })
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        drop(h);
        let h = History::open(dir.path());
        let (evs, _) = h
            .listen(&api::BuildHistoryRequest {
                early_exit: true,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(evs.len(), 1);
        assert!(evs[0].record.as_ref().unwrap().pinned);
    }

    #[test]
    fn only_the_newest_unpinned_records_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let h = History::open(dir.path());
        let mut rx = h.events.subscribe();
        for i in 0..MAX_RECORDS + 3 {
            let r = format!("r{i}");
            h.started(&solve(&r));
            h.completed(&r, Ok(&Default::default()), &[]);
        }
        let (evs, _) = h
            .listen(&api::BuildHistoryRequest {
                early_exit: true,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(evs.len(), MAX_RECORDS);
        let mut deleted = 0;
        while let Ok(ev) = rx.try_recv() {
            deleted += usize::from(ev.r#type == api::BuildHistoryEventType::Deleted as i32);
        }
        assert_eq!(deleted, 3);
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files, MAX_RECORDS);
    }
}
