//! Build progress: vertex lifecycle events, per-vertex statuses (byte progress) and logs,
//! in the shape of BuildKit's `StatusResponse`, sent from the solver and ops to whoever
//! renders or forwards them. Sending never blocks and never fails a build.

use std::time::SystemTime;

use bytes::Bytes;
use tokio::sync::mpsc;

/// One vertex's current state; each event carries the full state, as BuildKit's do.
#[derive(Debug, Clone, PartialEq)]
pub struct VertexState {
    /// The vertex digest (LLB op digest, or a made-up one for internal steps).
    pub digest: String,
    /// Digests of its inputs.
    pub inputs: Vec<String>,
    /// Display name.
    pub name: String,
    /// When it started, if it has.
    pub started: Option<SystemTime>,
    /// When it completed, if it has.
    pub completed: Option<SystemTime>,
    /// Loaded from cache rather than executed.
    pub cached: bool,
    /// Error text when it failed.
    pub error: Option<String>,
}

/// A sub-task of a vertex (a layer download, a push), keyed by `(vertex, id)`.
#[derive(Debug, Clone, PartialEq)]
pub struct VertexStatus {
    /// The vertex it belongs to.
    pub vertex: String,
    /// Sub-task id (`sha256:…` of a layer, `pushing …`).
    pub id: String,
    /// Display name.
    pub name: String,
    /// Units done.
    pub current: u64,
    /// Units in all (0 = unknown).
    pub total: u64,
    /// When this update was made.
    pub timestamp: SystemTime,
    /// When the sub-task started.
    pub started: Option<SystemTime>,
    /// When it completed.
    pub completed: Option<SystemTime>,
}

/// Output of a vertex's process.
#[derive(Debug, Clone, PartialEq)]
pub struct VertexLog {
    /// The vertex it belongs to.
    pub vertex: String,
    /// 1 = stdout, 2 = stderr.
    pub stream: u8,
    /// Raw bytes; may split lines.
    pub data: Bytes,
    /// When it was produced.
    pub timestamp: SystemTime,
}

/// A build-wide warning.
#[derive(Debug, Clone, PartialEq)]
pub struct Warning {
    /// The vertex it belongs to, if any.
    pub vertex: Option<String>,
    /// The message.
    pub message: String,
}

/// One progress event.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A vertex's state changed.
    Vertex(VertexState),
    /// A sub-task advanced.
    Status(VertexStatus),
    /// A process wrote output.
    Log(VertexLog),
    /// Something non-fatal the user should know.
    Warning(Warning),
}

/// Where progress goes; cheap to clone; a closed receiver is ignored.
#[derive(Debug, Clone)]
pub struct Progress {
    tx: Option<mpsc::UnboundedSender<Event>>,
}

impl Progress {
    /// A sender and the receiver of its events.
    pub fn channel() -> (Progress, mpsc::UnboundedReceiver<Event>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Progress { tx: Some(tx) }, rx)
    }

    /// A sender that drops everything.
    pub fn discard() -> Progress {
        Progress { tx: None }
    }

    /// Sends an event.
    pub fn send(&self, event: Event) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(event);
        }
    }

    /// Sends a vertex state.
    pub fn vertex(&self, state: &VertexState) {
        self.send(Event::Vertex(state.clone()));
    }

    /// Sends output of a vertex.
    pub fn log(&self, vertex: &str, stream: u8, data: Bytes) {
        self.send(Event::Log(VertexLog {
            vertex: vertex.to_string(),
            stream,
            data,
            timestamp: SystemTime::now(),
        }));
    }

    /// Sends a warning.
    pub fn warn(&self, vertex: Option<&str>, message: impl Into<String>) {
        self.send(Event::Warning(Warning {
            vertex: vertex.map(str::to_string),
            message: message.into(),
        }));
    }
}

/// A helper for internal steps (exporting, pushing) that are not LLB vertices: a made-up
/// vertex whose digest is `sha256` of an id, as BuildKit names them.
#[derive(Debug)]
pub struct Step {
    progress: Progress,
    state: VertexState,
}

impl Step {
    /// Starts a step named `name` with id `id`.
    pub fn start(progress: &Progress, id: &str, name: &str) -> Step {
        let state = VertexState {
            digest: crate::llb::digest_of(id.as_bytes()),
            inputs: Vec::new(),
            name: name.to_string(),
            started: Some(SystemTime::now()),
            completed: None,
            cached: false,
            error: None,
        };
        progress.vertex(&state);
        Step {
            progress: progress.clone(),
            state,
        }
    }

    /// The step's digest.
    pub fn digest(&self) -> &str {
        &self.state.digest
    }

    /// The progress sink.
    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// Reports a sub-task.
    pub fn status(&self, id: &str, name: &str, current: u64, total: u64, done: bool) {
        let now = SystemTime::now();
        self.progress.send(Event::Status(VertexStatus {
            vertex: self.state.digest.clone(),
            id: id.to_string(),
            name: name.to_string(),
            current,
            total,
            timestamp: now,
            started: self.state.started,
            completed: done.then_some(now),
        }));
    }

    /// Completes the step, with an error text when it failed.
    pub fn finish(mut self, error: Option<String>) {
        self.state.completed = Some(SystemTime::now());
        self.state.error = error;
        self.progress.vertex(&self.state);
    }
}
