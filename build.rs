//! Compiles the protos with protox (pure Rust), so building needs no system `protoc`, and writes
//! their descriptor set for gRPC reflection (`grpcurl list` with no proto files).

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/viewcar/feed/v1/feed.proto",
        "proto/viewcar/cache/v1/cache.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("viewcar_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}
