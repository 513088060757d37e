//! gRPC metadata keys (lowercase, as they travel in HTTP/2) that BuildKit clients and
//! daemons put on calls, collected from shared/design/buildkit-wire.md §2–§6. A
//! gateway routes on [`SESSION_UUID`], [`SESSION_SHARED_KEY`] and [`BUILD_ID`].

/// `Control.Session`: the session ID (`X-Docker-Expose-Session-Uuid`).
pub const SESSION_UUID: &str = "x-docker-expose-session-uuid";
/// `Control.Session`: the shared key; present but possibly empty.
pub const SESSION_SHARED_KEY: &str = "x-docker-expose-session-sharedkey";
/// `Control.Session`: one value per method the client serves (`/<svc>/<Method>`).
pub const SESSION_GRPC_METHOD: &str = "x-docker-expose-session-grpc-method";
/// `Control.Session`: session name, sent only by clients older than v0.16.
pub const SESSION_NAME: &str = "x-docker-expose-session-name";
/// `Control.Session`: health-check timeout override in milliseconds (tests only).
pub const SESSION_HEALTH_TIMEOUT: &str = "x-buildkit-session-health-custom-timeout";
/// Every LLBBridge call: the `Control.Solve` Ref of the build.
pub const BUILD_ID: &str = "buildkit-controlapi-buildid";
/// Response header of `Status` and `ListenBuildHistory`: daemon time (RFC 3339, ns).
pub const CURRENT_TIMESTAMP: &str = "buildkit-current-timestamp";
/// `FileSync.DiffCopy`: the local directory name (`context`, `dockerfile`, ...).
pub const DIR_NAME: &str = "dir-name";
/// `FileSync.DiffCopy`: one value per include pattern.
pub const INCLUDE_PATTERNS: &str = "include-patterns";
/// `FileSync.DiffCopy`: one value per exclude pattern.
pub const EXCLUDE_PATTERNS: &str = "exclude-patterns";
/// `FileSync.DiffCopy`: one value per path that is needed.
pub const FOLLOW_PATHS: &str = "followpaths";
/// Suffix of a key whose values are URL-query-escaped (`<key>-encoded: 1`).
pub const ENCODED_SUFFIX: &str = "-encoded";
/// `FileSend.DiffCopy`: decimal index of the exporter in `SolveRequest.Exporters`.
pub const EXPORTER_ID: &str = "buildkit-attachable-exporter-id";
/// `FileSend.DiffCopy`: prefix of one header per exporter response key.
pub const EXPORTER_MD_PREFIX: &str = "exporter-md-";
/// `FileSend.DiffCopy`: `1` when the daemon supports multi-platform local export.
pub const EXPORTER_MULTI_PLATFORM: &str = "buildkit-exporter-multi-platform";
/// Session content store: which store (`export`, `oci:<name>`, `local:<dir>`).
pub const STORE_ID: &str = "buildkit-attachable-store-id";
/// `SSH.ForwardAgent`: the agent ID (default `default`).
pub const SSH_ID: &str = "buildkit.ssh.id";
