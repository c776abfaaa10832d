//! Steward's node agent.
//!
//! Code map:
//! - [`agent`]: [`agent::run`] — enroll if needed, then keep a session with the control plane.
//! - [`identity`]: enrollment (CA pinned by hash), the node's key and certificate, renewal.
//! - [`session`]: the one long-lived session: hello, heartbeats, inventory, desired state.
//! - [`reconciler`]: applies desired state idempotently and persists it ([`state`]).
//! - [`assignments`]: runs the models the desired state assigns (pull, verify, load, unload).
//! - [`admission`]: which assigned models fit under the operator's memory limit.
//! - [`artifacts`]: the artifact cache: resumable verified pulls, revocation, LRU eviction.
//! - [`serving`]: the inference engine's models, the OpenAI-compatible API, model status.
//! - [`inventory`]: GPU/CPU/memory/disk probes, real and synthetic.
//! - [`simulate`]: many agents in one process with synthetic hardware and the real session
//!   code, for scale tests and benchmarks.

pub mod admission;
pub mod agent;
pub mod artifacts;
pub mod assignments;
pub mod backoff;
pub mod identity;
pub mod inventory;
pub mod reconciler;
pub mod serving;
pub mod session;
pub mod simulate;
pub mod state;

/// The agent's version as reported to the control plane.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
