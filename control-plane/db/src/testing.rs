//! Helpers for tests that need a real database: a throwaway PostgreSQL database per test,
//! and a normalized view of the schema for comparing backends.

use sea_orm::{ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement};

use crate::DbError;

/// Admin URL of the test PostgreSQL server: `STEWARD_TEST_PG_URL`, or the local default.
pub fn postgres_admin_url() -> String {
    std::env::var("STEWARD_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// Connects to `url` for a test; a failure names the URL without its password, as the store
/// does. The connect future is large (clippy's `large_futures` in the release profile), so it
/// is boxed and callers' futures stay small.
async fn connect(url: &str) -> Result<DatabaseConnection, DbError> {
    Box::pin(Database::connect(url))
        .await
        .map_err(|source| DbError::Connect {
            url: crate::store::redact_url(url),
            source,
        })
}

/// A PostgreSQL database created for one test and dropped by [`PostgresTestDb::drop_database`].
#[derive(Debug)]
pub struct PostgresTestDb {
    pub name: String,
    pub url: String,
    admin_url: String,
}

impl PostgresTestDb {
    pub async fn create() -> Result<Self, DbError> {
        let admin_url = postgres_admin_url();
        let name = format!("steward_test_{}", uuid::Uuid::new_v4().simple());
        let admin = connect(&admin_url).await?;
        admin
            .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
            .await?;
        let _ = admin.close().await;
        let base = admin_url
            .rsplit_once('/')
            .map(|(base, _)| base.to_owned())
            .unwrap_or(admin_url.clone());
        Ok(Self {
            url: format!("{base}/{name}"),
            name,
            admin_url,
        })
    }

    pub async fn drop_database(self) -> Result<(), DbError> {
        let admin = connect(&self.admin_url).await?;
        admin
            .execute_unprepared(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ))
            .await?;
        let _ = admin.close().await;
        Ok(())
    }
}

/// One column as both backends can agree on it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ColumnShape {
    pub table: String,
    pub column: String,
    /// `text`, `integer` or `boolean`.
    pub kind: String,
    pub nullable: bool,
    pub primary_key: bool,
}

fn kind(declared: &str) -> String {
    let t = declared.to_ascii_lowercase();
    if t.contains("bool") {
        "boolean"
    } else if t.contains("int") {
        "integer"
    } else if t.contains("char") || t.contains("text") {
        "text"
    } else {
        return t;
    }
    .to_owned()
}

/// The application tables' columns (migration bookkeeping excluded), sorted.
pub async fn schema_shape(url: &str) -> Result<Vec<ColumnShape>, DbError> {
    let db = connect(url).await?;
    let backend = db.get_database_backend();
    let mut shape = Vec::new();
    match backend {
        DbBackend::Sqlite => {
            let tables = db
                .query_all_raw(Statement::from_string(
                    backend,
                    "SELECT name FROM sqlite_master WHERE type = 'table' \
                     AND name NOT LIKE 'sqlite_%' AND name <> 'seaql_migrations'",
                ))
                .await?;
            for row in tables {
                let table: String = row.try_get("", "name")?;
                let columns = db
                    .query_all_raw(Statement::from_string(
                        backend,
                        format!("PRAGMA table_info(\"{table}\")"),
                    ))
                    .await?;
                for c in columns {
                    let pk: i32 = c.try_get("", "pk")?;
                    let notnull: i32 = c.try_get("", "notnull")?;
                    shape.push(ColumnShape {
                        table: table.clone(),
                        column: c.try_get("", "name")?,
                        kind: kind(&c.try_get::<String>("", "type")?),
                        // SQLite reports primary keys as nullable unless declared NOT NULL.
                        nullable: notnull == 0 && pk == 0,
                        primary_key: pk > 0,
                    });
                }
            }
        }
        _ => {
            let rows = db
                .query_all_raw(Statement::from_string(
                    backend,
                    "SELECT c.table_name::text AS table_name, c.column_name::text AS column_name, \
                            c.data_type::text AS data_type, c.is_nullable::text AS is_nullable, \
                            EXISTS (SELECT 1 FROM information_schema.table_constraints tc \
                                    JOIN information_schema.key_column_usage k \
                                      ON tc.constraint_name = k.constraint_name \
                                     AND tc.table_name = k.table_name \
                                    WHERE tc.constraint_type = 'PRIMARY KEY' \
                                      AND tc.table_name = c.table_name \
                                      AND k.column_name = c.column_name) AS pk \
                     FROM information_schema.columns c \
                     WHERE c.table_schema = 'public' AND c.table_name <> 'seaql_migrations'",
                ))
                .await?;
            for r in rows {
                shape.push(ColumnShape {
                    table: r.try_get("", "table_name")?,
                    column: r.try_get("", "column_name")?,
                    kind: kind(&r.try_get::<String>("", "data_type")?),
                    nullable: r.try_get::<String>("", "is_nullable")? == "YES",
                    primary_key: r.try_get("", "pk")?,
                });
            }
        }
    }
    let _ = db.close().await;
    shape.sort();
    Ok(shape)
}
