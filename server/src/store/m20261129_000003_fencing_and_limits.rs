//! Columns the reshaped core needs: a runner's session epoch (a newer session fences an older
//! one) and the time its credential was revoked (deregistration); an attempt's cancel
//! deadline (the reaper finds unconfirmed cancels by index, grace included) and whether its
//! log reached the per-job limit; a job's stored log bytes and whether its events reached the per-job limit. Indexes
//! for the reaper's two other scans: attempts past their deadline, and unconfirmed cancels.
use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden, Clone, Copy)]
enum Runners {
    Table,
    SessionEpoch,
    RevokedAt,
}

#[derive(DeriveIden, Clone, Copy)]
enum Attempts {
    Table,
    FinishedAt,
    DeadlineAt,
    CancelDeadlineAt,
    LogCapped,
}

#[derive(DeriveIden, Clone, Copy)]
enum Jobs {
    Table,
    LogBytes,
    EventsCapped,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite alters one thing at a time.
        let columns = [
            Table::alter()
                .table(Runners::Table)
                .add_column(big_integer(Runners::SessionEpoch).default(0))
                .to_owned(),
            Table::alter()
                .table(Runners::Table)
                .add_column(big_integer_null(Runners::RevokedAt))
                .to_owned(),
            Table::alter()
                .table(Attempts::Table)
                .add_column(big_integer_null(Attempts::CancelDeadlineAt))
                .to_owned(),
            Table::alter()
                .table(Attempts::Table)
                .add_column(boolean(Attempts::LogCapped).default(false))
                .to_owned(),
            Table::alter()
                .table(Jobs::Table)
                .add_column(big_integer(Jobs::LogBytes).default(0))
                .to_owned(),
            Table::alter()
                .table(Jobs::Table)
                .add_column(boolean(Jobs::EventsCapped).default(false))
                .to_owned(),
        ];
        for alter in columns {
            manager.alter_table(alter).await?;
        }
        manager
            .create_index(
                Index::create()
                    .name("idx_attempts_deadline")
                    .table(Attempts::Table)
                    .col(Attempts::FinishedAt)
                    .col(Attempts::DeadlineAt)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_attempts_cancel")
                    .table(Attempts::Table)
                    .col(Attempts::FinishedAt)
                    .col(Attempts::CancelDeadlineAt)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for name in ["idx_attempts_cancel", "idx_attempts_deadline"] {
            manager
                .drop_index(Index::drop().name(name).table(Attempts::Table).to_owned())
                .await?;
        }
        let columns = [
            Table::alter()
                .table(Jobs::Table)
                .drop_column(Jobs::EventsCapped)
                .to_owned(),
            Table::alter()
                .table(Jobs::Table)
                .drop_column(Jobs::LogBytes)
                .to_owned(),
            Table::alter()
                .table(Attempts::Table)
                .drop_column(Attempts::LogCapped)
                .to_owned(),
            Table::alter()
                .table(Attempts::Table)
                .drop_column(Attempts::CancelDeadlineAt)
                .to_owned(),
            Table::alter()
                .table(Runners::Table)
                .drop_column(Runners::RevokedAt)
                .to_owned(),
            Table::alter()
                .table(Runners::Table)
                .drop_column(Runners::SessionEpoch)
                .to_owned(),
        ];
        for alter in columns {
            manager.alter_table(alter).await?;
        }
        Ok(())
    }
}
