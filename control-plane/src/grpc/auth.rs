//! Admin authentication shared by every administrators' service.

use steward_db::Store;
use steward_proto::enrollment::{AdminCredential, hash_secret};
use tonic::{Request, Status};

use crate::fleet::Actor;

/// The admin behind `authorization: Bearer <credential>`, or `Unauthenticated`.
pub async fn authorize<T>(store: &Store, request: &Request<T>) -> Result<Actor, Status> {
    let header = request
        .metadata()
        .get("authorization")
        .ok_or_else(|| {
            Status::unauthenticated("missing admin credential: pass --token or set STEWARD_TOKEN")
        })?
        .to_str()
        .map_err(|_| Status::unauthenticated("authorization header is not text"))?;
    let presented = header
        .strip_prefix("Bearer ")
        .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <credential>`"))?;
    let credential = AdminCredential::parse(presented)
        .map_err(|e| Status::unauthenticated(format!("invalid admin credential: {e}")))?;
    let stored = store
        .find_admin_credential(&credential.id)
        .await
        .map_err(|e| {
            tracing::error!(error = %steward_telemetry::chain(&e), "credential lookup failed");
            Status::internal("credential lookup failed")
        })?;
    match stored {
        Some(stored) if stored.secret_hash == hash_secret(&credential.secret) => Ok(Actor::Admin {
            credential_id: stored.id,
            name: stored.name,
        }),
        _ => Err(Status::unauthenticated("unknown or wrong admin credential")),
    }
}
