//! Sandboxes and their commands. A sandbox is a job row of kind SANDBOX (placement, slot,
//! lease, fencing and lock key are the job's); each of its commands is a job row of kind
//! COMMAND whose `parent_id` is the sandbox, run under an attempt whose `parent_lease` is the
//! sandbox's lease (it lives and dies with that lease instead of being heartbeated). What only
//! a sandbox has (its idle timeout, one-shot, activity, idempotency key) is in `sandboxes`;
//! what only a command has (its number in the sandbox, stdin, idempotency key) in
//! `sandbox_commands`.
use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden, Clone, Copy)]
enum Jobs {
    Table,
    Id,
    Kind,
    ParentId,
}

#[derive(DeriveIden, Clone, Copy)]
enum Attempts {
    Table,
    ParentLease,
}

#[derive(DeriveIden, Clone, Copy)]
enum Sandboxes {
    Table,
    Id,
    IdleTimeoutMs,
    OneShot,
    LastActivityAt,
    CommandCount,
    Starting,
    IdempotencyKey,
}

#[derive(DeriveIden, Clone, Copy)]
enum SandboxCommands {
    Table,
    Id,
    SandboxId,
    Number,
    Stdin,
    IdempotencyKey,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let columns = [
            Table::alter()
                .table(Jobs::Table)
                .add_column(integer(Jobs::Kind).default(0))
                .to_owned(),
            Table::alter()
                .table(Jobs::Table)
                .add_column(uuid_null(Jobs::ParentId))
                .to_owned(),
            Table::alter()
                .table(Attempts::Table)
                .add_column(uuid_null(Attempts::ParentLease))
                .to_owned(),
        ];
        for alter in columns {
            manager.alter_table(alter).await?;
        }
        manager
            .create_index(
                Index::create()
                    .name("idx_jobs_parent")
                    .table(Jobs::Table)
                    .col(Jobs::ParentId)
                    .col(Jobs::Id)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Sandboxes::Table)
                    .col(uuid(Sandboxes::Id).primary_key())
                    .col(big_integer(Sandboxes::IdleTimeoutMs))
                    .col(boolean(Sandboxes::OneShot))
                    .col(big_integer(Sandboxes::LastActivityAt))
                    .col(integer(Sandboxes::CommandCount))
                    .col(boolean(Sandboxes::Starting))
                    .col(string_len_null(Sandboxes::IdempotencyKey, 255))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_sandboxes_idempotency")
                    .table(Sandboxes::Table)
                    .col(Sandboxes::IdempotencyKey)
                    .unique()
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(SandboxCommands::Table)
                    .col(uuid(SandboxCommands::Id).primary_key())
                    .col(uuid(SandboxCommands::SandboxId))
                    .col(integer(SandboxCommands::Number))
                    .col(blob(SandboxCommands::Stdin))
                    .col(string_len_null(SandboxCommands::IdempotencyKey, 255))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_sandbox_commands_number")
                    .table(SandboxCommands::Table)
                    .col(SandboxCommands::SandboxId)
                    .col(SandboxCommands::Number)
                    .unique()
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_sandbox_commands_key")
                    .table(SandboxCommands::Table)
                    .col(SandboxCommands::SandboxId)
                    .col(SandboxCommands::IdempotencyKey)
                    .unique()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(SandboxCommands::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(Sandboxes::Table).to_owned())
            .await?;
        manager
            .drop_index(
                Index::drop()
                    .name("idx_jobs_parent")
                    .table(Jobs::Table)
                    .to_owned(),
            )
            .await?;
        let columns = [
            Table::alter()
                .table(Attempts::Table)
                .drop_column(Attempts::ParentLease)
                .to_owned(),
            Table::alter()
                .table(Jobs::Table)
                .drop_column(Jobs::ParentId)
                .to_owned(),
            Table::alter()
                .table(Jobs::Table)
                .drop_column(Jobs::Kind)
                .to_owned(),
        ];
        for alter in columns {
            manager.alter_table(alter).await?;
        }
        Ok(())
    }
}
