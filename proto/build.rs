//! Compiles the .proto files with protox (pure Rust; no system protoc) and generates
//! prost messages plus tonic clients and servers for every service. The compiled
//! descriptor set is also written to `OUT_DIR/kiln_descriptor.bin` so that the crate
//! can expose it (tests check field numbers against it; servers may offer reflection).
//! `google.protobuf.*` (Timestamp, Any, Empty, FieldMask) come from protox's bundled
//! files and map to `prost_types` (prost-build's default extern path; Empty is `()`).
//! Server traits get default `Unimplemented` methods (`generate_default_stubs`).

use prost::Message;

/// Every .proto the crate compiles, relative to `proto/`.
const FILES: &[&str] = &[
    "ops.proto",
    "google/rpc/status.proto",
    "grpc/health/v1/health.proto",
    "fsutil/types/stat.proto",
    "fsutil/types/wire.proto",
    "moby/buildkit/v1/apicaps/caps.proto",
    "moby/buildkit/v1/sourcepolicy/policy.proto",
    "moby/buildkit/v1/types/worker.proto",
    "moby/buildkit/v1/control.proto",
    "moby/buildkit/v1/frontend/gateway.proto",
    "moby/buildkit/secrets/v1/secrets.proto",
    "moby/filesync/v1/filesync.proto",
    "moby/filesync/v1/auth.proto",
    "moby/sshforward/v1/ssh.proto",
    "moby/upload/v1/upload.proto",
    "moby/exporter/v1/exporter.proto",
    "containerd/services/content/v1/content.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let paths: Vec<String> = FILES.iter().map(|f| format!("proto/{f}")).collect();
    for p in &paths {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(FILES, ["proto"])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("kiln_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .generate_default_stubs(true)
        .compile_fds(fds)?;
    Ok(())
}
