//! Steward's schema, one migration at a time. Nothing else in the workspace creates or alters
//! tables; the control plane applies these at start (`Migrator::up`), which is idempotent.

pub use sea_orm_migration::prelude::*;

mod m20261121_000001_foundation;
mod m20261121_000002_artifacts;
mod m20261121_000003_deployments;
mod m20261121_000004_rollouts;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261121_000001_foundation::Migration),
            Box::new(m20261121_000002_artifacts::Migration),
            Box::new(m20261121_000003_deployments::Migration),
            Box::new(m20261121_000004_rollouts::Migration),
        ]
    }
}
