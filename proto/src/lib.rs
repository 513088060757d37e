//! Kiln's wire contracts, generated from `proto/**/*.proto` at build time.
//!
//! Every package keeps BuildKit's package name, message names, field numbers and RPC
//! names, so that unchanged Go clients (buildctl, buildx) and frontends talk to Kiln:
//!
//! * [`pb`]: BuildKit's LLB (`solver/pb/ops.proto`).
//! * [`moby::buildkit::v1`]: the Control service and its messages; its children
//!   [`types`](moby::buildkit::v1::types) (workers),
//!   [`sourcepolicy`](moby::buildkit::v1::sourcepolicy),
//!   [`apicaps`](moby::buildkit::v1::apicaps) and
//!   [`frontend`](moby::buildkit::v1::frontend) (the LLBBridge gateway API).
//! * Session services a client serves and the daemon calls: [`moby::filesync::v1`]
//!   (FileSync, FileSend, Auth), [`moby::buildkit::secrets::v1`],
//!   [`moby::sshforward::v1`], [`moby::upload::v1`], [`moby::exporter::v1`],
//!   [`fsutil::types`] (the file-sync packet protocol; [`fsutil::mode`] has the Go
//!   `os.FileMode` bits) and [`grpc::health::v1`].
//! * [`containerd::services::content::v1`]: the content store (daemon: history blobs;
//!   session: export and cache stores).
//! * [`google::rpc`]: `google.rpc.Status`; `google.protobuf` types are [`prost_types`].
//! * [`metadata`]: the gRPC metadata keys BuildKit puts on calls.
//!
//! Each service has a tonic client (`<service>_client`) and server (`<service>_server`)
//! module. Server traits have default methods answering `Unimplemented`, so an
//! implementation only writes the RPCs it supports.
//!
//! [`gc`] is the garbage-collection policy the controller renders and the worker enforces
//! (types, parsing, the `[gc]` file form).
//!
//! [`transport`] is the one module that does I/O: the listeners and dialers every Kiln
//! component uses for these services (unix sockets, TCP with mutual TLS and certificate
//! reload; [`transport::http`], the tiny HTTP server of the plain metrics, probe and admin
//! endpoints). [`telemetry`] sets up logs and OTLP traces for the daemons and carries trace
//! context over gRPC metadata. The worker, gateway and CLI depend on this crate, never the
//! reverse.

pub use prost;
pub use prost_types;
pub use tonic;

pub mod gc;
pub mod telemetry;
pub mod transport;

/// The encoded `google.protobuf.FileDescriptorSet` of every .proto in this crate
/// (for gRPC reflection and for checking field numbers).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/kiln_descriptor.bin"));

/// BuildKit's LLB (`solver/pb/ops.proto`, package `pb`).
#[allow(missing_docs, clippy::all)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/pb.rs"));
}

/// Packages under `moby.*`.
pub mod moby {
    /// Packages under `moby.buildkit.*`.
    pub mod buildkit {
        /// `moby.buildkit.v1`: the Control service (`api/services/control`).
        #[allow(missing_docs, clippy::all)]
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/moby.buildkit.v1.rs"));

            /// `moby.buildkit.v1.types`: worker records (`api/types/worker.proto`).
            #[allow(missing_docs, clippy::all)]
            pub mod types {
                include!(concat!(env!("OUT_DIR"), "/moby.buildkit.v1.types.rs"));
            }

            /// `moby.buildkit.v1.sourcepolicy`: source policies.
            #[allow(missing_docs, clippy::all)]
            pub mod sourcepolicy {
                include!(concat!(
                    env!("OUT_DIR"),
                    "/moby.buildkit.v1.sourcepolicy.rs"
                ));
            }

            /// `moby.buildkit.v1.apicaps`: capability records of `LLBBridge.Ping`.
            #[allow(missing_docs, clippy::all)]
            pub mod apicaps {
                include!(concat!(env!("OUT_DIR"), "/moby.buildkit.v1.apicaps.rs"));
            }

            /// `moby.buildkit.v1.frontend`: the LLBBridge gateway API.
            #[allow(missing_docs, clippy::all)]
            pub mod frontend {
                include!(concat!(env!("OUT_DIR"), "/moby.buildkit.v1.frontend.rs"));
            }
        }

        /// Packages under `moby.buildkit.secrets.*`.
        pub mod secrets {
            /// `moby.buildkit.secrets.v1`: the session Secrets service.
            #[allow(missing_docs, clippy::all)]
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/moby.buildkit.secrets.v1.rs"));
            }
        }
    }

    /// Packages under `moby.filesync.*`.
    pub mod filesync {
        /// `moby.filesync.v1`: the session FileSync, FileSend and Auth services.
        #[allow(missing_docs, clippy::all)]
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/moby.filesync.v1.rs"));
        }
    }

    /// Packages under `moby.sshforward.*`.
    pub mod sshforward {
        /// `moby.sshforward.v1`: the session SSH agent-forwarding service.
        #[allow(missing_docs, clippy::all)]
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/moby.sshforward.v1.rs"));
        }
    }

    /// Packages under `moby.upload.*`.
    pub mod upload {
        /// `moby.upload.v1`: the session Upload service (tar contexts from stdin).
        #[allow(missing_docs, clippy::all)]
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/moby.upload.v1.rs"));
        }
    }

    /// Packages under `moby.exporter.*`.
    pub mod exporter {
        /// `moby.exporter.v1`: the session Exporter service (client-chosen exporters).
        #[allow(missing_docs, clippy::all)]
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/moby.exporter.v1.rs"));
        }
    }
}

/// Packages under `containerd.*`.
pub mod containerd {
    /// Packages under `containerd.services.*`.
    pub mod services {
        /// Packages under `containerd.services.content.*`.
        pub mod content {
            /// `containerd.services.content.v1`: the content store (history blobs on the
            /// daemon; export and cache stores on a session).
            #[allow(missing_docs, clippy::all)]
            pub mod v1 {
                include!(concat!(
                    env!("OUT_DIR"),
                    "/containerd.services.content.v1.rs"
                ));
            }
        }
    }
}

pub mod fsutil;
pub mod metadata;

/// Packages under `google.*` (other than `google.protobuf`, which is [`prost_types`]).
pub mod google {
    /// `google.rpc`: the `Status` error model.
    #[allow(missing_docs, clippy::all)]
    pub mod rpc {
        include!(concat!(env!("OUT_DIR"), "/google.rpc.rs"));
    }
}

/// Packages under `grpc.*`.
pub mod grpc {
    /// Packages under `grpc.health.*`.
    pub mod health {
        /// `grpc.health.v1`: the standard health service.
        #[allow(missing_docs, clippy::all)]
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/grpc.health.v1.rs"));
        }
    }
}
