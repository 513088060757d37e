//! The custom resources of group `kiln.dev/v1alpha1`: `BuildWorkerPool` (a fleet of workers
//! with its gateway, storage, GC policy and TLS) and `BuildJob` (one declared build).
//!
//! Plain data with serde and schemars derives and no client calls: the reconcilers, the
//! renderers and `crdgen` use these types; nothing here talks to an API server.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every Kiln resource.
pub const GROUP: &str = "kiln.dev";
/// API version of every Kiln resource.
pub const VERSION: &str = "v1alpha1";

/// Schema pattern of a size as BuildKit's GC settings accept it: bytes, a binary unit
/// (`512Mi`, `10GB`, `1.5GiB`) or a percentage of the disk (`80%`).
pub const SIZE_PATTERN: &str =
    r"^([0-9]+(\.[0-9]+)? ?([kKmMgGtTpPeE][iI]?)?[bB]?|[0-9]+(\.[0-9]+)?%)$";
/// Schema pattern of a duration: one or more `<number><unit>` with units ns, us, ms, s, m, h,
/// d or w (`48h`, `1h30m`, `7d`).
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h|d|w))+$";
/// Schema pattern of the gateway's load bound: a decimal number such as `1.25`.
pub const LOAD_BOUND_PATTERN: &str = r"^[0-9]+(\.[0-9]+)?$";
/// Schema pattern of a Kubernetes resource quantity used for PVC sizes (`50Gi`, `100G`).
pub const QUANTITY_PATTERN: &str = r"^[0-9]+(\.[0-9]+)?([KMGTPE]i?|[mkE])?$";

// === BuildWorkerPool ===

/// Desired state of a pool of Kiln workers and the gateway in front of them.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kiln.dev",
    version = "v1alpha1",
    kind = "BuildWorkerPool",
    plural = "buildworkerpools",
    shortname = "bwp",
    category = "kiln",
    namespaced,
    status = "BuildWorkerPoolStatus",
    derive = "PartialEq",
    doc = "A pool of Kiln build workers (a StatefulSet) with its gateway, storage, GC policy and TLS",
    validation = Rule::new("size(self.metadata.name) <= 40").message("a BuildWorkerPool name has at most 40 characters (names of what it owns derive from it)"),
    printcolumn = r#"{"name":"Desired","type":"integer","jsonPath":".spec.replicas"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Runtime","type":"string","jsonPath":".spec.runtime"}"#,
    printcolumn = r#"{"name":"Cert-Expiry","type":"date","jsonPath":".status.certificateNotAfter","priority":1}"#,
    printcolumn = r#"{"name":"Status","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BuildWorkerPoolSpec {
    /// Number of workers (StatefulSet replicas).
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,
    /// Worker container image.
    #[serde(default = "default_worker_image")]
    #[schemars(length(min = 1))]
    pub image: String,
    /// Image pull policy of the worker and gateway containers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// CPU and memory requests and limits of each worker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Persistent storage of each worker's cache and state (one PVC per worker).
    #[serde(default)]
    pub storage: StorageSpec,
    /// OCI runtime the worker runs build steps with.
    #[serde(default)]
    pub runtime: OciRuntime,
    /// Run the worker without privileges (user namespaces); otherwise it runs privileged as runc needs.
    #[serde(default)]
    pub rootless: bool,
    /// Most build steps one worker runs at once; unset lets the worker decide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub max_parallelism: Option<i32>,
    /// Registry the workers share their build cache through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheSpec>,
    /// Garbage collection policy of each worker's local cache.
    #[serde(default)]
    pub gc: GcPolicy,
    /// Certificates for mTLS between clients, the gateway and the workers.
    #[serde(default)]
    pub tls: TlsSpec,
    /// The gateway Deployment and Service in front of the workers.
    #[serde(default)]
    pub gateway: GatewaySpec,
    /// Scale the workers between bounds on the gateway's load; `replicas` is then only the
    /// starting point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
}

/// How the controller scales a pool's workers: up when builds queue or the mean number of
/// builds per worker reaches the target; down by one, after draining the highest-ordinal
/// worker, once the pool has been idle for the delay.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("autoscaling.minReplicas must not exceed maxReplicas"))]
pub struct AutoscalingSpec {
    /// Fewest workers.
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub min_replicas: i32,
    /// Most workers.
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Builds per worker (mean) at which one more worker is added (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub target_inflight_per_worker: Option<i32>,
    /// How long the pool must have been idle before a worker is drained and removed
    /// (duration, default `5m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub scale_down_delay: Option<String>,
}

fn default_min_replicas() -> i32 {
    1
}

/// The autoscaler's state, kept in the pool's status between reconciles.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingStatus {
    /// Workers the autoscaler wants (the StatefulSet's replicas).
    pub desired_replicas: i32,
    /// Since when the pool has been idle enough to lose a worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_since: Option<Time>,
    /// The worker being drained before it is removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draining: Option<String>,
}

/// One worker as the pool's gateways see it.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerUsage {
    /// The worker (pod) name.
    pub name: String,
    /// Builds running on it, summed over the gateways.
    pub inflight: i64,
    /// Builds waiting for it, summed over the gateways.
    pub queued: i64,
    /// Whether a gateway is draining it.
    #[serde(default)]
    pub draining: bool,
    /// Bytes its build cache holds (`DiskUsage` through the gateway), when read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_bytes: Option<i64>,
}

fn default_replicas() -> i32 {
    3
}

fn default_worker_image() -> String {
    format!(
        "ghcr.io/kiln-build/kiln-worker:{}",
        env!("CARGO_PKG_VERSION")
    )
}

fn default_gateway_image() -> String {
    format!(
        "ghcr.io/kiln-build/kiln-gateway:{}",
        env!("CARGO_PKG_VERSION")
    )
}

/// When the kubelet pulls an image (Kubernetes `imagePullPolicy`).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    /// Pull on every start.
    Always,
    /// Pull when not present on the node.
    IfNotPresent,
    /// Never pull.
    Never,
}

impl PullPolicy {
    /// The value Kubernetes expects in `imagePullPolicy`.
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// Storage of one worker. Fixed once the pool exists: a StatefulSet's volume claim
/// templates cannot change.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf").message("spec.storage cannot change once the pool exists (StatefulSet volume claim templates are immutable); create a new pool"))]
pub struct StorageSpec {
    /// Size of each worker's PersistentVolumeClaim (a Kubernetes quantity such as `50Gi`).
    #[serde(default = "default_storage_size")]
    #[schemars(pattern(QUANTITY_PATTERN))]
    pub size: String,
    /// StorageClass of the claims; unset uses the cluster default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

fn default_storage_size() -> String {
    "50Gi".to_string()
}

impl Default for StorageSpec {
    fn default() -> Self {
        StorageSpec {
            size: default_storage_size(),
            storage_class_name: None,
        }
    }
}

/// OCI runtime binary used by the worker.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OciRuntime {
    /// runc (the default).
    #[default]
    Runc,
    /// crun.
    Crun,
}

impl OciRuntime {
    /// The runtime's binary name, as the worker's `--oci-runtime` flag takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            OciRuntime::Runc => "runc",
            OciRuntime::Crun => "crun",
        }
    }
}

/// The registry a pool shares its build cache through.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CacheSpec {
    /// Image reference the cache is stored under, e.g. `registry.example.com/team/kiln-cache`.
    #[schemars(length(min = 1))]
    pub registry: String,
    /// Name of a `kubernetes.io/dockerconfigjson` Secret with credentials for the registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
}

/// Garbage collection of a worker's local cache, in BuildKit's terms.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GcPolicy {
    /// Turn automatic GC off (it is on by default).
    #[serde(default)]
    pub disabled: bool,
    /// Space GC never frees below (bytes, units or a percentage of the disk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(SIZE_PATTERN))]
    pub reserved_space: Option<String>,
    /// Most space the cache may use before GC runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(SIZE_PATTERN))]
    pub max_used_space: Option<String>,
    /// Free disk space GC tries to keep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(SIZE_PATTERN))]
    pub min_free_space: Option<String>,
    /// Records unused for longer than this are removed (`48h`, `7d`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub keep_duration: Option<String>,
    /// Per-filter rules, applied in order before the global limits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<GcRule>,
}

/// One GC rule: records matching `filters` (or all records) are pruned by these limits.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GcRule {
    /// Match every record, including ones in use by internal references.
    #[serde(default)]
    pub all: bool,
    /// BuildKit prune filters, e.g. `type==source.local` or `type==exec.cachemount`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<String>,
    /// Matching records unused for longer than this are removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub keep_duration: Option<String>,
    /// Space this rule never frees below.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(SIZE_PATTERN))]
    pub reserved_space: Option<String>,
    /// Most space matching records may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(SIZE_PATTERN))]
    pub max_used_space: Option<String>,
    /// Free disk space this rule tries to keep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(SIZE_PATTERN))]
    pub min_free_space: Option<String>,
}

/// Where the pool's certificates come from.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum TlsMode {
    /// The controller issues a CA and all certificates and rotates them.
    #[default]
    SelfSigned,
    /// Certificates come from an existing Secret (`ca.crt`, `tls.crt`, `tls.key`).
    ExistingSecret,
}

/// mTLS settings of a pool.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.mode != 'existingSecret' || has(self.secretName)").message("tls.secretName is required when tls.mode is existingSecret"))]
pub struct TlsSpec {
    /// Who issues the certificates.
    #[serde(default)]
    pub mode: TlsMode,
    /// Secret holding `ca.crt`, `tls.crt` and `tls.key` (required for `existingSecret`). Its
    /// certificate serves workers and gateway and is the gateway's client certificate towards
    /// the workers, so it needs both serverAuth and clientAuth usages and all the names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// Validity of the certificates the controller issues.
    #[serde(default = "default_cert_lifetime")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub lifetime: String,
    /// Certificates are reissued when they expire within this duration.
    #[serde(default = "default_renew_before")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub renew_before: String,
}

fn default_cert_lifetime() -> String {
    "90d".to_string()
}

fn default_renew_before() -> String {
    "30d".to_string()
}

impl Default for TlsSpec {
    fn default() -> Self {
        TlsSpec {
            mode: TlsMode::default(),
            secret_name: None,
            lifetime: default_cert_lifetime(),
            renew_before: default_renew_before(),
        }
    }
}

/// Type of the gateway's Service.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ServiceType {
    /// Reachable inside the cluster only.
    #[default]
    ClusterIP,
    /// Also on a port of every node.
    NodePort,
    /// Through a cloud load balancer.
    LoadBalancer,
}

impl ServiceType {
    /// The value Kubernetes expects in a Service's `type`.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// The gateway in front of a pool.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    /// Number of gateway replicas.
    #[serde(default = "default_gateway_replicas")]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: i32,
    /// Gateway container image.
    #[serde(default = "default_gateway_image")]
    #[schemars(length(min = 1))]
    pub image: String,
    /// Type of the gateway Service.
    #[serde(default)]
    pub service_type: ServiceType,
    /// Port the gateway Service exposes (the BuildKit Control API over mTLS).
    #[serde(default = "default_gateway_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Bound on a worker's load relative to the mean for consistent hashing (`c`, above 1).
    #[serde(default = "default_load_bound")]
    #[schemars(pattern(LOAD_BOUND_PATTERN))]
    pub load_bound: String,
    /// Threads of each gateway's proxy (`kiln-gateway --threads`): unset runs it on one
    /// thread (scale out with replicas); 0 = one per core the container may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 256))]
    pub threads: Option<i32>,
    /// CPU and memory requests and limits of each gateway container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

fn default_gateway_replicas() -> i32 {
    2
}

fn default_gateway_port() -> i32 {
    1234
}

fn default_load_bound() -> String {
    "1.25".to_string()
}

impl Default for GatewaySpec {
    fn default() -> Self {
        GatewaySpec {
            replicas: default_gateway_replicas(),
            image: default_gateway_image(),
            service_type: ServiceType::default(),
            port: default_gateway_port(),
            load_bound: default_load_bound(),
            threads: None,
            resources: None,
        }
    }
}

/// Observed state of a pool.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BuildWorkerPoolStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Workers the StatefulSet currently has.
    #[serde(default)]
    pub replicas: i32,
    /// Workers that are ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Gateway replicas that are ready.
    #[serde(default)]
    pub gateway_ready_replicas: i32,
    /// When the pool's server certificate expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_not_after: Option<Time>,
    /// The autoscaler's state (with `spec.autoscaling`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingStatus>,
    /// Per worker: its cache's size (`DiskUsage` through the gateway) and, with
    /// `spec.autoscaling`, its load as the gateways last reported it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workers: Vec<WorkerUsage>,
    /// `Ready`, `Progressing` and `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

// === BuildJob ===

/// Desired state of one build: its source, Dockerfile, options and outputs.
#[derive(CustomResource, Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[kube(
    group = "kiln.dev",
    version = "v1alpha1",
    kind = "BuildJob",
    plural = "buildjobs",
    shortname = "bj",
    category = "kiln",
    namespaced,
    status = "BuildJobStatus",
    derive = "PartialEq",
    doc = "One image build run by a BuildWorkerPool",
    printcolumn = r#"{"name":"Pool","type":"string","jsonPath":".spec.poolRef.name"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Worker","type":"string","jsonPath":".status.worker"}"#,
    printcolumn = r#"{"name":"Digest","type":"string","jsonPath":".status.imageDigest","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BuildJobSpec {
    /// The pool (in the job's namespace) that runs the build.
    pub pool_ref: PoolRef,
    /// Where the build context comes from.
    pub source: BuildSource,
    /// Path of the Dockerfile inside the context.
    #[serde(default = "default_dockerfile")]
    #[schemars(length(min = 1))]
    pub dockerfile: String,
    /// Stage to build; unset builds the last stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// `ARG` values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub build_args: BTreeMap<String, String>,
    /// Build secrets (`RUN --mount=type=secret,id=…`) taken from Kubernetes Secrets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<BuildSecret>,
    /// Target platforms, e.g. `linux/amd64`; unset builds for the worker's platform.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<Platform>,
    /// Images the result is exported as.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<ImageOutput>,
    /// Registry caches to import from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cache_import: Vec<CacheImport>,
    /// Registry caches to export to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cache_export: Vec<CacheExport>,
    /// The build fails when it runs longer than this (`30m`, `2h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub timeout: Option<String>,
    /// The finished job is deleted this many seconds after it completes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i32>,
}

fn default_dockerfile() -> String {
    "Dockerfile".to_string()
}

/// A platform string `os/arch[/variant]`.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(transparent)]
pub struct Platform(#[schemars(pattern(r"^[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?$"))] pub String);

/// A reference to a `BuildWorkerPool` in the same namespace.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
pub struct PoolRef {
    /// The pool's name.
    #[schemars(length(min = 1))]
    pub name: String,
}

/// Exactly one of git, http or configMap.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.git), has(self.http), has(self.configMap)].filter(x, x).size() == 1").message("set exactly one of source.git, source.http, source.configMap"))]
pub struct BuildSource {
    /// A git repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git: Option<GitSource>,
    /// A tarball over HTTP(S).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSource>,
    /// A ConfigMap whose keys are the context's files (for tiny contexts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<ConfigMapSource>,
}

/// A build context from git.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GitSource {
    /// Repository URL (`https://…`, `ssh://…` or `git@host:path`).
    #[schemars(length(min = 1))]
    pub url: String,
    /// Branch, tag or commit; unset uses the default branch.
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<String>,
    /// Directory inside the repository used as the context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subdir: Option<String>,
}

/// A build context from an HTTP(S) tarball.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
pub struct HttpSource {
    /// Tarball URL.
    #[schemars(pattern(r"^https?://.+"))]
    pub url: String,
}

/// A build context from a ConfigMap.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
pub struct ConfigMapSource {
    /// ConfigMap name, in the job's namespace.
    #[schemars(length(min = 1))]
    pub name: String,
}

/// A build secret taken from a key of a Kubernetes Secret.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BuildSecret {
    /// Secret id the Dockerfile mounts.
    #[schemars(length(min = 1))]
    pub id: String,
    /// Kubernetes Secret name, in the job's namespace.
    #[schemars(length(min = 1))]
    pub secret_name: String,
    /// Key inside the Secret; unset uses the id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// An image output.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
pub struct ImageOutput {
    /// Image name with tag, e.g. `registry.example.com/team/app:1.2`.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Push the image to its registry.
    #[serde(default = "default_true")]
    pub push: bool,
}

fn default_true() -> bool {
    true
}

/// A registry cache to import.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
pub struct CacheImport {
    /// Cache image reference.
    #[serde(rename = "ref")]
    #[schemars(length(min = 1))]
    pub reference: String,
}

/// How much of the build a cache export holds.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// Only the layers of the result.
    #[default]
    Min,
    /// Every intermediate step.
    Max,
}

/// A registry cache to export.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
pub struct CacheExport {
    /// Cache image reference.
    #[serde(rename = "ref")]
    #[schemars(length(min = 1))]
    pub reference: String,
    /// `min` or `max`.
    #[serde(default)]
    pub mode: CacheMode,
}

/// Where a build is in its life.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BuildPhase {
    /// Accepted, not yet sent to a worker.
    #[default]
    Pending,
    /// Running on a worker.
    Running,
    /// Finished; the image digest is in the status.
    Succeeded,
    /// Finished with an error; see the conditions and the log tail.
    Failed,
}

/// Observed state of a build.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BuildJobStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pending, Running, Succeeded or Failed.
    #[serde(default)]
    pub phase: BuildPhase,
    /// The worker the build runs or ran on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// When the build started on a worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the build finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Digest of the built image (`sha256:…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
    /// How many times the build was submitted (retries after a lost worker count).
    #[serde(default)]
    pub attempts: i32,
    /// The ref of the current attempt's build (`kiln-<uid>-<attempt>`), written before the
    /// build is submitted so a restarted controller can find it on the workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_ref: Option<String>,
    /// `Ready`, `Progressing` and `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The last lines of the build log.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log_tail: Vec<String>,
}

// === conditions ===

/// Condition type: the resource is fully working.
pub const CONDITION_READY: &str = "Ready";
/// Condition type: the controller is moving the resource towards its spec.
pub const CONDITION_PROGRESSING: &str = "Progressing";
/// Condition type: something is wrong; the message says what.
pub const CONDITION_DEGRADED: &str = "Degraded";

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn pool_defaults_fill_an_empty_spec() {
        let spec: BuildWorkerPoolSpec = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(spec.replicas, 3);
        assert_eq!(spec.runtime, OciRuntime::Runc);
        assert_eq!(spec.gateway.load_bound, "1.25");
        assert_eq!(spec.gateway.port, 1234);
        assert_eq!(spec.tls.mode, TlsMode::SelfSigned);
        assert_eq!(spec.storage.size, "50Gi");
        assert!(!spec.rootless);
    }

    #[test]
    fn crd_schema_carries_enums_defaults_and_rules() {
        let crd = serde_json::to_string(&BuildWorkerPool::crd()).unwrap();
        assert!(crd.contains(r#""enum":["runc","crun"]"#), "{crd}");
        assert!(crd.contains(r#""default":"1.25""#), "{crd}");
        assert!(crd.contains("tls.secretName is required"), "{crd}");
        assert!(crd.contains(r#""status":{}"#), "{crd}");
        let job = serde_json::to_string(&BuildJob::crd()).unwrap();
        assert!(job.contains("set exactly one of source.git"), "{job}");
    }

    #[test]
    fn job_round_trips_with_ref_renames() {
        let job: BuildJobSpec = serde_json::from_value(serde_json::json!({
            "poolRef": {"name": "default"},
            "source": {"git": {"url": "https://example.com/app.git", "ref": "main"}},
            "cacheImport": [{"ref": "r/cache"}],
        }))
        .unwrap();
        assert_eq!(job.dockerfile, "Dockerfile");
        assert_eq!(
            job.source.git.as_ref().unwrap().git_ref.as_deref(),
            Some("main")
        );
        let back = serde_json::to_value(&job).unwrap();
        assert_eq!(back["cacheImport"][0]["ref"], "r/cache");
    }
}
