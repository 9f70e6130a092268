//! Data in and out of work: each attempt's work token (its SHA-256 hash only), the parent of
//! a job submitted by another job's work, results, and the blob store's metadata — blobs by
//! digest, and what names them: artifacts, and the blob inputs of jobs. Blob bytes live in
//! the blob store, not here.
use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden, Clone, Copy)]
enum Jobs {
    Table,
    Id,
    ParentJob,
}

#[derive(DeriveIden, Clone, Copy)]
enum Attempts {
    Table,
    WorkTokenHash,
}

#[derive(DeriveIden, Clone, Copy)]
enum JobResults {
    Table,
    JobId,
    Attempt,
    ContentType,
    Data,
    SetAt,
}

#[derive(DeriveIden, Clone, Copy)]
enum Blobs {
    Table,
    Digest,
    Size,
    CreatedAt,
    LastUsedAt,
}

#[derive(DeriveIden, Clone, Copy)]
enum Artifacts {
    Table,
    JobId,
    Name,
    Attempt,
    Digest,
    Size,
    CreatedAt,
}

#[derive(DeriveIden, Clone, Copy)]
enum JobInputs {
    Table,
    JobId,
    Idx,
    Digest,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let columns = [
            Table::alter()
                .table(Jobs::Table)
                .add_column(uuid_null(Jobs::ParentJob))
                .to_owned(),
            Table::alter()
                .table(Attempts::Table)
                .add_column(string_len_null(Attempts::WorkTokenHash, 64))
                .to_owned(),
        ];
        for alter in columns {
            manager.alter_table(alter).await?;
        }
        manager
            .create_index(
                Index::create()
                    .name("idx_jobs_parent_job")
                    .table(Jobs::Table)
                    .col(Jobs::ParentJob)
                    .col(Jobs::Id)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(JobResults::Table)
                    .col(uuid(JobResults::JobId).primary_key())
                    .col(integer(JobResults::Attempt))
                    .col(string_len(JobResults::ContentType, 255))
                    .col(blob(JobResults::Data))
                    .col(big_integer(JobResults::SetAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Blobs::Table)
                    .col(string_len(Blobs::Digest, 71).primary_key())
                    .col(big_integer(Blobs::Size))
                    .col(big_integer(Blobs::CreatedAt))
                    .col(big_integer(Blobs::LastUsedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Artifacts::Table)
                    .col(uuid(Artifacts::JobId))
                    .col(string_len(Artifacts::Name, 1024))
                    .col(integer(Artifacts::Attempt))
                    .col(string_len(Artifacts::Digest, 71))
                    .col(big_integer(Artifacts::Size))
                    .col(big_integer(Artifacts::CreatedAt))
                    .primary_key(Index::create().col(Artifacts::JobId).col(Artifacts::Name))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_artifacts_digest")
                    .table(Artifacts::Table)
                    .col(Artifacts::Digest)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(JobInputs::Table)
                    .col(uuid(JobInputs::JobId))
                    .col(integer(JobInputs::Idx))
                    .col(string_len(JobInputs::Digest, 71))
                    .primary_key(Index::create().col(JobInputs::JobId).col(JobInputs::Idx))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_job_inputs_digest")
                    .table(JobInputs::Table)
                    .col(JobInputs::Digest)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            JobInputs::Table.into_iden(),
            Artifacts::Table.into_iden(),
            Blobs::Table.into_iden(),
            JobResults::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).to_owned())
                .await?;
        }
        manager
            .drop_index(
                Index::drop()
                    .name("idx_jobs_parent_job")
                    .table(Jobs::Table)
                    .to_owned(),
            )
            .await?;
        let columns = [
            Table::alter()
                .table(Attempts::Table)
                .drop_column(Attempts::WorkTokenHash)
                .to_owned(),
            Table::alter()
                .table(Jobs::Table)
                .drop_column(Jobs::ParentJob)
                .to_owned(),
        ];
        for alter in columns {
            manager.alter_table(alter).await?;
        }
        Ok(())
    }
}
