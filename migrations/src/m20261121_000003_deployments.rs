//! Deployments and what each node was assigned: a deployment names a verified artifact and
//! a node selector; the control plane places its replicas and keeps every node's assigned
//! models (its desired state) next to the node, so a restart resumes from what was decided.

// `MigrationTrait` elides the `SchemaManager` lifetime; the impl must match it exactly.
#![allow(elided_lifetimes_in_paths)]

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Deployments {
    Table,
    Name,
    ModelName,
    ModelVersion,
    Digest,
    Selector,
    Replicas,
    Slots,
    ContextPerSlot,
    GpuLayers,
    CreatedAt,
    UpdatedAt,
    CreatedBy,
}

#[derive(DeriveIden)]
enum Nodes {
    Table,
    DesiredModels,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Deployments::Table)
                    .if_not_exists()
                    .col(string(Deployments::Name).primary_key())
                    .col(string(Deployments::ModelName))
                    .col(string(Deployments::ModelVersion))
                    .col(string(Deployments::Digest))
                    .col(string(Deployments::Selector))
                    .col(integer(Deployments::Replicas))
                    .col(integer(Deployments::Slots))
                    .col(integer(Deployments::ContextPerSlot))
                    .col(integer(Deployments::GpuLayers))
                    .col(big_integer(Deployments::CreatedAt))
                    .col(big_integer(Deployments::UpdatedAt))
                    .col(string(Deployments::CreatedBy))
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Nodes::Table)
                    .add_column(text(Nodes::DesiredModels).default("[]"))
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Nodes::Table)
                    .drop_column(Nodes::DesiredModels)
                    .to_owned(),
            )
            .await?;
        manager
            .drop_table(
                Table::drop()
                    .table(Deployments::Table)
                    .if_exists()
                    .to_owned(),
            )
            .await?;
        Ok(())
    }
}
