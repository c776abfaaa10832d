//! Steward's control plane.
//!
//! Code map:
//! - [`server`]: start-up ([`ControlPlane::start`], [`run`]), listeners and shutdown.
//! - [`fleet`]: the application layer — enrollment, identity, node scheduling flags.
//! - [`deployments`]: deployments, re-placement and each node's desired state.
//! - [`placement`]: which nodes take which replicas (a pure function).
//! - [`rollout`]: moving a deployment to a new model node by node (a pure function), and
//!   [`probes`], the probe requests that prove each step.
//! - [`grpc`]: handlers for `steward.agent.v1` and `steward.admin.v1`.
//! - [`sessions`]: open agent sessions and liveness, in memory.
//! - [`pki`]: the fleet CA and certificate issuance.
//! - [`http`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`cli`]: the `steward` admin CLI.

pub mod artifact_stream;
pub mod audit_export;
pub mod blobs;
pub mod cli;
pub mod deployments;
pub mod file_chunks;
pub mod fleet;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod pki;
pub mod placement;
pub mod probes;
pub mod read_deadline;
pub mod registry;
pub mod rollout;
pub mod server;
pub mod sessions;
pub mod trust;

pub use server::{Config, ControlPlane, Listeners, StartError, run};
