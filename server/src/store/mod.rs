//! Persistence: connects to SQLite (embedded, WAL) or PostgreSQL, runs the migrations at
//! start-up, and hands out write transactions.
//!
//! SQLite allows one writer at a time; rather than letting concurrent transactions fail
//! with SQLITE_BUSY when a read lock must be upgraded, writers queue on an in-process gate.
//! PostgreSQL needs no gate: rows are locked with `FOR UPDATE` (and `SKIP LOCKED` for claims).
//!
//! Durability: the server acknowledges a report to its runner once its transaction has
//! committed, and the runner then forgets it. So a commit must survive a power loss: SQLite
//! runs with `synchronous=FULL` (every commit reaches the disk) unless the operator chooses
//! `NORMAL` (`--sqlite-synchronous normal`: faster, but a power loss — not a crash of the
//! process — can lose the last commits, reports the runners have already dropped).
use std::{sync::Arc, time::Duration};

use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction, DbBackend,
    Statement, TransactionTrait,
};
use sea_orm_migration::MigratorTrait;
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::error::{Error, Result};

pub mod entity;
mod m20261121_000001_initial;
mod m20261121_000002_dispatch_order;
mod m20261129_000003_fencing_and_limits;
mod m20261129_000004_sandboxes;
mod m20261129_000005_work_data;

/// The migrations, in order; applied at start-up.
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn sea_orm_migration::MigrationTrait>> {
        vec![
            Box::new(m20261121_000001_initial::Migration),
            Box::new(m20261121_000002_dispatch_order::Migration),
            Box::new(m20261129_000003_fencing_and_limits::Migration),
            Box::new(m20261129_000004_sandboxes::Migration),
            Box::new(m20261129_000005_work_data::Migration),
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

/// How SQLite commits (`PRAGMA synchronous`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SqliteSync {
    /// Every commit is on disk before it is acknowledged: nothing acknowledged is lost to a
    /// power loss.
    #[default]
    Full,
    /// WAL commits reach the disk at checkpoints: faster; a power loss can lose the last
    /// commits (a process crash cannot).
    Normal,
}

impl Store {
    /// Connects to `url` (`sqlite://path?mode=rwc` or `postgres://…`) and migrates, with
    /// SQLite's safe commit mode.
    pub async fn connect(url: &str) -> Result<Store> {
        Store::connect_with(url, SqliteSync::Full).await
    }

    /// A private in-memory SQLite database, migrated (unit tests).
    pub async fn memory() -> Result<Store> {
        let mut opts = ConnectOptions::new("sqlite::memory:".to_string());
        // One connection: every statement sees the same in-memory database.
        opts.sqlx_logging(false)
            .max_connections(1)
            .min_connections(1);
        let db = Database::connect(opts).await?;
        Migrator::up(&db, None).await?;
        Ok(Store {
            db,
            write_gate: None,
        })
    }

    /// Connects to `url` and migrates; `sync` says how SQLite commits.
    pub async fn connect_with(url: &str, sync: SqliteSync) -> Result<Store> {
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
            opts.map_sqlx_sqlite_opts(move |o| {
                o.journal_mode(SqliteJournalMode::Wal)
                    .synchronous(match sync {
                        SqliteSync::Full => SqliteSynchronous::Full,
                        SqliteSync::Normal => SqliteSynchronous::Normal,
                    })
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

    /// The database server's clock, Unix ms (see [`crate::clock`]).
    pub async fn database_time_ms(&self) -> Result<i64> {
        let sql = if self.is_postgres() {
            "SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT) AS t"
        } else {
            "SELECT CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER) AS t"
        };
        let row = self
            .db
            .query_one_raw(Statement::from_string(self.db.get_database_backend(), sql))
            .await?
            .ok_or_else(|| Error::Internal("the database did not tell its time".into()))?;
        Ok(row.try_get::<i64>("", "t")?)
    }

    /// SQLite's `PRAGMA synchronous` on the pool's connections (0 OFF, 1 NORMAL, 2 FULL);
    /// `None` on PostgreSQL.
    pub async fn sqlite_synchronous(&self) -> Result<Option<i64>> {
        if self.is_postgres() {
            return Ok(None);
        }
        let row = self
            .db
            .query_one_raw(Statement::from_string(
                DbBackend::Sqlite,
                "PRAGMA synchronous",
            ))
            .await?
            .ok_or_else(|| Error::Internal("PRAGMA synchronous answered nothing".into()))?;
        Ok(Some(row.try_get_by_index::<i64>(0)?))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sqlite_commits_reach_the_disk_unless_the_operator_says_otherwise() {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = |name: &str| format!("sqlite://{}?mode=rwc", dir.path().join(name).display());
        let safe = Store::connect(&url("full.db")).await.expect("open");
        assert_eq!(safe.sqlite_synchronous().await.expect("pragma"), Some(2));
        let fast = Store::connect_with(&url("normal.db"), SqliteSync::Normal)
            .await
            .expect("open");
        assert_eq!(fast.sqlite_synchronous().await.expect("pragma"), Some(1));
        // And the server's own default is the safe one.
        assert_eq!(
            crate::Config::with_database("sqlite::memory:").sqlite_synchronous,
            SqliteSync::Full
        );
    }
}
