//! Fleet identity and inventory: the CA, admin credentials, enrollment tokens, nodes, and the
//! hash-chained audit log. Times are Unix seconds (UTC) in BIGINT columns so that SQLite and
//! PostgreSQL store them identically.

// `MigrationTrait` elides the `SchemaManager` lifetime; the impl must match it exactly.
#![allow(elided_lifetimes_in_paths)]

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum CertificateAuthorities {
    Table,
    Id,
    CertificatePem,
    PrivateKeyPem,
    CreatedAt,
}

#[derive(DeriveIden)]
enum AdminCredentials {
    Table,
    Id,
    Name,
    SecretHash,
    Role,
    CreatedAt,
}

#[derive(DeriveIden)]
enum EnrollmentTokens {
    Table,
    Id,
    SecretHash,
    Description,
    CreatedBy,
    CreatedAt,
    ExpiresAt,
    UsedAt,
    UsedByNodeId,
    RevokedAt,
}

#[derive(DeriveIden)]
enum Nodes {
    Table,
    Id,
    Name,
    State,
    Cordoned,
    Draining,
    Labels,
    AgentVersion,
    Inventory,
    DesiredGeneration,
    AppliedGeneration,
    EnrolledAt,
    StateChangedAt,
    CertificateSerial,
    CertificateNotAfter,
}

#[derive(DeriveIden)]
enum AuditEvents {
    Table,
    Seq,
    At,
    Actor,
    Action,
    Target,
    Outcome,
    Details,
    PrevHash,
    Hash,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(CertificateAuthorities::Table)
                    .if_not_exists()
                    .col(string(CertificateAuthorities::Id).primary_key())
                    .col(text(CertificateAuthorities::CertificatePem))
                    .col(text(CertificateAuthorities::PrivateKeyPem))
                    .col(big_integer(CertificateAuthorities::CreatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(AdminCredentials::Table)
                    .if_not_exists()
                    .col(string(AdminCredentials::Id).primary_key())
                    .col(string(AdminCredentials::Name))
                    .col(string(AdminCredentials::SecretHash))
                    .col(string(AdminCredentials::Role))
                    .col(big_integer(AdminCredentials::CreatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(EnrollmentTokens::Table)
                    .if_not_exists()
                    .col(string(EnrollmentTokens::Id).primary_key())
                    .col(string(EnrollmentTokens::SecretHash))
                    .col(string(EnrollmentTokens::Description))
                    .col(string(EnrollmentTokens::CreatedBy))
                    .col(big_integer(EnrollmentTokens::CreatedAt))
                    .col(big_integer(EnrollmentTokens::ExpiresAt))
                    .col(big_integer_null(EnrollmentTokens::UsedAt))
                    .col(string_null(EnrollmentTokens::UsedByNodeId))
                    .col(big_integer_null(EnrollmentTokens::RevokedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Nodes::Table)
                    .if_not_exists()
                    .col(string(Nodes::Id).primary_key())
                    .col(string_uniq(Nodes::Name))
                    .col(string(Nodes::State))
                    .col(boolean(Nodes::Cordoned))
                    .col(boolean(Nodes::Draining))
                    .col(text(Nodes::Labels))
                    .col(string(Nodes::AgentVersion))
                    .col(text(Nodes::Inventory))
                    .col(big_integer(Nodes::DesiredGeneration))
                    .col(big_integer(Nodes::AppliedGeneration))
                    .col(big_integer(Nodes::EnrolledAt))
                    .col(big_integer(Nodes::StateChangedAt))
                    .col(string(Nodes::CertificateSerial))
                    .col(big_integer(Nodes::CertificateNotAfter))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(AuditEvents::Table)
                    .if_not_exists()
                    .col(big_integer(AuditEvents::Seq).primary_key())
                    .col(big_integer(AuditEvents::At))
                    .col(string(AuditEvents::Actor))
                    .col(string(AuditEvents::Action))
                    .col(string(AuditEvents::Target))
                    .col(string(AuditEvents::Outcome))
                    .col(text(AuditEvents::Details))
                    .col(string(AuditEvents::PrevHash))
                    .col(string_uniq(AuditEvents::Hash))
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            AuditEvents::Table.into_iden(),
            Nodes::Table.into_iden(),
            EnrollmentTokens::Table.into_iden(),
            AdminCredentials::Table.into_iden(),
            CertificateAuthorities::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}
