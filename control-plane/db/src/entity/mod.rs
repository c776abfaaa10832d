//! sea-orm entities, private to this crate. Callers see the plain records in `records`.

pub mod admin_credential;
pub mod artifact;
pub mod audit_event;
pub mod certificate_authority;
pub mod deployment;
pub mod enrollment_token;
pub mod model_version;
pub mod node;
pub mod trust_anchor;
pub mod unsigned_allowance;
