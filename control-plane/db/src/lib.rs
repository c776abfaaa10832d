//! The control plane's storage layer and the only crate that imports the ORM
//! (ARCHITECTURE.md, invariant "only the DB layer imports the ORM").
//!
//! [`Store`] opens SQLite (WAL, `synchronous=FULL`) or PostgreSQL by URL, applies the
//! migrations, and offers one method per business operation. Every method that changes state
//! writes its audit event in the same transaction, so the audit log and the state it describes
//! can never disagree.

mod deployments;
mod entity;
mod records;
mod registry;
mod store;
#[doc(hidden)]
pub mod testing;

pub use records::*;
pub use store::{DbError, Store};
