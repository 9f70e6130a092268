//! sea-orm entities: one table per concept of the design. Times are Unix milliseconds
//! (`i64`), enums are the protobuf numbers (`i32`), and structured values that are only
//! ever read whole (a job spec, an event, a command) are stored as protobuf bytes, so the
//! database schema and the wire protocol cannot drift apart.

/// A job: the indexed facts the scheduler filters on, plus the spec as protobuf bytes.
pub mod job {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "jobs")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        /// `JobStatus` number.
        pub status: i32,
        pub queue: String,
        pub priority: i32,
        /// `ExecutorKind` number (never UNSPECIFIED once stored).
        pub executor: i32,
        pub lock_key: Option<String>,
        pub idempotency_key: Option<String>,
        /// `JobSpec`, protobuf-encoded, defaults filled in.
        pub spec: Vec<u8>,
        pub attempt_count: i32,
        pub max_attempts: i32,
        /// Lease of the current (unfinished) attempt, if any.
        pub current_lease: Option<Uuid>,
        /// Runner of the current or last attempt.
        pub runner_id: Option<Uuid>,
        pub failure_kind: i32,
        pub failure_message: String,
        pub exit_code: Option<i32>,
        /// Latest `Progress`, protobuf-encoded.
        pub progress: Option<Vec<u8>>,
        /// Sequence of the last event appended.
        pub event_seq: i64,
        pub not_before: i64,
        pub created_at: i64,
        pub updated_at: i64,
        pub finished_at: Option<i64>,
        pub retried_from: Option<Uuid>,
        /// Log bytes stored for the job, every attempt together (the per-job log limit).
        pub log_bytes: i64,
        /// Progress and phase events reached the per-job limit (its event is recorded).
        pub events_capped: bool,
        /// What the row is: [`crate::sandboxes::KIND_JOB`], `KIND_SANDBOX` or `KIND_COMMAND`.
        pub kind: i32,
        /// A command's sandbox.
        pub parent_id: Option<Uuid>,
        /// The job whose work submitted this one (WorkService.SubmitChild).
        pub parent_job: Option<Uuid>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Required runner labels of a job, one row each, so that ListJobs can filter on them.
pub mod job_label {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "job_labels")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub job_id: Uuid,
        #[sea_orm(primary_key, auto_increment = false)]
        pub key: String,
        pub value: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// One claim of a job by one runner, keyed by its lease (the fencing token).
pub mod attempt {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "attempts")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub lease_id: Uuid,
        pub job_id: Uuid,
        pub number: i32,
        pub runner_id: Uuid,
        /// `JobStatus` the attempt is in (or ended the job with).
        pub status: i32,
        pub lease_expires_at: i64,
        /// The attempt must have ended by then (assigned_at + timeout).
        pub deadline_at: i64,
        pub assigned_at: i64,
        pub started_at: Option<i64>,
        pub finished_at: Option<i64>,
        pub container_id: String,
        pub exit_code: Option<i32>,
        pub failure_kind: i32,
        pub failure_message: String,
        /// Highest report sequence applied.
        pub acked_seq: i64,
        /// Bytes of stdout stored so far (the next expected offset).
        pub stdout_len: i64,
        /// Bytes of stderr stored so far.
        pub stderr_len: i64,
        /// When a cancel the holder has not confirmed is ended by the server (set when the
        /// job goes CANCELING: the request time, plus the job's cancel grace, plus a lease).
        pub cancel_deadline_at: Option<i64>,
        /// The job's log limit was reached during this attempt (its marker is written).
        pub log_capped: bool,
        /// A command's attempt: the lease of its sandbox, which it lives and dies with (it is
        /// not heartbeated, not in the runner's account and takes no slot).
        pub parent_lease: Option<Uuid>,
        /// SHA-256 (hex) of the attempt's work token; the token itself is never stored.
        pub work_token_hash: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The append-only trail of a job.
pub mod event {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "job_events")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub job_id: Uuid,
        #[sea_orm(primary_key, auto_increment = false)]
        pub seq: i64,
        pub attempt: i32,
        pub at: i64,
        /// `JobEvent`, protobuf-encoded.
        pub body: Vec<u8>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Output bytes, addressed by (job, attempt, stream, offset); `id` keeps report order.
pub mod log_chunk {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "log_chunks")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub job_id: Uuid,
        pub attempt: i32,
        /// `LogStream` number.
        pub stream: i32,
        pub offset: i64,
        pub data: Vec<u8>,
        pub at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// A registered runner. The credential is kept only as a SHA-256 hash.
pub mod runner {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "runners")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub name: String,
        /// `RegisterRequest`, protobuf-encoded (labels, executors, queues, ...).
        pub info: Vec<u8>,
        pub capacity: i32,
        pub credential_hash: String,
        /// `RunnerState` number.
        pub state: i32,
        pub last_heartbeat: i64,
        pub registered_at: i64,
        /// Sequence of the last command issued to it.
        pub command_seq: i64,
        /// Highest command sequence it acknowledged.
        pub acked_command_seq: i64,
        /// Incremented by every session the runner opens; a session whose epoch is no longer
        /// the runner's has been replaced by a newer one and ends.
        pub session_epoch: i64,
        /// When its credential was revoked (it deregistered); revoked credentials are refused.
        pub revoked_at: Option<i64>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// A control message for one runner, delivered until acknowledged.
pub mod command {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "commands")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub runner_id: Uuid,
        #[sea_orm(primary_key, auto_increment = false)]
        pub seq: i64,
        pub created_at: i64,
        /// `Command`, protobuf-encoded.
        pub body: Vec<u8>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// A held `lock_key`: the primary key makes two holders impossible on any database.
pub mod lock {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "locks")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub lock_key: String,
        pub job_id: Uuid,
        pub lease_id: Uuid,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// What only a sandbox has (its job row holds the rest).
pub mod sandbox {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "sandboxes")]
    pub struct Model {
        /// The sandbox's job id.
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub idle_timeout_ms: i64,
        pub one_shot: bool,
        /// Last time a command was accepted or ended (or the sandbox started running).
        pub last_activity_at: i64,
        /// Commands accepted so far (the last command's number).
        pub command_count: i32,
        /// The runner reported phase STARTING (CREATING before it).
        pub starting: bool,
        pub idempotency_key: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// What only a sandbox command has (its job row holds the rest).
pub mod sandbox_command {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "sandbox_commands")]
    pub struct Model {
        /// The command's job id.
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub sandbox_id: Uuid,
        /// 1, 2, 3 ... in its sandbox.
        pub number: i32,
        pub stdin: Vec<u8>,
        pub idempotency_key: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// A job's result, set by its work (one row per job; a later one replaces it).
pub mod job_result {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "job_results")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub job_id: Uuid,
        /// The attempt that set it.
        pub attempt: i32,
        pub content_type: String,
        pub data: Vec<u8>,
        pub set_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Bytes in the blob store, by digest: a row exists only once the bytes are stored whole.
pub mod blob {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "blobs")]
    pub struct Model {
        /// `sha256:<64 hex>`.
        #[sea_orm(primary_key, auto_increment = false)]
        pub digest: String,
        pub size: i64,
        pub created_at: i64,
        /// Last upload (or artifact stored with these bytes): retention keeps a blob nothing
        /// names for the blob grace after it.
        pub last_used_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// A file a job published, by (job, name); its bytes are the blob of `digest`.
pub mod artifact {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "artifacts")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub job_id: Uuid,
        #[sea_orm(primary_key, auto_increment = false)]
        pub name: String,
        pub attempt: i32,
        pub digest: String,
        pub size: i64,
        pub created_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// A blob a job's spec names as an input: keeps the blob from retention while the job exists.
pub mod job_input {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "job_inputs")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub job_id: Uuid,
        /// The input's index in the spec.
        #[sea_orm(primary_key, auto_increment = false)]
        pub idx: i32,
        pub digest: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
