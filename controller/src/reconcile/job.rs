//! The `BuildJob` reconciler: resolves a job's inputs (its pool's gateway address and the
//! controller's client certificate, the ConfigMap context, Secrets, registry credentials),
//! starts the build in a task of this process keyed by the job's uid, and writes the
//! outcome to the job's status (merge patches of the status subresource).
//!
//! Life of a job: `Pending` → (inputs resolve) `Running` → `Succeeded` with the image digest,
//! or `Failed` with a `Degraded` condition naming the cause. A worker lost mid-build (the
//! gateway answers `Unavailable`) is retried up to [`Settings::max_attempts`] with a growing
//! delay. Each attempt's build has a deterministic ref ([`build_ref`]) recorded in
//! `status.buildRef` before it is submitted, so a `Running` job with no task in this process
//! (the controller restarted) is looked up on the workers by that ref and takes the finished
//! build's outcome, or follows it while it runs; only a build no worker knows (or one
//! cancelled when the earlier process's session went away) costs a new attempt.
//! `timeout` cancels the build; deleting a running job cancels it (through the
//! [`FINALIZER`], held only while the build runs); `ttlSecondsAfterFinished` deletes the
//! finished job. Reconciling a finished job writes nothing.
//!
//! The build itself is behind the [`Runner`] trait: [`runner::GatewayRunner`] drives it over
//! the `kiln_cli` client; tests inject their own.

pub mod runner;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Client, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn, Instrument};

use super::{condition, unix_time, Clock};
use crate::crd::{
    BuildJob, BuildJobStatus, BuildPhase, BuildWorkerPool, CacheMode, CONDITION_DEGRADED,
    CONDITION_PROGRESSING, CONDITION_READY,
};
use crate::units::parse_duration;
use crate::{render, tls, Error, Result};

/// Finalizer a job carries while its build runs, so deleting it cancels the build.
pub const FINALIZER: &str = "kiln.dev/cancel-build";

/// Frontend attribute the gateway routes on; a job's builds all use the job as the key.
pub const ROUTE_KEY_ATTR: &str = "kiln.route-key";

/// Key of the credentials in a `kubernetes.io/dockerconfigjson` Secret.
pub const DOCKER_CONFIG_KEY: &str = ".dockerconfigjson";

/// Tunables of the job controller.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Most submissions of one job (a lost worker or a controller restart costs one).
    pub max_attempts: i32,
    /// Lines kept in `status.logTail`.
    pub log_tail: usize,
    /// Least time between two progress patches of one job.
    pub progress_interval: Duration,
    /// Delay before the second attempt; doubled for each further one.
    pub retry_backoff: Duration,
    /// When to look again at a job waiting for its inputs, or still running.
    pub recheck: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_attempts: 3,
            log_tail: 20,
            progress_interval: Duration::from_secs(3),
            retry_backoff: Duration::from_secs(5),
            recheck: Duration::from_secs(30),
        }
    }
}

// === the runner interface ===

/// A client identity for the gateway: PEM texts, and the name its certificate must carry.
#[derive(Clone)]
pub struct ClientIdentity {
    /// CA bundle verifying the gateway.
    pub ca_pem: String,
    /// The controller's client certificate.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
    /// Name checked against the gateway's certificate.
    pub server_name: String,
}

/// Everything one build needs, resolved from the job, its pool and their Secrets.
#[derive(Clone)]
pub struct BuildInput {
    /// `namespace/name` of the job, for messages.
    pub job: String,
    /// The job's uid.
    pub uid: String,
    /// The ref of this attempt's build ([`build_ref`]), as recorded in `status.buildRef`.
    pub build_ref: String,
    /// The gateway (`tcp://<pool>-gateway.<ns>.svc:<port>`).
    pub addr: String,
    /// How to authenticate to it.
    pub tls: ClientIdentity,
    /// Frontend attributes (`filename`, `target`, `build-arg:K`, `platform`, `context`,
    /// `kiln.route-key`).
    pub frontend_attrs: BTreeMap<String, String>,
    /// The context's files (a ConfigMap source), served as `context` and `dockerfile`;
    /// `None` for a remote context named in `frontend_attrs["context"]`.
    pub context_files: Option<BTreeMap<String, Vec<u8>>>,
    /// Build secrets by id.
    pub secrets: BTreeMap<String, Vec<u8>>,
    /// A docker `config.json` with registry credentials (from the pool's Secret).
    pub docker_config: Option<Vec<u8>>,
    /// Images to export: `(name, push)`.
    pub images: Vec<(String, bool)>,
    /// Registry cache references to import.
    pub cache_imports: Vec<String>,
    /// Registry cache references to export, with their mode.
    pub cache_exports: Vec<(String, CacheMode)>,
}

impl std::fmt::Debug for BuildInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secret ids only, and no key material: this may reach a log.
        f.debug_struct("BuildInput")
            .field("job", &self.job)
            .field("build_ref", &self.build_ref)
            .field("addr", &self.addr)
            .field("frontend_attrs", &self.frontend_attrs)
            .field(
                "context_files",
                &self
                    .context_files
                    .as_ref()
                    .map(|f| f.keys().collect::<Vec<_>>()),
            )
            .field("secrets", &self.secrets.keys().collect::<Vec<_>>())
            .field("docker_config", &self.docker_config.is_some())
            .field("images", &self.images)
            .finish_non_exhaustive()
    }
}

/// A finished build.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Built {
    /// The image's manifest digest.
    pub image_digest: Option<String>,
    /// The worker that ran it.
    pub worker: Option<String>,
}

/// Why a build did not finish.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    /// The gateway or its worker went away (retried).
    #[error("{message}")]
    Unavailable {
        /// What the client saw.
        message: String,
        /// The worker that was lost, when known.
        worker: Option<String>,
    },
    /// The build failed (not retried).
    #[error("{message}")]
    Failed {
        /// The daemon's or the frontend's message.
        message: String,
        /// The worker that ran it, when known.
        worker: Option<String>,
    },
    /// No worker knows the build a restarted controller looked for, or its record says it
    /// was cancelled (its client went away): the next attempt is submitted.
    #[error("{message}")]
    NotFound {
        /// What was looked for and where.
        message: String,
    },
}

/// What [`Runner::run`] returns.
pub type RunFuture = BoxFuture<'static, std::result::Result<Built, RunError>>;

/// Runs one build; dropping the future cancels it.
pub trait Runner: Send + Sync + 'static {
    /// Starts the build of `input`, reporting progress to `report`.
    fn run(&self, input: BuildInput, report: Reporter) -> RunFuture;

    /// Finds the build `input.build_ref` that an earlier controller process submitted: its
    /// outcome when finished, following it first when still running;
    /// [`RunError::NotFound`] when no worker knows it or it was cancelled. A runner that
    /// cannot look builds up says so with `NotFound`, and the next attempt is submitted.
    fn attach(&self, input: BuildInput, report: Reporter) -> RunFuture {
        let _ = report;
        let message = format!(
            "this runner cannot look up build {} of {}",
            input.build_ref, input.job
        );
        Box::pin(async move { Err(RunError::NotFound { message }) })
    }
}

/// The deterministic ref of attempt `attempt` of the job with `uid`: the same job and
/// attempt always name the same build, so a restarted controller can find it.
pub fn build_ref(uid: &str, attempt: i32) -> String {
    format!("kiln-{uid}-{attempt}")
}

/// Where a runner reports a build's progress: log lines (secret values masked) and the
/// worker's name.
#[derive(Clone)]
pub struct Reporter {
    live: Arc<Mutex<Live>>,
    masks: Arc<Vec<String>>,
    keep: usize,
}

impl Reporter {
    /// Adds one log line, with every secret value in it replaced by `****`.
    pub fn line(&self, line: &str) {
        let mut line = line.to_string();
        for m in self.masks.iter() {
            if line.contains(m.as_str()) {
                line = line.replace(m.as_str(), "****");
            }
        }
        lock(&self.live).push(line, self.keep);
    }

    /// Records the worker running the build.
    pub fn worker(&self, name: &str) {
        let mut live = lock(&self.live);
        if live.worker.as_deref() != Some(name) {
            live.worker = Some(name.to_string());
            live.dirty = true;
        }
    }
}

/// What a running build has reported, and its outcome once it ended.
#[derive(Default)]
struct Live {
    tail: VecDeque<String>,
    worker: Option<String>,
    dirty: bool,
    outcome: Option<Outcome>,
}

impl Live {
    fn push(&mut self, line: String, keep: usize) {
        self.tail.push_back(line);
        while self.tail.len() > keep {
            self.tail.pop_front();
        }
        self.dirty = true;
    }
}

#[derive(Clone, Debug)]
enum Outcome {
    Built(Built),
    Run(RunError),
    TimedOut(String),
}

/// A build task of this process.
struct Task {
    live: Arc<Mutex<Live>>,
    handle: JoinHandle<()>,
    /// Which attempt it runs (the truth when the cached job lags behind).
    attempt: i32,
}

impl Drop for Task {
    fn drop(&mut self) {
        // Dropping the runner's future cancels the build.
        self.handle.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// === context ===

/// What every job reconcile shares: the API client, the clock, the runner and the build
/// tasks of this process.
pub struct JobContext {
    /// The API client.
    pub client: Client,
    /// Current time.
    pub clock: Clock,
    /// Runs the builds.
    pub runner: Arc<dyn Runner>,
    /// Tunables.
    pub settings: Settings,
    /// Publishes the jobs' Kubernetes Events.
    recorder: kube::runtime::events::Recorder,
    tasks: Mutex<HashMap<String, Task>>,
    /// Jobs whose final status this process wrote and has not yet seen back: a reconcile
    /// of an older copy of them (the watch cache lags) must not run them again.
    done: Mutex<HashSet<String>>,
    trigger: mpsc::UnboundedSender<ObjectRef<BuildJob>>,
}

impl JobContext {
    /// A context, and the stream of jobs whose build task ended (their last status patch
    /// also brings a reconcile; the stream serves callers without a watch, like tests).
    pub fn new(
        client: Client,
        clock: Clock,
        runner: Arc<dyn Runner>,
        settings: Settings,
    ) -> (
        Arc<JobContext>,
        mpsc::UnboundedReceiver<ObjectRef<BuildJob>>,
    ) {
        let (trigger, rx) = mpsc::unbounded_channel();
        let reporter = kube::runtime::events::Reporter {
            controller: "kiln-controller".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        let ctx = JobContext {
            recorder: kube::runtime::events::Recorder::new(client.clone(), reporter),
            client,
            clock,
            runner,
            settings,
            tasks: Mutex::new(HashMap::new()),
            done: Mutex::new(HashSet::new()),
            trigger,
        };
        (Arc::new(ctx), rx)
    }

    /// Whether this process runs a build for the job with `uid`.
    pub fn has_task(&self, uid: &str) -> bool {
        lock(&self.tasks).contains_key(uid)
    }

    /// Cancels the build of `uid`, if any; true when there was one.
    fn cancel(&self, uid: &str) -> bool {
        lock(&self.tasks).remove(uid).is_some()
    }

    fn state(&self, uid: &str) -> TaskState {
        let tasks = lock(&self.tasks);
        let Some(t) = tasks.get(uid) else {
            return TaskState::None;
        };
        let live = lock(&t.live);
        match &live.outcome {
            None => TaskState::Running,
            Some(o) => TaskState::Ended {
                outcome: o.clone(),
                tail: live.tail.iter().cloned().collect(),
                worker: live.worker.clone(),
                attempt: t.attempt,
            },
        }
    }

    fn is_done(&self, uid: &str) -> bool {
        lock(&self.done).contains(uid)
    }
}

enum TaskState {
    None,
    Running,
    Ended {
        outcome: Outcome,
        tail: Vec<String>,
        worker: Option<String>,
        attempt: i32,
    },
}

/// How soon to look again at a job whose cached copy is older than what this process wrote.
const STALE_RECHECK: Duration = Duration::from_secs(2);

// === reconcile ===

/// Reconciles one job; the `Controller` calls this on every change of the job, and when
/// its build task ends.
pub async fn reconcile(job: Arc<BuildJob>, ctx: Arc<JobContext>) -> Result<Action> {
    let span = tracing::info_span!(
        "reconcile",
        job = %job.name_any(),
        namespace = %job.namespace().unwrap_or_default()
    );
    let started = std::time::Instant::now();
    let res = reconcile_job(&job, &ctx).instrument(span).await;
    if let Some(m) = crate::metrics::global() {
        m.reconciled("BuildJob", res.is_ok(), started.elapsed());
    }
    res
}

/// Logs a failed reconcile and retries later.
pub fn error_policy(job: Arc<BuildJob>, error: &Error, _ctx: Arc<JobContext>) -> Action {
    warn!(%error, job = %job.name_any(), "job reconcile failed");
    super::retry_after_error()
}

/// The job's namespace, name and uid.
struct Ids {
    ns: String,
    name: String,
    uid: String,
}

fn ids(job: &BuildJob) -> Result<Ids> {
    let name = job.name_any();
    let missing = |field: &str| Error::InvalidSpec {
        object: name.clone(),
        field: field.into(),
        reason: "missing".into(),
    };
    Ok(Ids {
        ns: job
            .namespace()
            .ok_or_else(|| missing("metadata.namespace"))?,
        uid: job.uid().ok_or_else(|| missing("metadata.uid"))?,
        name: name.clone(),
    })
}

async fn reconcile_job(job: &BuildJob, ctx: &Arc<JobContext>) -> Result<Action> {
    let id = ids(job)?;
    if job.metadata.deletion_timestamp.is_some() {
        lock(&ctx.done).remove(&id.uid);
        if ctx.cancel(&id.uid) {
            info!("job deleted: its build is cancelled");
        }
        set_finalizer(job, ctx, &id, false).await?;
        return Ok(Action::await_change());
    }
    let status = job.status.clone().unwrap_or_default();
    match status.phase {
        BuildPhase::Succeeded | BuildPhase::Failed => {
            lock(&ctx.done).remove(&id.uid);
            finished(job, ctx, &id, &status).await
        }
        // This process started or finished it already; the cached copy is older.
        BuildPhase::Pending if ctx.has_task(&id.uid) || ctx.is_done(&id.uid) => {
            Ok(Action::requeue(STALE_RECHECK))
        }
        BuildPhase::Pending => submit(job, ctx, &id, &status, 1, None).await,
        BuildPhase::Running => running(job, ctx, &id, &status).await,
    }
}

/// A finished job: nothing to write; deleted once its TTL has passed.
async fn finished(
    job: &BuildJob,
    ctx: &JobContext,
    id: &Ids,
    status: &BuildJobStatus,
) -> Result<Action> {
    ctx.cancel(&id.uid);
    set_finalizer(job, ctx, id, false).await?;
    let Some(ttl) = job.spec.ttl_seconds_after_finished else {
        return Ok(Action::await_change());
    };
    let now = (ctx.clock)().unix_timestamp();
    let done = status
        .completion_time
        .as_ref()
        .map(|t| t.0.as_second())
        .unwrap_or(now);
    let at = done.saturating_add(i64::from(ttl.max(0)));
    if now < at {
        return Ok(Action::requeue(Duration::from_secs((at - now) as u64)));
    }
    info!(ttl, "deleting the finished job (ttlSecondsAfterFinished)");
    let api = Api::<BuildJob>::namespaced(ctx.client.clone(), &id.ns);
    match api.delete(&id.name, &DeleteParams::default()).await {
        Ok(_) => Ok(Action::await_change()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(Action::await_change()),
        Err(source) => Err(Error::Kube {
            action: format!("delete BuildJob {}/{}", id.ns, id.name),
            source,
        }),
    }
}

/// A running job: wait for its task, write its outcome, retry a lost worker, or resubmit
/// when no task of this process runs it.
async fn running(
    job: &BuildJob,
    ctx: &Arc<JobContext>,
    id: &Ids,
    status: &BuildJobStatus,
) -> Result<Action> {
    let max = ctx.settings.max_attempts;
    match ctx.state(&id.uid) {
        TaskState::Running => Ok(Action::requeue(ctx.settings.recheck)),
        TaskState::None if ctx.is_done(&id.uid) => Ok(Action::requeue(STALE_RECHECK)),
        TaskState::None if status.build_ref.is_some() && status.attempts > 0 => {
            reattach(job, ctx, id, status).await
        }
        TaskState::None => {
            if status.attempts >= max {
                let msg = format!(
                    "the controller lost the build (restarted) after {} attempts",
                    status.attempts
                );
                return fail(job, ctx, id, status, "ControllerRestarted", msg, None).await;
            }
            info!(
                attempt = status.attempts + 1,
                "running job has no build in this process (controller restarted): resubmitting"
            );
            let note = "controller restarted: build resubmitted".to_string();
            submit(job, ctx, id, status, status.attempts + 1, Some(note)).await
        }
        TaskState::Ended {
            outcome,
            tail,
            worker,
            attempt,
        } => {
            let mut status = status.clone();
            status.attempts = status.attempts.max(attempt);
            status.log_tail = tail;
            if worker.is_some() {
                status.worker = worker;
            }
            match outcome {
                Outcome::Built(built) => succeed(job, ctx, id, status, built).await,
                Outcome::TimedOut(spec) => {
                    let msg = format!("timed out after {spec}");
                    fail(job, ctx, id, &status, "TimedOut", msg, None).await
                }
                Outcome::Run(RunError::Failed { message, worker }) => {
                    fail(job, ctx, id, &status, "BuildFailed", message, worker).await
                }
                Outcome::Run(RunError::NotFound { message }) => {
                    if status.attempts < max {
                        warn!(attempt = status.attempts, %message, "build not found after a controller restart: resubmitting");
                        let note = format!(
                            "controller restarted and attempt {} cannot be resumed: {message}; submitting the next attempt",
                            status.attempts
                        );
                        ctx.cancel(&id.uid);
                        submit(job, ctx, id, &status, status.attempts + 1, Some(note)).await
                    } else {
                        let msg = format!(
                            "the controller restarted and attempt {} of {max} cannot be resumed: {message}",
                            status.attempts
                        );
                        fail(job, ctx, id, &status, "ControllerRestarted", msg, None).await
                    }
                }
                Outcome::Run(RunError::Unavailable { message, worker }) => {
                    let on = worker.map(|w| format!(" {w}")).unwrap_or_default();
                    if status.attempts < max {
                        warn!(attempt = status.attempts, %message, "worker lost: retrying");
                        let note = format!(
                            "attempt {} lost its worker{on}: {message}; retrying",
                            status.attempts
                        );
                        ctx.cancel(&id.uid);
                        submit(job, ctx, id, &status, status.attempts + 1, Some(note)).await
                    } else {
                        let msg = format!(
                            "worker{on} lost on attempt {} of {max}: {message}",
                            status.attempts
                        );
                        fail(job, ctx, id, &status, "WorkerLost", msg, None).await
                    }
                }
            }
        }
    }
}

/// Leaves the job where it is with a `Degraded` condition naming the missing input.
async fn inputs_missing(
    job: &BuildJob,
    ctx: &JobContext,
    id: &Ids,
    status: &BuildJobStatus,
    problem: Problem,
) -> Result<Action> {
    warn!(reason = problem.reason, message = %problem.message, "job inputs not ready");
    event(ctx, job, true, problem.reason, &problem.message);
    let mut next = status.clone();
    next.observed_generation = job.metadata.generation;
    next.conditions = conditions(
        job,
        status,
        (ctx.clock)(),
        (false, "Waiting", "the build has not started".into()),
        (false, problem.reason, problem.message.clone()),
        (true, problem.reason, problem.message),
    );
    write_status(job, ctx, id, &next).await?;
    Ok(Action::requeue(ctx.settings.recheck))
}

/// A `Running` job with no task in this process (the controller restarted): looks up the
/// build `status.buildRef` on the workers through the gateway rather than building again.
/// Its outcome is written like a build's; a build no worker knows, or one cancelled when
/// the earlier controller's session went away, leads to the next attempt.
async fn reattach(
    job: &BuildJob,
    ctx: &Arc<JobContext>,
    id: &Ids,
    status: &BuildJobStatus,
) -> Result<Action> {
    let Some(r) = status.build_ref.clone() else {
        return Ok(Action::requeue(ctx.settings.recheck));
    };
    let mut input = match resolve(job, ctx, id).await? {
        Ok(input) => input,
        Err(problem) => return inputs_missing(job, ctx, id, status, problem).await,
    };
    input.build_ref = r.clone();
    let timeout = match &job.spec.timeout {
        Some(spec) => {
            let limit = parse_duration(spec, "spec.timeout")?;
            let now = (ctx.clock)().unix_timestamp();
            let started = status
                .start_time
                .as_ref()
                .map(|t| t.0.as_second())
                .unwrap_or(now);
            let spent = now.saturating_sub(started).max(0) as u64;
            limit
                .checked_sub(Duration::from_secs(spent))
                .filter(|left| !left.is_zero())
                .map(|left| (left, spec.clone()))
                // Past its time: still look the build up, briefly; it may have finished.
                .or(Some((Duration::from_secs(30), spec.clone())))
        }
        None => None,
    };
    info!(build_ref = %r, attempt = status.attempts, "running job has no build in this process (controller restarted): looking the build up on the workers");
    event(
        ctx,
        job,
        false,
        "Reattaching",
        &format!(
            "controller restarted: looking up build {r} (attempt {}) on the workers",
            status.attempts
        ),
    );
    let keep = ctx.settings.log_tail;
    let mut tail = status.log_tail.clone();
    tail.push(format!(
        "[kiln] controller restarted: looking up build {r} of attempt {}",
        status.attempts
    ));
    if tail.len() > keep {
        tail.drain(..tail.len() - keep);
    }
    let run = Attempt {
        number: status.attempts,
        tail,
        delay: Duration::ZERO,
        timeout,
        attach: true,
        worker: status.worker.clone(),
    };
    spawn(ctx, job, id, input, run);
    Ok(Action::requeue(ctx.settings.recheck))
}

/// Resolves the inputs and starts attempt `attempt`; a missing input leaves the job where it
/// is with a `Degraded` condition saying what is missing.
async fn submit(
    job: &BuildJob,
    ctx: &Arc<JobContext>,
    id: &Ids,
    status: &BuildJobStatus,
    attempt: i32,
    note: Option<String>,
) -> Result<Action> {
    let now = (ctx.clock)();
    let mut input = match resolve(job, ctx, id).await? {
        Ok(input) => input,
        Err(problem) => return inputs_missing(job, ctx, id, status, problem).await,
    };
    input.build_ref = build_ref(&id.uid, attempt);
    let started = status
        .start_time
        .as_ref()
        .map(|t| t.0.as_second())
        .unwrap_or_else(|| now.unix_timestamp());
    let timeout = match &job.spec.timeout {
        Some(spec) => {
            let limit = parse_duration(spec, "spec.timeout")?;
            let spent = now.unix_timestamp().saturating_sub(started).max(0) as u64;
            match limit.checked_sub(Duration::from_secs(spent)) {
                Some(left) if !left.is_zero() => Some((left, spec.clone())),
                _ => {
                    let msg = format!("timed out after {spec}");
                    return fail(job, ctx, id, status, "TimedOut", msg, None).await;
                }
            }
        }
        None => None,
    };

    set_finalizer(job, ctx, id, true).await?;
    let mut tail: Vec<String> = if attempt > 1 {
        status.log_tail.clone()
    } else {
        Vec::new()
    };
    if let Some(n) = note {
        tail.push(format!("[kiln] {n}"));
    }
    let keep = ctx.settings.log_tail;
    if tail.len() > keep {
        tail.drain(..tail.len() - keep);
    }
    let max = ctx.settings.max_attempts;
    let pool = &job.spec.pool_ref.name;
    let next = BuildJobStatus {
        observed_generation: job.metadata.generation,
        phase: BuildPhase::Running,
        worker: None,
        start_time: unix_time(started),
        completion_time: None,
        image_digest: None,
        attempts: attempt,
        build_ref: Some(input.build_ref.clone()),
        conditions: conditions(
            job,
            status,
            now,
            (
                false,
                "Building",
                format!("attempt {attempt} of at most {max} is running"),
            ),
            (
                true,
                "Building",
                format!("attempt {attempt} submitted to the gateway of pool {pool}"),
            ),
            (false, "AsExpected", "no problems found".into()),
        ),
        log_tail: tail.clone(),
    };
    write_status(job, ctx, id, &next).await?;
    if attempt == 1 {
        event(
            ctx,
            job,
            false,
            "Started",
            &format!("submitted to the gateway of pool {pool}"),
        );
    } else {
        let why = next.log_tail.last().cloned().unwrap_or_default();
        event(
            ctx,
            job,
            true,
            "Retrying",
            &format!("attempt {attempt} of at most {max}: {why}"),
        );
    }
    let delay = if attempt > 1 {
        let doublings = u32::try_from(attempt - 2).unwrap_or(0).min(6);
        ctx.settings.retry_backoff * 2u32.pow(doublings)
    } else {
        Duration::ZERO
    };
    info!(attempt, addr = %input.addr, build_ref = %input.build_ref, ?delay, "submitting build");
    let run = Attempt {
        number: attempt,
        tail,
        delay,
        timeout,
        attach: false,
        worker: None,
    };
    spawn(ctx, job, id, input, run);
    Ok(Action::requeue(ctx.settings.recheck))
}

/// Starts the build task of a job: the runner (after `delay`, within `timeout`), and the
/// progress patches while it runs. When it ends, the outcome waits in the task for the
/// reconcile the trigger asks for.
fn spawn(ctx: &Arc<JobContext>, job: &BuildJob, id: &Ids, input: BuildInput, run: Attempt) {
    let Attempt {
        number: attempt,
        tail,
        delay,
        timeout,
        attach,
        worker,
    } = run;
    let masks = input
        .secrets
        .values()
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|s| std::iter::once(s.to_string()).chain(s.lines().map(str::to_string)))
        .map(|s| s.trim().to_string())
        .filter(|s| s.len() >= 4)
        .collect::<Vec<_>>();
    let live = Arc::new(Mutex::new(Live {
        tail: tail.into(),
        worker,
        ..Live::default()
    }));
    let reporter = Reporter {
        live: live.clone(),
        masks: Arc::new(masks),
        keep: ctx.settings.log_tail,
    };
    let runner = ctx.runner.clone();
    let build = async move {
        tokio::time::sleep(delay).await;
        let run = if attach {
            runner.attach(input, reporter)
        } else {
            runner.run(input, reporter)
        };
        match timeout {
            Some((left, spec)) => match tokio::time::timeout(left, run).await {
                Ok(r) => r.map_or_else(Outcome::Run, Outcome::Built),
                Err(_) => Outcome::TimedOut(spec),
            },
            None => run.await.map_or_else(Outcome::Run, Outcome::Built),
        }
    };
    let api = Api::<BuildJob>::namespaced(ctx.client.clone(), &id.ns);
    let name = id.name.clone();
    let trigger = ctx.trigger.clone();
    let obj = ObjectRef::from_obj(job);
    let interval = ctx.settings.progress_interval;
    let keep = ctx.settings.log_tail;
    let task_live = live.clone();
    let span = tracing::info_span!("build", job = %id.name, namespace = %id.ns);
    let handle = tokio::spawn(
        async move {
            let mut run = AbortOnDrop(tokio::spawn(build));
            let first = tokio::time::Instant::now() + interval;
            let mut tick = tokio::time::interval_at(first, interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let outcome = loop {
                tokio::select! {
                    r = &mut run.0 => break r.unwrap_or_else(|e| Outcome::Run(RunError::Failed {
                        message: format!("the build task ended abnormally: {e}"),
                        worker: None,
                    })),
                    _ = tick.tick() => flush(&api, &name, &task_live).await,
                }
            };
            let summary = match &outcome {
                Outcome::Built(b) => {
                    info!(digest = ?b.image_digest, "build finished");
                    "succeeded"
                }
                Outcome::Run(e) => {
                    warn!(error = %e, "build failed");
                    "failed"
                }
                Outcome::TimedOut(t) => {
                    warn!(timeout = %t, "build timed out");
                    "timed out"
                }
            };
            {
                let mut l = lock(&task_live);
                l.push(format!("[kiln] attempt {attempt} {summary}"), keep);
                l.outcome = Some(outcome);
            }
            // This status change brings the job's reconcile, which writes the outcome.
            flush(&api, &name, &task_live).await;
            let _ = trigger.send(obj);
        }
        .instrument(span),
    );
    // Replacing a previous attempt's task drops (and aborts) it.
    lock(&ctx.tasks).insert(
        id.uid.clone(),
        Task {
            live,
            handle,
            attempt,
        },
    );
}

/// One submission of a job's build.
struct Attempt {
    /// 1 for the first.
    number: i32,
    /// The log tail it starts with.
    tail: Vec<String>,
    /// Wait before submitting (retry backoff).
    delay: Duration,
    /// Time left before the job's timeout, and the timeout as the spec wrote it.
    timeout: Option<(Duration, String)>,
    /// Look up the build an earlier controller process submitted instead of submitting one.
    attach: bool,
    /// The worker already recorded (kept by progress patches until the build names one).
    worker: Option<String>,
}

struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Patches the log tail and worker into the status when they changed since the last patch.
async fn flush(api: &Api<BuildJob>, name: &str, live: &Mutex<Live>) {
    let body = {
        let mut l = lock(live);
        if !l.dirty {
            return;
        }
        l.dirty = false;
        json!({"status": {"logTail": l.tail.iter().collect::<Vec<_>>(), "worker": l.worker}})
    };
    if let Err(error) = api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&body))
        .await
    {
        // Progress is best effort; the outcome is written by the reconcile.
        warn!(%error, "cannot patch build progress");
    }
}

async fn succeed(
    job: &BuildJob,
    ctx: &JobContext,
    id: &Ids,
    mut status: BuildJobStatus,
    built: Built,
) -> Result<Action> {
    let now = (ctx.clock)();
    if built.worker.is_some() {
        status.worker = built.worker;
    }
    let on = status
        .worker
        .as_ref()
        .map(|w| format!(" on worker {w}"))
        .unwrap_or_default();
    let message = match &built.image_digest {
        Some(d) => format!("built {d}{on} in {} attempt(s)", status.attempts),
        None => format!("build finished{on} (no image output)"),
    };
    status.phase = BuildPhase::Succeeded;
    status.image_digest = built.image_digest;
    status.completion_time = unix_time(now.unix_timestamp());
    status.observed_generation = job.metadata.generation;
    status.conditions = conditions(
        job,
        &status,
        now,
        (true, "Succeeded", message.clone()),
        (false, "Finished", "the build finished".into()),
        (false, "AsExpected", "no problems found".into()),
    );
    write_status(job, ctx, id, &status).await?;
    if let Some(m) = crate::metrics::global() {
        m.job_finished("succeeded");
    }
    event(ctx, job, false, "Succeeded", &message);
    lock(&ctx.done).insert(id.uid.clone());
    ctx.cancel(&id.uid);
    let mut done = job.clone();
    done.status = Some(status.clone());
    finished(&done, ctx, id, &status).await
}

async fn fail(
    job: &BuildJob,
    ctx: &JobContext,
    id: &Ids,
    status: &BuildJobStatus,
    reason: &str,
    message: String,
    worker: Option<String>,
) -> Result<Action> {
    let now = (ctx.clock)();
    let mut status = status.clone();
    if worker.is_some() {
        status.worker = worker;
    }
    status.phase = BuildPhase::Failed;
    status.completion_time = unix_time(now.unix_timestamp());
    status.observed_generation = job.metadata.generation;
    status.conditions = conditions(
        job,
        &status,
        now,
        (false, reason, message.clone()),
        (false, "Finished", "the build finished".into()),
        (true, reason, message.clone()),
    );
    write_status(job, ctx, id, &status).await?;
    if let Some(m) = crate::metrics::global() {
        m.job_finished("failed");
    }
    event(ctx, job, true, reason, &message);
    lock(&ctx.done).insert(id.uid.clone());
    ctx.cancel(&id.uid);
    let mut done = job.clone();
    done.status = Some(status.clone());
    finished(&done, ctx, id, &status).await
}

/// Publishes a Kubernetes Event about `job` (`kubectl describe buildjob` shows them) in the
/// background: a failure to publish is logged and never fails or delays the reconcile.
fn event(ctx: &JobContext, job: &BuildJob, warning: bool, reason: &str, note: &str) {
    use kube::runtime::events::{Event, EventType};
    use kube::Resource as _;
    let mut note = note.to_string();
    if note.len() > 1000 {
        let mut cut = 1000;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
    }
    let ev = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.to_string(),
        note: Some(note),
        action: "Build".into(),
        secondary: None,
    };
    let reference = job.object_ref(&());
    let recorder = ctx.recorder.clone();
    tokio::spawn(async move {
        if let Err(error) = recorder.publish(&ev, &reference).await {
            warn!(%error, reason = %ev.reason, "cannot publish an event");
        }
    });
}

/// One condition's wanted state: on, reason, message.
type Want<'a> = (bool, &'a str, String);

fn conditions(
    job: &BuildJob,
    previous: &BuildJobStatus,
    now: time::OffsetDateTime,
    ready: Want<'_>,
    progressing: Want<'_>,
    degraded: Want<'_>,
) -> Vec<Condition> {
    let g = job.metadata.generation;
    let prev = previous.conditions.as_slice();
    vec![
        condition(prev, CONDITION_READY, ready.0, ready.1, ready.2, g, now),
        condition(
            prev,
            CONDITION_PROGRESSING,
            progressing.0,
            progressing.1,
            progressing.2,
            g,
            now,
        ),
        condition(
            prev,
            CONDITION_DEGRADED,
            degraded.0,
            degraded.1,
            degraded.2,
            g,
            now,
        ),
    ]
}

/// Merge-patches the status unless it already is `status`. Absent optional fields are sent
/// as `null` so that a retry clears what the previous attempt wrote.
async fn write_status(
    job: &BuildJob,
    ctx: &JobContext,
    id: &Ids,
    status: &BuildJobStatus,
) -> Result<()> {
    if job.status.as_ref() == Some(status) {
        return Ok(());
    }
    let mut value = serde_json::to_value(status).map_err(|e| Error::Yaml {
        what: "BuildJob status".into(),
        reason: e.to_string(),
    })?;
    if let Value::Object(m) = &mut value {
        for key in [
            "worker",
            "startTime",
            "completionTime",
            "imageDigest",
            "buildRef",
        ] {
            m.entry(key).or_insert(Value::Null);
        }
        for key in ["logTail", "conditions"] {
            m.entry(key).or_insert(json!([]));
        }
    }
    let api = Api::<BuildJob>::namespaced(ctx.client.clone(), &id.ns);
    api.patch_status(
        &id.name,
        &PatchParams::default(),
        &Patch::Merge(&json!({ "status": value })),
    )
    .await
    .map_err(|source| Error::Kube {
        action: format!("patch status of BuildJob {}/{}", id.ns, id.name),
        source,
    })?;
    Ok(())
}

/// Adds (`on`) or removes the [`FINALIZER`], with the resource version as a precondition.
async fn set_finalizer(job: &BuildJob, ctx: &JobContext, id: &Ids, on: bool) -> Result<()> {
    let current = job.finalizers();
    let has = current.iter().any(|f| f == FINALIZER);
    if has == on {
        return Ok(());
    }
    let mut list: Vec<String> = current
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    if on {
        list.push(FINALIZER.to_string());
    }
    let body = json!({"metadata": {"finalizers": list, "resourceVersion": job.resource_version()}});
    let api = Api::<BuildJob>::namespaced(ctx.client.clone(), &id.ns);
    match api
        .patch(&id.name, &PatchParams::default(), &Patch::Merge(&body))
        .await
    {
        Ok(_) => Ok(()),
        // Already gone: nothing holds it any more.
        Err(kube::Error::Api(e)) if e.code == 404 && !on => Ok(()),
        Err(source) => Err(Error::Kube {
            action: format!(
                "{} finalizer of BuildJob {}/{}",
                if on { "add" } else { "remove" },
                id.ns,
                id.name
            ),
            source,
        }),
    }
}

// === inputs ===

/// An input the build cannot start without, and what to tell the user.
struct Problem {
    reason: &'static str,
    message: String,
}

fn problem(reason: &'static str, message: String) -> Problem {
    Problem { reason, message }
}

async fn get<K>(api: &Api<K>, what: &str, ns: &str, name: &str) -> Result<Option<K>>
where
    K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    api.get_opt(name).await.map_err(|source| Error::Kube {
        action: format!("get {what} {ns}/{name}"),
        source,
    })
}

fn secret_bytes(s: &Secret, key: &str) -> Option<Vec<u8>> {
    s.data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.clone())
        .or_else(|| {
            s.string_data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(|v| v.as_bytes().to_vec())
        })
}

/// Whether a ConfigMap key can be a file name of the context: no path separator, not `.`
/// or `..`, not empty.
pub fn valid_file_name(key: &str) -> bool {
    !key.is_empty() && key != "." && key != ".." && !key.contains('/') && !key.contains('\0')
}

/// BuildKit's remote context form for a git source: `URL#REF:SUBDIR`.
pub fn git_context(url: &str, git_ref: Option<&str>, subdir: Option<&str>) -> String {
    let r = git_ref.unwrap_or_default();
    let sub = subdir.map(|s| s.trim_matches('/')).unwrap_or_default();
    match (r.is_empty(), sub.is_empty()) {
        (true, true) => url.to_string(),
        (_, true) => format!("{url}#{r}"),
        _ => format!("{url}#{r}:{sub}"),
    }
}

async fn resolve(
    job: &BuildJob,
    ctx: &JobContext,
    id: &Ids,
) -> Result<std::result::Result<BuildInput, Problem>> {
    let ns = id.ns.as_str();
    let client = ctx.client.clone();
    let spec = &job.spec;

    // The pool, its gateway and the controller's client certificate.
    let pool_name = &spec.pool_ref.name;
    let pools = Api::<BuildWorkerPool>::namespaced(client.clone(), ns);
    let Some(pool) = get(&pools, "BuildWorkerPool", ns, pool_name).await? else {
        return Ok(Err(problem(
            "PoolNotFound",
            format!("BuildWorkerPool {ns}/{pool_name} not found"),
        )));
    };
    let host = format!("{}.{ns}.svc", render::gateway_name(pool_name));
    let addr = format!("tcp://{host}:{}", pool.spec.gateway.port);
    let secrets = Api::<Secret>::namespaced(client.clone(), ns);
    let tls_secret = render::controller_identity_secret(&pool);
    let Some(tls_s) = get(&secrets, "Secret", ns, &tls_secret).await? else {
        return Ok(Err(problem(
            "CertificateNotReady",
            format!("client certificate Secret {ns}/{tls_secret} of pool {pool_name} not found (the pool reconcile issues it)"),
        )));
    };
    let Ok(tls::IdentityPems {
        ca: ca_pem,
        cert: cert_pem,
        key: key_pem,
    }) = tls::identity_pems(&tls_s)
    else {
        return Ok(Err(problem(
            "CertificateNotReady",
            format!("Secret {ns}/{tls_secret} lacks ca.crt, tls.crt or tls.key"),
        )));
    };

    // Frontend attributes.
    let mut attrs = BTreeMap::new();
    attrs.insert("filename".to_string(), spec.dockerfile.clone());
    attrs.insert(
        ROUTE_KEY_ATTR.to_string(),
        format!("buildjob/{ns}/{}", id.name),
    );
    if let Some(t) = &spec.target {
        attrs.insert("target".into(), t.clone());
    }
    for (k, v) in &spec.build_args {
        attrs.insert(format!("build-arg:{k}"), v.clone());
    }
    if !spec.platforms.is_empty() {
        let p: Vec<&str> = spec.platforms.iter().map(|p| p.0.as_str()).collect();
        attrs.insert("platform".into(), p.join(","));
    }

    // The context.
    let mut context_files = None;
    if let Some(cm) = &spec.source.config_map {
        let maps = Api::<ConfigMap>::namespaced(client.clone(), ns);
        let Some(map) = get(&maps, "ConfigMap", ns, &cm.name).await? else {
            return Ok(Err(problem(
                "SourceNotFound",
                format!("ConfigMap {ns}/{} not found", cm.name),
            )));
        };
        let mut files = BTreeMap::new();
        for (k, v) in map.data.iter().flatten() {
            files.insert(k.clone(), v.as_bytes().to_vec());
        }
        for (k, v) in map.binary_data.iter().flatten() {
            files.insert(k.clone(), v.0.clone());
        }
        if let Some(bad) = files.keys().find(|k| !valid_file_name(k)) {
            return Ok(Err(problem(
                "InvalidSource",
                format!(
                    "ConfigMap {ns}/{} key {bad:?} is not a plain file name (no '/', '.' or '..')",
                    cm.name
                ),
            )));
        }
        if !files.contains_key(&spec.dockerfile) {
            return Ok(Err(problem(
                "InvalidSource",
                format!(
                    "ConfigMap {ns}/{} has no key {:?} (spec.dockerfile)",
                    cm.name, spec.dockerfile
                ),
            )));
        }
        context_files = Some(files);
    } else if let Some(git) = &spec.source.git {
        attrs.insert(
            "context".into(),
            git_context(&git.url, git.git_ref.as_deref(), git.subdir.as_deref()),
        );
    } else if let Some(http) = &spec.source.http {
        attrs.insert("context".into(), http.url.clone());
    } else {
        return Ok(Err(problem(
            "InvalidSource",
            "spec.source sets none of git, http, configMap".into(),
        )));
    }

    // Build secrets: values are only ever held in memory and served over the session.
    let mut build_secrets = BTreeMap::new();
    let mut read: HashMap<String, Secret> = HashMap::new();
    for s in &spec.secrets {
        if !read.contains_key(&s.secret_name) {
            let Some(found) = get(&secrets, "Secret", ns, &s.secret_name).await? else {
                return Ok(Err(problem(
                    "SecretNotFound",
                    format!(
                        "Secret {ns}/{} (build secret {:?}) not found",
                        s.secret_name, s.id
                    ),
                )));
            };
            read.insert(s.secret_name.clone(), found);
        }
        let key = s.key.clone().unwrap_or_else(|| s.id.clone());
        let Some(value) = read.get(&s.secret_name).and_then(|x| secret_bytes(x, &key)) else {
            return Ok(Err(problem(
                "SecretNotFound",
                format!(
                    "Secret {ns}/{} has no key {key:?} (build secret {:?})",
                    s.secret_name, s.id
                ),
            )));
        };
        build_secrets.insert(s.id.clone(), value);
    }

    // Registry credentials of the pool.
    let mut docker_config = None;
    if let Some(creds) = pool
        .spec
        .cache
        .as_ref()
        .and_then(|c| c.credentials_secret.as_ref())
    {
        let Some(found) = get(&secrets, "Secret", ns, creds).await? else {
            return Ok(Err(problem(
                "SecretNotFound",
                format!("registry credentials Secret {ns}/{creds} of pool {pool_name} not found"),
            )));
        };
        let Some(cfg) = secret_bytes(&found, DOCKER_CONFIG_KEY) else {
            return Ok(Err(problem(
                "SecretNotFound",
                format!("registry credentials Secret {ns}/{creds} has no {DOCKER_CONFIG_KEY} key"),
            )));
        };
        docker_config = Some(cfg);
    }

    Ok(Ok(BuildInput {
        job: format!("{ns}/{}", id.name),
        uid: id.uid.clone(),
        build_ref: String::new(),
        addr,
        tls: ClientIdentity {
            ca_pem,
            cert_pem,
            key_pem,
            server_name: host,
        },
        frontend_attrs: attrs,
        context_files,
        secrets: build_secrets,
        docker_config,
        images: spec
            .outputs
            .iter()
            .map(|o| (o.name.clone(), o.push))
            .collect(),
        cache_imports: spec
            .cache_import
            .iter()
            .map(|c| c.reference.clone())
            .collect(),
        cache_exports: spec
            .cache_export
            .iter()
            .map(|c| (c.reference.clone(), c.mode))
            .collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_contexts_use_buildkit_form() {
        assert_eq!(
            git_context("https://h/r.git", None, None),
            "https://h/r.git"
        );
        assert_eq!(
            git_context("https://h/r.git", Some("v1"), None),
            "https://h/r.git#v1"
        );
        assert_eq!(
            git_context("https://h/r.git", Some("main"), Some("/app/")),
            "https://h/r.git#main:app"
        );
        assert_eq!(
            git_context("https://h/r.git", None, Some("app")),
            "https://h/r.git#:app"
        );
    }

    #[test]
    fn file_names_stay_in_the_context() {
        for ok in ["Dockerfile", "a.txt", "..a", ".env"] {
            assert!(valid_file_name(ok), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "../x", "/etc"] {
            assert!(!valid_file_name(bad), "{bad}");
        }
    }
}
