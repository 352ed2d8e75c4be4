//! Generates the gRPC server (and test client) code for Envoy's rate limit and external
//! authorization services from `proto/`, with the protoc that `protoc-bin-vendored` ships, so
//! building needs no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let include = protoc_bin_vendored::include_path()?;
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure().compile_with_config(
        config,
        &["proto/ratelimit.proto", "proto/ext_authz.proto"],
        &[
            "proto",
            include.to_str().ok_or("protoc include path is not UTF-8")?,
        ],
    )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
