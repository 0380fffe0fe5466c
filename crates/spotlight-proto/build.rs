use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = ["frame", "inference", "branches", "registry", "control"]
        .map(|f| root.join(format!("spotlight/v1/{f}.proto")));
    let descriptor = PathBuf::from(std::env::var("OUT_DIR")?).join("spotlight_descriptor.bin");

    // The vendored protoc means a fresh machine needs no system package; PROTOC overrides.
    let mut config = tonic_prost_build::Config::new();
    // Feature bytes are reference-counted, so the coordinator forwards them to several
    // workers without copying.
    config.bytes([".spotlight.v1.FeatureTensor.data"]);
    match std::env::var_os("PROTOC") {
        Some(protoc) => config.protoc_executable(protoc),
        None => config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?),
    };
    tonic_prost_build::configure()
        .file_descriptor_set_path(descriptor)
        .compile_with_config(config, &files, std::slice::from_ref(&root))?;
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}
