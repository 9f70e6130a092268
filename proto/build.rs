//! Compiles `gantry/v1/*.proto` without a `protoc` binary: protox parses the files into a
//! FileDescriptorSet, tonic-prost-build generates the code from it, and the encoded set is
//! written to OUT_DIR for server reflection.
use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &[
    "gantry/v1/types.proto",
    "gantry/v1/jobs.proto",
    "gantry/v1/runner.proto",
    "gantry/v1/admin.proto",
    "gantry/v1/sandbox.proto",
    "gantry/v1/work.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("gantry_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .codec_path("crate::codec::GantryCodec")
        .compile_fds(fds)?;
    Ok(())
}
