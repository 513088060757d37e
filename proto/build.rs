//! Compiles the .proto files with protox (pure Rust; no system protoc) and prost.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/ops.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_fds(fds)?;
    Ok(())
}
