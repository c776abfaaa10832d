//! Steward's wire contract.
//!
//! - [`agent::v1`] and [`admin::v1`]: the versioned protobuf packages and their tonic stubs.
//! - [`enrollment`]: the format of enrollment tokens and admin credentials, which both the
//!   control plane (mints them) and the agent and CLI (present them) must agree on.
//! - [`transport`]: how a client reaches the control plane over TLS, including pinning the CA
//!   by hash during enrollment.
//! - [`http`]: how the plain HTTP endpoints (console, OpenAI-compatible API) are served, with
//!   a deadline for every request head.
//! - [`glibc_memcpy`]: restarting a binary with glibc's `rep movsb` threshold raised on the
//!   AMD CPUs where glibc's default makes TLS copies many times slower.

pub mod enrollment;
pub mod glibc_memcpy;
pub mod http;
pub mod transport;

pub mod agent {
    pub mod v1 {
        tonic::include_proto!("steward.agent.v1");
    }
}

pub mod admin {
    pub mod v1 {
        tonic::include_proto!("steward.admin.v1");
    }
}

/// Encoded `FileDescriptorSet` of every package, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("steward_descriptor");

/// Hex sha256 of a DER certificate: the "CA hash" that enrollment tokens carry.
pub fn certificate_sha256_hex(der: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(der))
}
