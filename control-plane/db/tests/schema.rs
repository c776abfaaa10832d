//! The schema is the same on SQLite and PostgreSQL, and applying migrations twice changes
//! nothing.

use steward_db::Store;
use steward_db::testing::{PostgresTestDb, schema_shape};

#[tokio::test]
async fn migrations_give_the_same_schema_on_sqlite_and_postgres_and_are_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite_url = format!("sqlite://{}?mode=rwc", dir.path().join("s.db").display());
    let pg = PostgresTestDb::create()
        .await
        .expect("PostgreSQL must be reachable for this test (see README)");

    for url in [&sqlite_url, &pg.url] {
        Store::connect(url).await.unwrap().close().await;
    }
    let sqlite_first = schema_shape(&sqlite_url).await.unwrap();
    let pg_first = schema_shape(&pg.url).await.unwrap();
    assert!(
        sqlite_first
            .iter()
            .any(|c| c.table == "nodes" && c.column == "desired_generation"),
        "unexpected schema: {sqlite_first:#?}"
    );
    assert_eq!(
        sqlite_first, pg_first,
        "SQLite and PostgreSQL schemas differ"
    );

    // A second start applies nothing and leaves the schema as it was.
    for url in [&sqlite_url, &pg.url] {
        Store::connect(url).await.unwrap().close().await;
    }
    assert_eq!(schema_shape(&sqlite_url).await.unwrap(), sqlite_first);
    assert_eq!(schema_shape(&pg.url).await.unwrap(), pg_first);
    pg.drop_database().await.unwrap();
}

#[tokio::test]
async fn an_unreachable_database_is_a_clear_error() {
    let err = Store::connect("postgres://postgres@127.0.0.1:1/steward")
        .await
        .unwrap_err();
    let text = steward_db_error_chain(&err);
    assert!(
        text.starts_with("cannot open the database at postgres://postgres@127.0.0.1:1/steward"),
        "{text}"
    );
}

fn steward_db_error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
