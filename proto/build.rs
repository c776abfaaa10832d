//! Generates the Rust types and tonic stubs from `proto/` with a vendored `protoc` (no system
//! install needed), plus the descriptor set the control plane serves over gRPC reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        // Serde on every message so the CLI's `-o json` and the stored inventory use the wire
        // types directly instead of a hand-kept mirror.
        .type_attribute(".", "#[derive(serde::Serialize, serde::Deserialize)]")
        .message_attribute(".", "#[serde(default)]")
        // Artifact chunks stay `Bytes` end to end: no copy between the wire and the disk.
        .bytes(".steward.admin.v1.PushModelRequest.chunk")
        .bytes(".steward.agent.v1.ArtifactChunk.data")
        .file_descriptor_set_path(out_dir.join("steward_descriptor.bin"))
        .compile_with_config(
            config,
            &[
                "proto/steward/agent/v1/agent.proto",
                "proto/steward/admin/v1/admin.proto",
                "proto/steward/admin/v1/models.proto",
                "proto/steward/admin/v1/deployments.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
