use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, ConnectOptions, Database, DatabaseConnection,
    DatabaseTransaction, DbBackend, DbErr, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    TransactionTrait,
};
use steward_migrations::{Migrator, MigratorTrait};

use crate::entity::{admin_credential, audit_event, certificate_authority, enrollment_token, node};
use crate::records::*;

const CA_ROW_ID: &str = "fleet";

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot open the database at {url}")]
    Connect {
        url: String,
        #[source]
        source: DbErr,
    },
    #[error("applying database migrations failed")]
    Migrate(#[source] DbErr),
    #[error("database operation failed")]
    Query(#[from] DbErr),
    #[error("stored {what} is corrupt: {detail}")]
    Corrupt { what: &'static str, detail: String },
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
}

/// Handle to the control plane's database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pub(crate) db: DatabaseConnection,
    writes: Arc<AtomicU64>,
    /// Held for the whole of every transaction that appends to the audit log, from reading
    /// the chain head to commit, so two appends in this process never race for one `seq`.
    /// (The unique `seq` primary key still catches a writer in another process.) On SQLite it
    /// also keeps read-then-write transactions from failing to upgrade their lock.
    audit_lock: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.db.get_database_backend())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens the database at `url` (`sqlite://PATH?mode=rwc` or `postgres://…`) and applies
    /// every pending migration.
    pub async fn connect(url: &str) -> Result<Self, DbError> {
        let mut opts = ConnectOptions::new(url.to_owned());
        opts.sqlx_logging(false)
            .connect_timeout(Duration::from_secs(10))
            .acquire_timeout(Duration::from_secs(10));
        if url.starts_with("sqlite:") {
            // One writer at a time is all SQLite allows; a small pool avoids lock churn.
            opts.max_connections(4).min_connections(1);
            opts.map_sqlx_sqlite_opts(|o| {
                o.journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Full)
                    .busy_timeout(Duration::from_secs(30))
                    .foreign_keys(true)
                    .create_if_missing(true)
            });
        } else {
            opts.max_connections(32).min_connections(2);
        }
        let db = Box::pin(Database::connect(opts))
            .await
            .map_err(|source| DbError::Connect {
                url: redact_url(url),
                source,
            })?;
        Migrator::up(&db, None).await.map_err(DbError::Migrate)?;
        Ok(Self {
            db,
            writes: Arc::new(AtomicU64::new(0)),
            audit_lock: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    pub fn backend_name(&self) -> &'static str {
        match self.db.get_database_backend() {
            DbBackend::Sqlite => "sqlite",
            DbBackend::Postgres => "postgres",
            _ => "other",
        }
    }

    /// Write transactions committed since this handle was opened (for `/metrics`).
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    pub(crate) fn count_write(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
    }

    pub async fn ping(&self) -> Result<(), DbError> {
        self.db.ping().await.map_err(DbError::Query)
    }

    pub async fn close(self) {
        let _ = self.db.close().await;
    }

    // ---- certificate authority -------------------------------------------------------

    pub async fn load_ca(&self) -> Result<Option<CaRecord>, DbError> {
        Ok(certificate_authority::Entity::find_by_id(CA_ROW_ID)
            .one(&self.db)
            .await?
            .map(|m| CaRecord {
                certificate_pem: m.certificate_pem,
                private_key_pem: m.private_key_pem,
                created_at: m.created_at,
            }))
    }

    /// Stores the CA unless one exists; returns whichever CA is stored afterwards, so two
    /// control planes starting at once on one database agree on a single CA.
    pub async fn insert_ca_if_absent(
        &self,
        ca: CaRecord,
        audit: NewAuditEvent,
    ) -> Result<CaRecord, DbError> {
        let txn = self.begin_audited().await?;
        let inserted = certificate_authority::Entity::insert(certificate_authority::ActiveModel {
            id: Set(CA_ROW_ID.to_owned()),
            certificate_pem: Set(ca.certificate_pem),
            private_key_pem: Set(ca.private_key_pem),
            created_at: Set(ca.created_at),
        })
        .on_conflict(
            OnConflict::column(certificate_authority::Column::Id)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(&*txn)
        .await?;
        let audit = (inserted == 1).then_some(audit);
        txn.commit(audit).await?;
        self.load_ca()
            .await?
            .ok_or_else(|| DbError::NotFound("certificate authority".into()))
    }

    // ---- admin credentials -----------------------------------------------------------

    pub async fn admin_credential_count(&self) -> Result<u64, DbError> {
        use sea_orm::PaginatorTrait;
        Ok(admin_credential::Entity::find().count(&self.db).await?)
    }

    pub async fn insert_admin_credential(
        &self,
        cred: AdminCredentialRecord,
        audit: NewAuditEvent,
    ) -> Result<(), DbError> {
        let txn = self.begin_audited().await?;
        admin_credential::ActiveModel {
            id: Set(cred.id),
            name: Set(cred.name),
            secret_hash: Set(cred.secret_hash),
            role: Set(cred.role),
            created_at: Set(cred.created_at),
        }
        .insert(&*txn)
        .await?;
        txn.commit(Some(audit)).await?;
        Ok(())
    }

    pub async fn find_admin_credential(
        &self,
        id: &str,
    ) -> Result<Option<AdminCredentialRecord>, DbError> {
        Ok(admin_credential::Entity::find_by_id(id)
            .one(&self.db)
            .await?
            .map(|m| AdminCredentialRecord {
                id: m.id,
                name: m.name,
                secret_hash: m.secret_hash,
                role: m.role,
                created_at: m.created_at,
            }))
    }

    // ---- enrollment tokens -----------------------------------------------------------

    pub async fn insert_enrollment_token(
        &self,
        token: EnrollmentTokenRecord,
        audit: NewAuditEvent,
    ) -> Result<(), DbError> {
        let txn = self.begin_audited().await?;
        enrollment_token::ActiveModel {
            id: Set(token.id),
            secret_hash: Set(token.secret_hash),
            description: Set(token.description),
            created_by: Set(token.created_by),
            created_at: Set(token.created_at),
            expires_at: Set(token.expires_at),
            used_at: Set(token.used_at),
            used_by_node_id: Set(token.used_by_node_id),
            revoked_at: Set(token.revoked_at),
        }
        .insert(&*txn)
        .await?;
        txn.commit(Some(audit)).await?;
        Ok(())
    }

    pub async fn list_enrollment_tokens(&self) -> Result<Vec<EnrollmentTokenRecord>, DbError> {
        Ok(enrollment_token::Entity::find()
            .order_by_asc(enrollment_token::Column::CreatedAt)
            .order_by_asc(enrollment_token::Column::Id)
            .all(&self.db)
            .await?
            .into_iter()
            .map(token_record)
            .collect())
    }

    pub async fn find_enrollment_token(
        &self,
        id: &str,
    ) -> Result<Option<EnrollmentTokenRecord>, DbError> {
        Ok(enrollment_token::Entity::find_by_id(id)
            .one(&self.db)
            .await?
            .map(token_record))
    }

    /// Revokes an unused token. Revoking twice is harmless and audited once.
    pub async fn revoke_enrollment_token(
        &self,
        id: &str,
        now: UnixSeconds,
        audit: NewAuditEvent,
    ) -> Result<EnrollmentTokenRecord, DbError> {
        let txn = self.begin_audited().await?;
        let changed = enrollment_token::Entity::update_many()
            .col_expr(enrollment_token::Column::RevokedAt, Expr::value(now))
            .filter(enrollment_token::Column::Id.eq(id))
            .filter(enrollment_token::Column::RevokedAt.is_null())
            .exec(&*txn)
            .await?
            .rows_affected;
        let token = enrollment_token::Entity::find_by_id(id)
            .one(&*txn)
            .await?
            .ok_or_else(|| DbError::NotFound(format!("enrollment token {id}")))?;
        let audit = (changed == 1).then_some(audit);
        txn.commit(audit).await?;
        Ok(token_record(token))
    }

    /// Consumes a token and creates the node it enrolls, atomically: a token can enroll at
    /// most one node even when two agents race with it.
    pub async fn enroll_node(
        &self,
        token_id: &str,
        secret_hash: &str,
        now: UnixSeconds,
        new: NewNode,
        audit: NewAuditEvent,
    ) -> Result<Result<NodeRecord, TokenRejection>, DbError> {
        let txn = self.begin_audited().await?;
        let Some(token) = enrollment_token::Entity::find_by_id(token_id)
            .one(&*txn)
            .await?
        else {
            return Ok(Err(TokenRejection::Unknown));
        };
        if !constant_time_eq(token.secret_hash.as_bytes(), secret_hash.as_bytes()) {
            return Ok(Err(TokenRejection::WrongSecret));
        }
        if token.revoked_at.is_some() {
            return Ok(Err(TokenRejection::Revoked));
        }
        if token.used_at.is_some() {
            return Ok(Err(TokenRejection::AlreadyUsed));
        }
        if token.expires_at <= now {
            return Ok(Err(TokenRejection::Expired));
        }
        let claimed = enrollment_token::Entity::update_many()
            .col_expr(enrollment_token::Column::UsedAt, Expr::value(now))
            .col_expr(
                enrollment_token::Column::UsedByNodeId,
                Expr::value(new.id.clone()),
            )
            .filter(enrollment_token::Column::Id.eq(token_id))
            .filter(enrollment_token::Column::UsedAt.is_null())
            .exec(&*txn)
            .await?
            .rows_affected;
        if claimed != 1 {
            return Ok(Err(TokenRejection::AlreadyUsed));
        }
        let name = unique_node_name(&txn, &new.requested_name, &new.id).await?;
        let model = node::ActiveModel {
            id: Set(new.id),
            name: Set(name),
            state: Set(NodeState::Unavailable.as_str().to_owned()),
            cordoned: Set(false),
            draining: Set(false),
            labels: Set("{}".to_owned()),
            desired_models: Set("[]".to_owned()),
            agent_version: Set(new.agent_version),
            inventory: Set("{}".to_owned()),
            desired_generation: Set(1),
            applied_generation: Set(0),
            enrolled_at: Set(now),
            state_changed_at: Set(now),
            certificate_serial: Set(new.certificate_serial),
            certificate_not_after: Set(new.certificate_not_after),
        }
        .insert(&*txn)
        .await?;
        let mut audit = audit;
        audit.target = model.id.clone();
        txn.commit(Some(audit)).await?;
        node_record(model).map(Ok)
    }

    // ---- nodes -----------------------------------------------------------------------

    pub async fn list_nodes(&self) -> Result<Vec<NodeRecord>, DbError> {
        node::Entity::find()
            .order_by_asc(node::Column::Name)
            .all(&self.db)
            .await?
            .into_iter()
            .map(node_record)
            .collect()
    }

    pub async fn get_node(&self, id: &str) -> Result<Option<NodeRecord>, DbError> {
        node::Entity::find_by_id(id)
            .one(&self.db)
            .await?
            .map(node_record)
            .transpose()
    }

    /// A node by ID, or else by name.
    pub async fn find_node(&self, id_or_name: &str) -> Result<Option<NodeRecord>, DbError> {
        if let Some(node) = self.get_node(id_or_name).await? {
            return Ok(Some(node));
        }
        node::Entity::find()
            .filter(node::Column::Name.eq(id_or_name))
            .one(&self.db)
            .await?
            .map(node_record)
            .transpose()
    }

    /// Node counts by state, for `/metrics`.
    pub async fn count_nodes_by_state(&self) -> Result<BTreeMap<String, u64>, DbError> {
        let rows: Vec<(String, i64)> = node::Entity::find()
            .select_only()
            .column(node::Column::State)
            .column_as(node::Column::Id.count(), "n")
            .group_by(node::Column::State)
            .into_tuple()
            .all(&self.db)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(state, n)| (state, n.max(0) as u64))
            .collect())
    }

    /// Records that a node's agent opened a session: ready, with its inventory and version.
    pub async fn record_node_connected(
        &self,
        id: &str,
        agent_version: &str,
        inventory_json: &str,
        applied_generation: u64,
        now: UnixSeconds,
    ) -> Result<NodeRecord, DbError> {
        let changed = node::Entity::update_many()
            .col_expr(node::Column::State, Expr::value(NodeState::Ready.as_str()))
            .col_expr(node::Column::StateChangedAt, Expr::value(now))
            .col_expr(node::Column::AgentVersion, Expr::value(agent_version))
            .col_expr(node::Column::Inventory, Expr::value(inventory_json))
            .col_expr(
                node::Column::AppliedGeneration,
                Expr::value(to_i64(applied_generation)),
            )
            .filter(node::Column::Id.eq(id))
            .exec(&self.db)
            .await?
            .rows_affected;
        self.count_write();
        if changed == 0 {
            return Err(DbError::NotFound(format!("node {id}")));
        }
        self.get_node(id)
            .await?
            .ok_or_else(|| DbError::NotFound(format!("node {id}")))
    }

    /// Marks a node unavailable; a no-op (and no write) if it already is.
    pub async fn record_node_unavailable(
        &self,
        id: &str,
        now: UnixSeconds,
    ) -> Result<bool, DbError> {
        let changed = node::Entity::update_many()
            .col_expr(
                node::Column::State,
                Expr::value(NodeState::Unavailable.as_str()),
            )
            .col_expr(node::Column::StateChangedAt, Expr::value(now))
            .filter(node::Column::Id.eq(id))
            .filter(node::Column::State.ne(NodeState::Unavailable.as_str()))
            .exec(&self.db)
            .await?
            .rows_affected;
        if changed > 0 {
            self.count_write();
        }
        Ok(changed > 0)
    }

    /// At start no session exists yet, so no node can be ready.
    pub async fn mark_all_nodes_unavailable(&self, now: UnixSeconds) -> Result<u64, DbError> {
        let changed = node::Entity::update_many()
            .col_expr(
                node::Column::State,
                Expr::value(NodeState::Unavailable.as_str()),
            )
            .col_expr(node::Column::StateChangedAt, Expr::value(now))
            .filter(node::Column::State.ne(NodeState::Unavailable.as_str()))
            .exec(&self.db)
            .await?
            .rows_affected;
        self.count_write();
        Ok(changed)
    }

    pub async fn record_inventory(&self, id: &str, inventory_json: &str) -> Result<(), DbError> {
        node::Entity::update_many()
            .col_expr(node::Column::Inventory, Expr::value(inventory_json))
            .filter(node::Column::Id.eq(id))
            .exec(&self.db)
            .await?;
        self.count_write();
        Ok(())
    }

    /// Stores the generation an agent acknowledged; only ever moves forward.
    pub async fn record_applied_generation(
        &self,
        id: &str,
        generation: u64,
    ) -> Result<bool, DbError> {
        let changed = node::Entity::update_many()
            .col_expr(
                node::Column::AppliedGeneration,
                Expr::value(to_i64(generation)),
            )
            .filter(node::Column::Id.eq(id))
            .filter(node::Column::AppliedGeneration.lt(to_i64(generation)))
            .exec(&self.db)
            .await?
            .rows_affected;
        if changed > 0 {
            self.count_write();
        }
        Ok(changed > 0)
    }

    /// Sets cordon and drain flags. When the desired state an agent sees changes (the drain
    /// flag), the desired generation is bumped in the same write.
    pub async fn set_node_scheduling(
        &self,
        id: &str,
        cordoned: bool,
        draining: bool,
        audit: NewAuditEvent,
    ) -> Result<NodeRecord, DbError> {
        let txn = self.begin_audited().await?;
        let current = node::Entity::find_by_id(id)
            .one(&*txn)
            .await?
            .ok_or_else(|| DbError::NotFound(format!("node {id}")))?;
        if current.cordoned == cordoned && current.draining == draining {
            return node_record(current);
        }
        // The bump adds to the stored generation in the write itself: a placement storing a
        // new assignment meanwhile (which bumps it too) then cannot leave two different
        // desired states under one generation.
        let bump = i64::from(current.draining != draining);
        node::Entity::update_many()
            .col_expr(node::Column::Cordoned, Expr::value(cordoned))
            .col_expr(node::Column::Draining, Expr::value(draining))
            .col_expr(
                node::Column::DesiredGeneration,
                sea_orm::sea_query::ExprTrait::add(
                    Expr::col(node::Column::DesiredGeneration),
                    bump,
                ),
            )
            .filter(node::Column::Id.eq(id))
            .exec(&*txn)
            .await?;
        let updated = node::Entity::find_by_id(id)
            .one(&*txn)
            .await?
            .ok_or_else(|| DbError::NotFound(format!("node {id}")))?;
        txn.commit(Some(audit)).await?;
        node_record(updated)
    }

    pub async fn record_certificate(
        &self,
        id: &str,
        serial: &str,
        not_after: UnixSeconds,
        audit: NewAuditEvent,
    ) -> Result<(), DbError> {
        let txn = self.begin_audited().await?;
        node::Entity::update_many()
            .col_expr(node::Column::CertificateSerial, Expr::value(serial))
            .col_expr(node::Column::CertificateNotAfter, Expr::value(not_after))
            .filter(node::Column::Id.eq(id))
            .exec(&*txn)
            .await?;
        txn.commit(Some(audit)).await?;
        Ok(())
    }

    // ---- audit log -------------------------------------------------------------------

    /// Appends one event on its own (for outcomes that change no other state, such as a
    /// refused enrollment).
    pub async fn append_audit(&self, event: NewAuditEvent) -> Result<AuditRecord, DbError> {
        let txn = self.begin_audited().await?;
        txn.commit(Some(event))
            .await?
            .ok_or_else(|| DbError::NotFound("the appended audit event".into()))
    }

    /// Every audit event in order.
    pub async fn audit_events(&self) -> Result<Vec<AuditRecord>, DbError> {
        Ok(audit_event::Entity::find()
            .order_by_asc(audit_event::Column::Seq)
            .all(&self.db)
            .await?
            .into_iter()
            .map(audit_record)
            .collect())
    }

    /// Starts a transaction that may append to the audit log; see [`AuditedTxn`].
    pub(crate) async fn begin_audited(&self) -> Result<AuditedTxn<'_>, DbError> {
        let chain = self.audit_lock.lock().await;
        // SQLite: take the write lock at BEGIN. A deferred transaction that reads and then
        // writes fails at once (SQLITE_BUSY_SNAPSHOT) when another connection committed in
        // between, e.g. a session recording an applied generation; an immediate one waits.
        let options = sea_orm::TransactionOptions {
            sqlite_transaction_mode: Some(sea_orm::SqliteTransactionMode::Immediate),
            ..Default::default()
        };
        let txn = self.db.begin_with_options(options).await?;
        Ok(AuditedTxn {
            txn,
            _chain: chain,
            store: self,
        })
    }

    /// Callers hold `audit_lock` for the whole transaction.
    async fn append_audit_in(
        &self,
        txn: &DatabaseTransaction,
        event: NewAuditEvent,
    ) -> Result<AuditRecord, DbError> {
        let last = audit_event::Entity::find()
            .order_by_desc(audit_event::Column::Seq)
            .one(txn)
            .await?;
        let (seq, prev_hash) = match last {
            Some(last) => (last.seq + 1, last.hash),
            None => (1, GENESIS_HASH.to_owned()),
        };
        let mut record = AuditRecord {
            seq,
            at: event.at,
            actor: event.actor,
            action: event.action,
            target: event.target,
            outcome: event.outcome,
            details: event.details.to_string(),
            prev_hash,
            hash: String::new(),
        };
        record.hash = record.chain_hash();
        audit_event::ActiveModel {
            seq: Set(record.seq),
            at: Set(record.at),
            actor: Set(record.actor.clone()),
            action: Set(record.action.clone()),
            target: Set(record.target.clone()),
            outcome: Set(record.outcome.clone()),
            details: Set(record.details.clone()),
            prev_hash: Set(record.prev_hash.clone()),
            hash: Set(record.hash.clone()),
        }
        .insert(txn)
        .await?;
        Ok(record)
    }
}

/// A write transaction holding the audit lock from its start to its commit, so the state it
/// changes and the audit event describing it land together and the chain stays linear.
pub(crate) struct AuditedTxn<'a> {
    txn: DatabaseTransaction,
    _chain: tokio::sync::MutexGuard<'a, ()>,
    store: &'a Store,
}

impl std::ops::Deref for AuditedTxn<'_> {
    type Target = DatabaseTransaction;

    fn deref(&self) -> &DatabaseTransaction {
        &self.txn
    }
}

impl AuditedTxn<'_> {
    /// Appends `event` (if any) and commits. Dropping instead rolls everything back.
    pub(crate) async fn commit(
        self,
        event: Option<NewAuditEvent>,
    ) -> Result<Option<AuditRecord>, DbError> {
        let record = match event {
            Some(event) => Some(self.store.append_audit_in(&self.txn, event).await?),
            None => None,
        };
        self.txn.commit().await?;
        self.store.count_write();
        Ok(record)
    }

    /// Appends `events` in order and commits.
    pub(crate) async fn commit_all(self, events: Vec<NewAuditEvent>) -> Result<(), DbError> {
        for event in events {
            self.store.append_audit_in(&self.txn, event).await?;
        }
        self.txn.commit().await?;
        self.store.count_write();
        Ok(())
    }
}

async fn unique_node_name(
    txn: &DatabaseTransaction,
    requested: &str,
    id: &str,
) -> Result<String, DbError> {
    let base = if requested.trim().is_empty() {
        format!("node-{}", &id[..8.min(id.len())])
    } else {
        requested.trim().to_owned()
    };
    let mut candidate = base.clone();
    for attempt in 0.. {
        let taken = node::Entity::find()
            .filter(node::Column::Name.eq(candidate.as_str()))
            .one(txn)
            .await?
            .is_some();
        if !taken {
            break;
        }
        candidate = if attempt == 0 {
            format!("{base}-{}", &id[..6.min(id.len())])
        } else {
            format!("{base}-{}-{attempt}", &id[..6.min(id.len())])
        };
    }
    Ok(candidate)
}

pub(crate) fn audit_record(m: audit_event::Model) -> AuditRecord {
    AuditRecord {
        seq: m.seq,
        at: m.at,
        actor: m.actor,
        action: m.action,
        target: m.target,
        outcome: m.outcome,
        details: m.details,
        prev_hash: m.prev_hash,
        hash: m.hash,
    }
}

fn token_record(m: enrollment_token::Model) -> EnrollmentTokenRecord {
    EnrollmentTokenRecord {
        id: m.id,
        secret_hash: m.secret_hash,
        description: m.description,
        created_by: m.created_by,
        created_at: m.created_at,
        expires_at: m.expires_at,
        used_at: m.used_at,
        used_by_node_id: m.used_by_node_id,
        revoked_at: m.revoked_at,
    }
}

pub(crate) fn node_record(m: node::Model) -> Result<NodeRecord, DbError> {
    let state = NodeState::parse(&m.state).ok_or_else(|| DbError::Corrupt {
        what: "node state",
        detail: format!("node {} has state `{}`", m.id, m.state),
    })?;
    let labels = serde_json::from_str(&m.labels).map_err(|e| DbError::Corrupt {
        what: "node labels",
        detail: format!("node {}: {e}", m.id),
    })?;
    let desired_models = serde_json::from_str(&m.desired_models).map_err(|e| DbError::Corrupt {
        what: "node desired models",
        detail: format!("node {}: {e}", m.id),
    })?;
    Ok(NodeRecord {
        desired_models,
        id: m.id,
        name: m.name,
        state,
        cordoned: m.cordoned,
        draining: m.draining,
        labels,
        agent_version: m.agent_version,
        inventory_json: m.inventory,
        desired_generation: m.desired_generation.max(0) as u64,
        applied_generation: m.applied_generation.max(0) as u64,
        enrolled_at: m.enrolled_at,
        state_changed_at: m.state_changed_at,
        certificate_serial: m.certificate_serial,
        certificate_not_after: m.certificate_not_after,
    })
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Drops a password from a database URL before it is shown in an error.
pub(crate) fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_from_database_urls() {
        assert_eq!(
            redact_url("postgres://steward:hunter2@db:5432/steward"),
            "postgres://steward:***@db:5432/steward"
        );
        assert_eq!(
            redact_url("postgres://postgres@127.0.0.1/x"),
            "postgres://postgres@127.0.0.1/x"
        );
        assert_eq!(redact_url("sqlite:///tmp/a.db"), "sqlite:///tmp/a.db");
    }
}
