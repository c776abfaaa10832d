//! The model registry and trust policy: artifacts by digest, named versions pointing at them,
//! trust anchors, and the audited allowances for unsigned models.

// `MigrationTrait` elides the `SchemaManager` lifetime; the impl must match it exactly.
#![allow(elided_lifetimes_in_paths)]

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Artifacts {
    Table,
    Digest,
    SizeBytes,
    FileName,
    GgufFacts,
    SignatureBundle,
    Signer,
    Verification,
    CreatedAt,
    CreatedBy,
    RevokedAt,
    RevokedReason,
    RevokedBy,
}

#[derive(DeriveIden)]
enum ModelVersions {
    Table,
    Name,
    Version,
    Digest,
    CreatedAt,
    CreatedBy,
}

#[derive(DeriveIden)]
enum TrustAnchors {
    Table,
    Id,
    Kind,
    Pem,
    Identity,
    NamePattern,
    Description,
    Fingerprint,
    CreatedAt,
    CreatedBy,
}

#[derive(DeriveIden)]
enum UnsignedAllowances {
    Table,
    NamePattern,
    Reason,
    CreatedAt,
    CreatedBy,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Artifacts::Table)
                    .if_not_exists()
                    .col(string(Artifacts::Digest).primary_key())
                    .col(big_integer(Artifacts::SizeBytes))
                    .col(string(Artifacts::FileName))
                    .col(text(Artifacts::GgufFacts))
                    .col(text(Artifacts::SignatureBundle))
                    .col(string(Artifacts::Signer))
                    .col(string(Artifacts::Verification))
                    .col(big_integer(Artifacts::CreatedAt))
                    .col(string(Artifacts::CreatedBy))
                    .col(big_integer_null(Artifacts::RevokedAt))
                    .col(string_null(Artifacts::RevokedReason))
                    .col(string_null(Artifacts::RevokedBy))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(ModelVersions::Table)
                    .if_not_exists()
                    .col(string(ModelVersions::Name))
                    .col(string(ModelVersions::Version))
                    .col(string(ModelVersions::Digest))
                    .col(big_integer(ModelVersions::CreatedAt))
                    .col(string(ModelVersions::CreatedBy))
                    .primary_key(
                        Index::create()
                            .col(ModelVersions::Name)
                            .col(ModelVersions::Version),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(TrustAnchors::Table)
                    .if_not_exists()
                    .col(string(TrustAnchors::Id).primary_key())
                    .col(string(TrustAnchors::Kind))
                    .col(text(TrustAnchors::Pem))
                    .col(string(TrustAnchors::Identity))
                    .col(string(TrustAnchors::NamePattern))
                    .col(string(TrustAnchors::Description))
                    .col(string(TrustAnchors::Fingerprint))
                    .col(big_integer(TrustAnchors::CreatedAt))
                    .col(string(TrustAnchors::CreatedBy))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(UnsignedAllowances::Table)
                    .if_not_exists()
                    .col(string(UnsignedAllowances::NamePattern).primary_key())
                    .col(string(UnsignedAllowances::Reason))
                    .col(big_integer(UnsignedAllowances::CreatedAt))
                    .col(string(UnsignedAllowances::CreatedBy))
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            UnsignedAllowances::Table.into_iden(),
            TrustAnchors::Table.into_iden(),
            ModelVersions::Table.into_iden(),
            Artifacts::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}
