//! What both the control plane and the agent check before a model artifact is accepted or
//! loaded (ARCHITECTURE.md invariant 4), in one place:
//!
//! - [`digest`]: streaming sha256 of artifact bytes.
//! - [`gguf`]: a strict, bounded GGUF header reader (no llama.cpp) that refuses malformed
//!   files and extracts the facts used for display and placement.
//! - [`signing`]: OpenSSF model signing v1.0 bundles (Sigstore bundle, DSSE, in-toto).
//! - [`policy`]: which anchors may sign which model names; the same decision on both sides.
//! - [`units`]: sizes written alike in both sides' messages.

pub mod digest;
pub mod direct_write;
pub mod gguf;
pub mod policy;
pub mod signing;
pub mod units;
