//! Persistence: connects to SQLite (embedded, WAL) or PostgreSQL, runs the migrations at
//! start-up, and hands out write transactions.
//!
//! SQLite allows one writer at a time; rather than letting concurrent transactions fail
//! with SQLITE_BUSY when a read lock must be upgraded, writers queue on an in-process gate.
//! PostgreSQL needs no gate: rows are locked with `FOR UPDATE` (and `SKIP LOCKED` for claims).
use std::{sync::Arc, time::Duration};

use sea_orm::{
    ConnectOptions, Database, DatabaseConnection, DatabaseTransaction, DbBackend, TransactionTrait,
};
use sea_orm_migration::MigratorTrait;
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::error::{Error, Result};

pub mod entity;
mod m20261121_000001_initial;
mod m20261121_000002_dispatch_order;

/// The migrations, in order; applied at start-up.
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn sea_orm_migration::MigrationTrait>> {
        vec![
            Box::new(m20261121_000001_initial::Migration),
            Box::new(m20261121_000002_dispatch_order::Migration),
        ]
    }
}

/// The database, shared by every service and background task.
#[derive(Clone)]
pub struct Store {
    /// Connection pool.
    db: DatabaseConnection,
    /// Serialises writers on SQLite; `None` on PostgreSQL.
    write_gate: Option<Arc<Mutex<()>>>,
}

/// A write transaction; on SQLite it also holds the write gate until commit or drop.
pub struct WriteTxn {
    /// The open transaction.
    pub txn: DatabaseTransaction,
    _gate: Option<OwnedMutexGuard<()>>,
}

impl WriteTxn {
    /// Commits, then releases the gate.
    pub async fn commit(self) -> Result<()> {
        self.txn.commit().await?;
        Ok(())
    }
}

impl Store {
    /// Connects to `url` (`sqlite://path?mode=rwc` or `postgres://…`) and migrates.
    pub async fn connect(url: &str) -> Result<Store> {
        let postgres = url.starts_with("postgres://") || url.starts_with("postgresql://");
        let sqlite = url.starts_with("sqlite:");
        if !postgres && !sqlite {
            return Err(Error::invalid(
                "database_url",
                "must start with sqlite: or postgres://",
            ));
        }
        let mut opts = ConnectOptions::new(url.to_string());
        opts.sqlx_logging(false)
            .connect_timeout(Duration::from_secs(10))
            .acquire_timeout(Duration::from_secs(10));
        if sqlite {
            use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
            opts.max_connections(8).min_connections(1);
            opts.map_sqlx_sqlite_opts(|o| {
                o.journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal)
                    .busy_timeout(Duration::from_secs(10))
                    .create_if_missing(true)
            });
        } else {
            opts.max_connections(16).min_connections(1);
        }
        let db = Database::connect(opts).await?;
        Migrator::up(&db, None).await?;
        Ok(Store {
            db,
            write_gate: sqlite.then(|| Arc::new(Mutex::new(()))),
        })
    }

    /// The pool, for reads.
    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Whether this is PostgreSQL (row locks, LISTEN/NOTIFY).
    pub fn is_postgres(&self) -> bool {
        self.db.get_database_backend() == DbBackend::Postgres
    }

    /// Opens a write transaction (waiting for the gate on SQLite).
    pub async fn write(&self) -> Result<WriteTxn> {
        let gate = match &self.write_gate {
            Some(gate) => Some(gate.clone().lock_owned().await),
            None => None,
        };
        let txn = self.db.begin().await?;
        Ok(WriteTxn { txn, _gate: gate })
    }

    /// Answers whether the database responds (for health).
    pub async fn ping(&self) -> bool {
        self.db.ping().await.is_ok()
    }

    /// Closes the pool.
    pub async fn close(self) {
        if let Err(e) = self.db.close().await {
            tracing::warn!(error = %e, "closing the database pool");
        }
    }
}
