//! The initial schema: jobs, their labels, attempts, events, log chunks, runners,
//! commands and locks, with the indexes the scheduler and the reaper query by.
use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden, Clone, Copy)]
enum Jobs {
    Table,
    Id,
    Status,
    Queue,
    Priority,
    Executor,
    LockKey,
    IdempotencyKey,
    Spec,
    AttemptCount,
    MaxAttempts,
    CurrentLease,
    RunnerId,
    FailureKind,
    FailureMessage,
    ExitCode,
    Progress,
    EventSeq,
    NotBefore,
    CreatedAt,
    UpdatedAt,
    FinishedAt,
    RetriedFrom,
}

#[derive(DeriveIden, Clone, Copy)]
enum JobLabels {
    Table,
    JobId,
    Key,
    Value,
}

#[derive(DeriveIden, Clone, Copy)]
enum Attempts {
    Table,
    LeaseId,
    JobId,
    Number,
    RunnerId,
    Status,
    LeaseExpiresAt,
    DeadlineAt,
    AssignedAt,
    StartedAt,
    FinishedAt,
    ContainerId,
    ExitCode,
    FailureKind,
    FailureMessage,
    AckedSeq,
    StdoutLen,
    StderrLen,
}

#[derive(DeriveIden, Clone, Copy)]
enum JobEvents {
    Table,
    JobId,
    Seq,
    Attempt,
    At,
    Body,
}

#[derive(DeriveIden, Clone, Copy)]
enum LogChunks {
    Table,
    Id,
    JobId,
    Attempt,
    Stream,
    Offset,
    Data,
    At,
}

#[derive(DeriveIden, Clone, Copy)]
enum Runners {
    Table,
    Id,
    Name,
    Info,
    Capacity,
    CredentialHash,
    State,
    LastHeartbeat,
    RegisteredAt,
    CommandSeq,
    AckedCommandSeq,
}

#[derive(DeriveIden, Clone, Copy)]
enum Commands {
    Table,
    RunnerId,
    Seq,
    CreatedAt,
    Body,
}

#[derive(DeriveIden, Clone, Copy)]
enum Locks {
    Table,
    LockKey,
    JobId,
    LeaseId,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Jobs::Table)
                    .col(pk_uuid(Jobs::Id))
                    .col(integer(Jobs::Status))
                    .col(string(Jobs::Queue))
                    .col(integer(Jobs::Priority))
                    .col(integer(Jobs::Executor))
                    .col(string_null(Jobs::LockKey))
                    .col(string_null(Jobs::IdempotencyKey).unique_key())
                    .col(blob(Jobs::Spec))
                    .col(integer(Jobs::AttemptCount))
                    .col(integer(Jobs::MaxAttempts))
                    .col(uuid_null(Jobs::CurrentLease))
                    .col(uuid_null(Jobs::RunnerId))
                    .col(integer(Jobs::FailureKind))
                    .col(text(Jobs::FailureMessage))
                    .col(integer_null(Jobs::ExitCode))
                    .col(blob_null(Jobs::Progress))
                    .col(big_integer(Jobs::EventSeq))
                    .col(big_integer(Jobs::NotBefore))
                    .col(big_integer(Jobs::CreatedAt))
                    .col(big_integer(Jobs::UpdatedAt))
                    .col(big_integer_null(Jobs::FinishedAt))
                    .col(uuid_null(Jobs::RetriedFrom))
                    .to_owned(),
            )
            .await?;
        // Dispatch: queued jobs of a queue by priority, then age.
        index(
            manager,
            "idx_jobs_dispatch",
            Jobs::Table,
            &[Jobs::Status, Jobs::Queue, Jobs::Priority, Jobs::Id],
        )
        .await?;
        index(manager, "idx_jobs_runner", Jobs::Table, &[Jobs::RunnerId]).await?;
        index(
            manager,
            "idx_jobs_finished",
            Jobs::Table,
            &[Jobs::FinishedAt],
        )
        .await?;

        manager
            .create_table(
                Table::create()
                    .table(JobLabels::Table)
                    .col(uuid(JobLabels::JobId))
                    .col(string(JobLabels::Key))
                    .col(string(JobLabels::Value))
                    .primary_key(Index::create().col(JobLabels::JobId).col(JobLabels::Key))
                    .to_owned(),
            )
            .await?;
        index(
            manager,
            "idx_job_labels_kv",
            JobLabels::Table,
            &[JobLabels::Key, JobLabels::Value],
        )
        .await?;

        manager
            .create_table(
                Table::create()
                    .table(Attempts::Table)
                    .col(pk_uuid(Attempts::LeaseId))
                    .col(uuid(Attempts::JobId))
                    .col(integer(Attempts::Number))
                    .col(uuid(Attempts::RunnerId))
                    .col(integer(Attempts::Status))
                    .col(big_integer(Attempts::LeaseExpiresAt))
                    .col(big_integer(Attempts::DeadlineAt))
                    .col(big_integer(Attempts::AssignedAt))
                    .col(big_integer_null(Attempts::StartedAt))
                    .col(big_integer_null(Attempts::FinishedAt))
                    .col(string(Attempts::ContainerId))
                    .col(integer_null(Attempts::ExitCode))
                    .col(integer(Attempts::FailureKind))
                    .col(text(Attempts::FailureMessage))
                    .col(big_integer(Attempts::AckedSeq))
                    .col(big_integer(Attempts::StdoutLen))
                    .col(big_integer(Attempts::StderrLen))
                    .to_owned(),
            )
            .await?;
        index(
            manager,
            "idx_attempts_job",
            Attempts::Table,
            &[Attempts::JobId, Attempts::Number],
        )
        .await?;
        index(
            manager,
            "idx_attempts_runner",
            Attempts::Table,
            &[Attempts::RunnerId, Attempts::FinishedAt],
        )
        .await?;
        index(
            manager,
            "idx_attempts_lease",
            Attempts::Table,
            &[Attempts::FinishedAt, Attempts::LeaseExpiresAt],
        )
        .await?;

        manager
            .create_table(
                Table::create()
                    .table(JobEvents::Table)
                    .col(uuid(JobEvents::JobId))
                    .col(big_integer(JobEvents::Seq))
                    .col(integer(JobEvents::Attempt))
                    .col(big_integer(JobEvents::At))
                    .col(blob(JobEvents::Body))
                    .primary_key(Index::create().col(JobEvents::JobId).col(JobEvents::Seq))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(LogChunks::Table)
                    .col(big_pk_auto(LogChunks::Id))
                    .col(uuid(LogChunks::JobId))
                    .col(integer(LogChunks::Attempt))
                    .col(integer(LogChunks::Stream))
                    .col(big_integer(LogChunks::Offset))
                    .col(blob(LogChunks::Data))
                    .col(big_integer(LogChunks::At))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_log_chunks_addr")
                    .table(LogChunks::Table)
                    .col(LogChunks::JobId)
                    .col(LogChunks::Attempt)
                    .col(LogChunks::Stream)
                    .col(LogChunks::Offset)
                    .unique()
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Runners::Table)
                    .col(pk_uuid(Runners::Id))
                    .col(string(Runners::Name))
                    .col(blob(Runners::Info))
                    .col(integer(Runners::Capacity))
                    .col(string(Runners::CredentialHash))
                    .col(integer(Runners::State))
                    .col(big_integer(Runners::LastHeartbeat))
                    .col(big_integer(Runners::RegisteredAt))
                    .col(big_integer(Runners::CommandSeq))
                    .col(big_integer(Runners::AckedCommandSeq))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Commands::Table)
                    .col(uuid(Commands::RunnerId))
                    .col(big_integer(Commands::Seq))
                    .col(big_integer(Commands::CreatedAt))
                    .col(blob(Commands::Body))
                    .primary_key(Index::create().col(Commands::RunnerId).col(Commands::Seq))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Locks::Table)
                    .col(string(Locks::LockKey).primary_key())
                    .col(uuid(Locks::JobId))
                    .col(uuid(Locks::LeaseId))
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            Locks::Table.into_iden(),
            Commands::Table.into_iden(),
            Runners::Table.into_iden(),
            LogChunks::Table.into_iden(),
            JobEvents::Table.into_iden(),
            Attempts::Table.into_iden(),
            JobLabels::Table.into_iden(),
            Jobs::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).to_owned())
                .await?;
        }
        Ok(())
    }
}

async fn index<T: Iden + Copy + 'static, C: Iden + Copy + 'static>(
    manager: &SchemaManager<'_>,
    name: &str,
    table: T,
    cols: &[C],
) -> Result<(), DbErr> {
    let mut stmt = Index::create();
    stmt.name(name).table(table);
    for col in cols {
        stmt.col(*col);
    }
    manager.create_index(stmt.to_owned()).await
}
