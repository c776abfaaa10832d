//! gRPC handlers: translate wire types, authenticate the caller, call [`crate::fleet`].

pub mod admin;
pub mod agent;
pub mod artifact_download;
pub mod auth;
mod convert;
pub mod deployments;
pub mod models;

use tonic::Status;

use crate::fleet::FleetError;

/// Maps application errors onto gRPC codes; the message carries the whole cause chain so a
/// CLI user sees why, while internal errors are also logged here.
pub(crate) fn status(err: FleetError) -> Status {
    let message = steward_telemetry::chain(&err).to_string();
    match err {
        FleetError::EnrollmentRefused(_) | FleetError::MalformedToken(_) => {
            Status::permission_denied(message)
        }
        FleetError::InvalidArgument(_) | FleetError::Pki(crate::pki::PkiError::BadCsr(_)) => {
            Status::invalid_argument(message)
        }
        FleetError::NotFound(_) => Status::not_found(message),
        FleetError::UnknownNode(_) => Status::permission_denied(message),
        FleetError::Pki(_) | FleetError::Db(_) => {
            tracing::error!(error = %message, "request failed");
            Status::internal(message)
        }
    }
}
