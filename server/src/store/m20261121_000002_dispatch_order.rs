//! Dispatch reads queued jobs by priority (highest first), then age (oldest first). The
//! first index had every column ascending, so SQLite could follow it for the priority but
//! sorted each whole priority group by id on every claim (a temp B-tree over the queue: the
//! deeper the queue, the slower each claim). This index has the claim's own order.
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden, Clone, Copy)]
enum Jobs {
    Table,
    Id,
    Status,
    Queue,
    Priority,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("idx_jobs_dispatch")
                    .table(Jobs::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_jobs_dispatch_order")
                    .table(Jobs::Table)
                    .col(Jobs::Status)
                    .col(Jobs::Queue)
                    .col((Jobs::Priority, IndexOrder::Desc))
                    .col((Jobs::Id, IndexOrder::Asc))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("idx_jobs_dispatch_order")
                    .table(Jobs::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_jobs_dispatch")
                    .table(Jobs::Table)
                    .col(Jobs::Status)
                    .col(Jobs::Queue)
                    .col(Jobs::Priority)
                    .col(Jobs::Id)
                    .to_owned(),
            )
            .await
    }
}
