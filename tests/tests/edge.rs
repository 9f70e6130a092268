//! The protocol's edge: what a runner written from the proto alone, a review of the code and
//! a fault-injection run found (issue #11). Each scenario failed against the server before
//! its fix; each runs on SQLite and PostgreSQL, against a real server on a loopback port.
use std::time::Duration;

use gantry_proto as pb;
use gantry_tests::{
    procs::{RunnerProcess, ServerProcess, eventually},
    *,
};
use pb::{JobStatus, session_response::Kind as Out};
use tokio_stream::StreamExt as _;
use tonic::Code;

on_both_databases!(
    a_session_message_too_large_or_undecodable_ends_with_a_status_that_says_why,
    unary_requests_too_large_or_undecodable_get_the_codes_that_fit,
    a_claim_its_runner_never_received_does_not_count,
    a_deregistered_runners_credential_is_refused,
    a_newer_session_replaces_the_older_one,
    a_unary_runner_that_restarted_gives_up_what_it_no_longer_holds,
    a_runner_deleted_by_retention_is_told_to_register_again,
    an_overdue_cancel_is_found_behind_many_with_long_graces,
    one_attempt_that_cannot_be_ended_holds_up_no_other,
    a_job_flooding_its_log_and_events_is_capped_with_a_marker,
    thousands_of_jobs_behind_a_held_lock_never_delay_an_unrelated_one,
    capacity_is_checked_by_the_claim_itself,
    a_draining_runner_says_so_in_its_hello,
    text_with_nul_is_refused_naming_the_field_and_changes_nothing,
);

/// Messages with a `string` field of the proto declared as `bytes`, so that a test can send
/// what a buggy runner in another language might: bytes that are not UTF-8.
mod raw {
    use gantry_proto as pb;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SessionRequest {
        #[prost(message, optional, tag = "1")]
        pub hello: Option<pb::Hello>,
        #[prost(message, optional, tag = "4")]
        pub reports: Option<ReportBatch>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ReportBatch {
        #[prost(message, repeated, tag = "1")]
        pub reports: Vec<Report>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Report {
        #[prost(bytes = "vec", tag = "1")]
        pub job_id: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub lease_id: Vec<u8>,
        #[prost(uint64, tag = "3")]
        pub sequence: u64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SubmitJobRequest {
        #[prost(message, optional, tag = "1")]
        pub spec: Option<JobSpec>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct JobSpec {
        #[prost(bytes = "vec", tag = "2")]
        pub image: Vec<u8>,
    }
}

/// A gRPC client speaking raw messages on `channel` with `token`.
fn raw_client(channel: tonic::transport::Channel, token: &str) -> tonic::client::Grpc<Authed> {
    tonic::client::Grpc::new(tonic::service::interceptor::InterceptedService::new(
        channel,
        Bearer::new(token),
    ))
}

/// Bytes that are not UTF-8.
const NOT_UTF8: &[u8] = &[0xff, 0xfe, 0xfd];

async fn a_session_message_too_large_or_undecodable_ends_with_a_status_that_says_why(db: Db) {
    let server = TestServer::start_with(db, |c| c.max_message_bytes = 65_536).await;
    let mut runner = server.runner("py", &[], 1).await;

    // A batch whose report holds a job id that is not UTF-8.
    let mut grpc = raw_client(server.channel().await, &runner.credential);
    grpc.ready().await.expect("ready");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(raw::SessionRequest {
        hello: Some(pb::Hello::default()),
        reports: None,
    })
    .await
    .expect("queue hello");
    let mut inbound = grpc
        .streaming(
            tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
            tonic::codegen::http::uri::PathAndQuery::from_static(
                "/gantry.v1.RunnerService/Session",
            ),
            tonic_prost::ProstCodec::<raw::SessionRequest, pb::SessionResponse>::default(),
        )
        .await
        .expect("open session")
        .into_inner();
    let welcome = match inbound.message().await.expect("welcome") {
        Some(pb::SessionResponse {
            kind: Some(Out::Welcome(w)),
        }) => w,
        other => panic!("expected welcome, got {other:?}"),
    };
    // The limits a runner sizes its messages by.
    let limits = welcome.limits.expect("limits");
    assert_eq!(limits.max_message_bytes, 65_536);
    assert!(welcome.heartbeat_interval_ms > 0 && welcome.lease_ms > 0);
    tx.send(raw::SessionRequest {
        hello: None,
        reports: Some(raw::ReportBatch {
            reports: vec![raw::Report {
                job_id: NOT_UTF8.to_vec(),
                lease_id: b"x".to_vec(),
                sequence: 1,
            }],
        }),
    })
    .await
    .expect("queue reports");
    let end = tokio::time::timeout(PATIENCE, inbound.message())
        .await
        .expect("the session ends");
    match end {
        Err(status) => {
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            assert!(status.message().contains("job_id"), "{status:?}");
        }
        other => panic!("expected INVALID_ARGUMENT naming the field, got {other:?}"),
    }

    // A message over the server's limit.
    let mut session = runner.session(0, vec![]).await;
    session
        .send(pb::session_request::Kind::Reports(pb::ReportBatch {
            reports: vec![pb::Report {
                job_id: uuid::Uuid::now_v7().to_string(),
                lease_id: uuid::Uuid::now_v7().to_string(),
                sequence: 1,
                body: Some(stdout(0, &[b'x'; 100_000])),
            }],
        }))
        .await;
    let end = tokio::time::timeout(PATIENCE, session.inbound.message())
        .await
        .expect("the session ends");
    match end {
        Err(status) => {
            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
            assert!(status.message().contains("65536"), "{status:?}");
        }
        other => panic!("expected RESOURCE_EXHAUSTED naming the limit, got {other:?}"),
    }
    server.stop().await;
}

async fn unary_requests_too_large_or_undecodable_get_the_codes_that_fit(db: Db) {
    let server = TestServer::start_with(db, |c| c.max_message_bytes = 65_536).await;
    let mut jobs = server.jobs().await;
    let mut big = sh("true");
    big.env.insert("BIG".into(), "x".repeat(100_000));
    let err = jobs
        .submit_job(pb::SubmitJobRequest { spec: Some(big) })
        .await
        .expect_err("too large");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");

    let mut grpc = raw_client(server.channel().await, &server.api_token);
    grpc.ready().await.expect("ready");
    let err = grpc
        .unary(
            tonic::Request::new(raw::SubmitJobRequest {
                spec: Some(raw::JobSpec {
                    image: NOT_UTF8.to_vec(),
                }),
            }),
            tonic::codegen::http::uri::PathAndQuery::from_static("/gantry.v1.JobService/SubmitJob"),
            tonic_prost::ProstCodec::<raw::SubmitJobRequest, pb::SubmitJobResponse>::default(),
        )
        .await
        .expect_err("undecodable");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("image"), "{err:?}");
    // Nothing was stored.
    let listed = jobs
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(listed.jobs.is_empty());
    server.stop().await;
}

async fn a_claim_its_runner_never_received_does_not_count(db: Db) {
    // A long lease: only the runner's own account can end the attempt in the test's time.
    let server = TestServer::start_with(db, |c| c.lease_seconds = 600).await;
    let mut jobs = server.jobs().await;
    let mut spec = sh("true");
    spec.env.insert("PADDING".into(), "x".repeat(4096));
    let id = submit(&mut jobs, spec).await;
    // A runner whose client accepts answers of 1 KiB at most: the Claim's answer is lost.
    let lossy = server.runner("lossy", &[], 1).await;
    let mut client = lossy.client.clone().max_decoding_message_size(1024);
    let err = client
        .claim(pb::ClaimRequest {
            max_jobs: 1,
            wait_seconds: 10,
        })
        .await
        .expect_err("the answer cannot be delivered");
    assert_ne!(err.code(), Code::Ok);
    assert_eq!(get(&mut jobs, &id).await.status, JobStatus::Assigned as i32);
    // Its heartbeats hold nothing: the claim made before its previous heartbeat is given up,
    // and since the runner never reported on it, it does not count.
    for _ in 0..2 {
        client
            .heartbeat(pb::HeartbeatRequest::default())
            .await
            .expect("heartbeat");
    }
    let job = get(&mut jobs, &id).await;
    assert_eq!(job.status, JobStatus::Queued as i32, "{job:?}");
    assert_eq!(job.attempt_count, 0);
    // Another runner runs it: the job, allowed one attempt, succeeds.
    let mut other = server.runner("other", &[], 1).await;
    let a = other.claim_one().await;
    assert_eq!((a.job_id.as_str(), a.attempt), (id.as_str(), 1));
    other
        .report(&a, status(JobStatus::Running))
        .await
        .expect("running");
    other
        .report(&a, status(JobStatus::Succeeded))
        .await
        .expect("final");
    let job = get(&mut jobs, &id).await;
    assert_eq!(job.status, JobStatus::Succeeded as i32);
    assert_eq!(job.attempt_count, 1);
    server.stop().await;
}

async fn a_deregistered_runners_credential_is_refused(db: Db) {
    let server = TestServer::start(db).await;
    let mut jobs = server.jobs().await;
    let mut admin = server.admin().await;
    let mut runner = server.runner("gone", &[], 1).await;
    // The credential was verified (and cached) before the runner left.
    runner
        .client
        .heartbeat(pb::HeartbeatRequest::default())
        .await
        .expect("heartbeat");
    runner
        .client
        .deregister(pb::DeregisterRequest {
            reason: "done".into(),
        })
        .await
        .expect("deregister");
    let id = submit(&mut jobs, sh("true")).await;
    let err = runner
        .client
        .heartbeat(pb::HeartbeatRequest::default())
        .await
        .expect_err("revoked");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("register again"), "{err:?}");
    let err = runner
        .client
        .claim(pb::ClaimRequest {
            max_jobs: 1,
            wait_seconds: 0,
        })
        .await
        .expect_err("revoked");
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = refused_session(&mut runner).await;
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert_eq!(
        runner_state(&mut admin, &runner.id).await,
        pb::RunnerState::Offline
    );
    assert_eq!(get(&mut jobs, &id).await.status, JobStatus::Queued as i32);
    server.stop().await;
}

/// Opens a session that the server refuses; returns the refusal, whether it ends the call
/// (a credential refused by the check every call passes) or the stream (refused by the
/// session's opening).
async fn refused_session(runner: &mut TestRunner) -> tonic::Status {
    let hello = pb::SessionRequest {
        kind: Some(pb::session_request::Kind::Hello(pb::Hello::default())),
    };
    match runner.client.session(tokio_stream::iter(vec![hello])).await {
        Err(status) => status,
        Ok(response) => match response.into_inner().message().await {
            Err(status) => status,
            other => panic!("the session was not refused: {other:?}"),
        },
    }
}

/// The state runner `id` is in, as AdminService.GetRunner says.
async fn runner_state(
    admin: &mut pb::admin_service_client::AdminServiceClient<Authed>,
    id: &str,
) -> pb::RunnerState {
    let runner = admin
        .get_runner(pb::GetRunnerRequest {
            runner_id: id.into(),
        })
        .await
        .expect("get runner")
        .into_inner();
    pb::RunnerState::try_from(runner.state).expect("a known runner state")
}

/// Waits until retention has deleted runner `id` (GetRunner says NOT_FOUND).
async fn deleted_by_retention(
    admin: &pb::admin_service_client::AdminServiceClient<Authed>,
    id: &str,
) {
    eventually("retention deletes the runner", || {
        let mut admin = admin.clone();
        let runner_id = id.to_string();
        async move {
            match admin.get_runner(pb::GetRunnerRequest { runner_id }).await {
                Err(e) if e.code() == Code::NotFound => Some(()),
                _ => None,
            }
        }
    })
    .await;
}

/// Waits for the end of a session's stream; returns its status.
async fn session_end(session: &mut Session) -> tonic::Status {
    loop {
        match tokio::time::timeout(PATIENCE, session.inbound.message())
            .await
            .expect("the session ends")
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the session ended without a status"),
            Err(status) => return status,
        }
    }
}

async fn a_newer_session_replaces_the_older_one(db: Db) {
    let postgres = matches!(db, Db::Postgres(_));
    let server = TestServer::start(db).await;
    let mut jobs = server.jobs().await;
    let mut runner = server.runner("twice", &[], 2).await;
    let mut older = runner.session(2, vec![]).await;
    let mut newer = runner.session(2, vec![]).await;
    let end = session_end(&mut older).await;
    assert_eq!(end.code(), Code::Aborted, "{end:?}");
    assert!(end.message().contains("replaced"), "{end:?}");
    // Work goes to the session that holds the runner.
    let id = submit(&mut jobs, sh("true")).await;
    assert_eq!(newer.next_assignment().await.job_id, id);
    if postgres {
        // The same across replicas: a session on another replica replaces this one.
        let replica = server.replica().await;
        let mut there = runner.clone_on(&format!("http://{}", replica.addr)).await;
        let _newest = there.session(1, vec![]).await;
        let end = session_end(&mut newer).await;
        assert_eq!(end.code(), Code::Aborted, "{end:?}");
        replica.shutdown().await.expect("replica stops");
    }
    server.stop().await;
}

async fn a_unary_runner_that_restarted_gives_up_what_it_no_longer_holds(db: Db) {
    let server = TestServer::start_with(db, |c| c.lease_seconds = 600).await;
    let mut jobs = server.jobs().await;
    let mut runner = server.runner("unary", &[], 1).await;
    let spec = sh_retried("sleep 100", 2);
    let id = submit(&mut jobs, spec).await;
    let a = runner.claim_one().await;
    runner
        .report(&a, status(JobStatus::Running))
        .await
        .expect("running");
    let beat = runner
        .client
        .heartbeat(pb::HeartbeatRequest {
            held: vec![lease_ref(&a)],
        })
        .await
        .expect("heartbeat")
        .into_inner();
    assert!(beat.revoked.is_empty());
    assert_eq!(get(&mut jobs, &id).await.status, JobStatus::Running as i32);
    // The runner restarted: it holds nothing now, and says so.
    runner
        .client
        .heartbeat(pb::HeartbeatRequest::default())
        .await
        .expect("heartbeat");
    let job = get(&mut jobs, &id).await;
    assert_eq!(job.status, JobStatus::Queued as i32, "retried at once");
    assert_eq!(
        job.attempts[0].failure_kind,
        pb::FailureKind::RunnerLost as i32
    );
    assert!(job.attempts[0].finished_at_unix_ms > 0);
    // A lease it lists but no longer holds comes back revoked.
    let beat = runner
        .client
        .heartbeat(pb::HeartbeatRequest {
            held: vec![lease_ref(&a)],
        })
        .await
        .expect("heartbeat")
        .into_inner();
    assert_eq!(beat.revoked.len(), 1);
    server.stop().await;
}

async fn a_runner_deleted_by_retention_is_told_to_register_again(db: Db) {
    let server = TestServer::start_with(db, |c| c.retention_seconds = 1).await;
    let admin = server.admin().await;
    let mut runner = server.runner("forgotten", &[], 1).await;
    // The credential is verified (and cached) while the runner is known.
    drop(runner.session(0, vec![]).await);
    deleted_by_retention(&admin, &runner.id).await;
    let err = refused_session(&mut runner).await;
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("register again"), "{err:?}");
    server.stop().await;
}

async fn an_overdue_cancel_is_found_behind_many_with_long_graces(db: Db) {
    let server = TestServer::start(db).await;
    let mut jobs = server.jobs().await;
    let mut runner = server.runner("busy", &[], 400).await;
    const PATIENT: usize = 300;
    let mut spec = sh("sleep 1000");
    spec.cancel_grace_seconds = 3600;
    for _ in 0..PATIENT {
        submit(&mut jobs, spec.clone()).await;
    }
    // The urgent job comes last in every order the database may read them in: submitted,
    // claimed and canceled last, and of the lowest priority.
    let mut urgent = sh("sleep 1000");
    urgent.cancel_grace_seconds = 1;
    urgent.priority = -1;
    let urgent_id = submit(&mut jobs, urgent).await;
    let mut held = Vec::new();
    while held.len() < PATIENT + 1 {
        let got = runner
            .client
            .claim(pb::ClaimRequest {
                max_jobs: 256,
                wait_seconds: 1,
            })
            .await
            .expect("claim")
            .into_inner()
            .assignments;
        held.extend(got);
    }
    // The runner stays alive and holds everything, but never confirms a cancel.
    let refs: Vec<&pb::Assignment> = held.iter().collect();
    let beat = runner.keep_alive(&refs);
    for a in &held {
        jobs.cancel_job(pb::CancelJobRequest {
            job_id: a.job_id.clone(),
            reason: String::new(),
        })
        .await
        .expect("cancel");
    }
    // The one with a short grace is ended by the server, whatever waits before it.
    wait_for_status(&mut jobs, &urgent_id, JobStatus::Canceled).await;
    let job = get(&mut jobs, &urgent_id).await;
    assert!(
        job.attempts[0].failure_message.contains("did not confirm"),
        "{:?}",
        job.attempts[0]
    );
    beat.abort();
    server.stop().await;
}

async fn one_attempt_that_cannot_be_ended_holds_up_no_other(db: Db) {
    let server = TestServer::start(db).await;
    let mut jobs = server.jobs().await;
    let mut runner = server.runner("silent", &[], 8).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(submit(&mut jobs, sh("sleep 100")).await);
    }
    let mut held = Vec::new();
    while held.len() < ids.len() {
        held.extend(
            runner
                .client
                .claim(pb::ClaimRequest {
                    max_jobs: 8,
                    wait_seconds: 1,
                })
                .await
                .expect("claim")
                .into_inner()
                .assignments,
        );
    }
    for a in &held {
        runner
            .report(a, status(JobStatus::Running))
            .await
            .expect("running");
    }
    // A fault no API can cause (a test double of a corrupted database): one attempt's job
    // row disappears, so its end cannot be decided.
    let broken = held[0].job_id.clone();
    let conn = sea_orm::Database::connect(server.database_url())
        .await
        .expect("connect to the test database");
    use sea_orm::EntityTrait as _;
    gantry_server::store::entity::job::Entity::delete_by_id(
        uuid::Uuid::parse_str(&broken).expect("uuid"),
    )
    .exec(&conn)
    .await
    .expect("delete the job row");
    let _ = conn.close().await;
    // The runner goes silent: every other attempt's lease expires and its job fails.
    for id in ids.iter().filter(|id| **id != broken) {
        wait_for_status(&mut jobs, id, JobStatus::Failed).await;
    }
    server.stop().await;
}

async fn a_job_flooding_its_log_and_events_is_capped_with_a_marker(db: Db) {
    let server = TestServer::start_with(db, |c| {
        c.max_log_bytes_per_job = 1000;
        c.max_events_per_job = 20;
    })
    .await;
    let mut jobs = server.jobs().await;
    let mut runner = server.runner("flood", &[], 1).await;
    let id = submit(&mut jobs, sh("yes")).await;
    let a = runner.claim_one().await;
    runner
        .report(&a, status(JobStatus::Running))
        .await
        .expect("running");
    let mut offset = 0u64;
    for _ in 0..30 {
        runner
            .report(&a, stdout(offset, &[b'y'; 100]))
            .await
            .expect("log");
        offset += 100;
        runner
            .report(
                &a,
                pb::report::Body::Progress(pb::Progress {
                    percent: 1,
                    ..Default::default()
                }),
            )
            .await
            .expect("progress");
    }
    runner
        .report(&a, status(JobStatus::Succeeded))
        .await
        .expect("final status");
    let (out, _) = logs(&mut jobs, &id).await;
    assert!(out.starts_with(&[b'y'; 1000]));
    let tail = String::from_utf8_lossy(&out[1000..]).to_string();
    assert!(tail.contains("reached the limit of 1000 bytes"), "{tail}");
    let events = wait_for_status(&mut jobs, &id, JobStatus::Succeeded).await;
    let limits: Vec<i32> = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(pb::job_event::Kind::Limit(l)) => Some(l.limit),
            _ => None,
        })
        .collect();
    assert!(
        limits.contains(&(pb::StorageLimit::LogBytes as i32)),
        "{events:#?}"
    );
    assert!(
        limits.contains(&(pb::StorageLimit::Events as i32)),
        "{events:#?}"
    );
    // Progress stopped being stored; the final status was not.
    assert!(events.len() <= 24, "{} events", events.len());
    server.stop().await;
}

async fn thousands_of_jobs_behind_a_held_lock_never_delay_an_unrelated_one(db: Db) {
    let server = TestServer::start(db).await;
    let mut holder = server.runner("holder", &[], 1).await;
    let mut locked = sh("true");
    locked.lock_key = "migrate".into();
    // 5,001 jobs with one key, submitted in parallel.
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let mut jobs = server.jobs().await;
        let spec = locked.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..100 {
                submit(&mut jobs, spec.clone()).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("submitter");
    }
    let mut jobs = server.jobs().await;
    submit(&mut jobs, locked).await;
    let first = holder.claim_one().await;
    assert!(!first.job_id.is_empty());
    let unrelated = submit(&mut jobs, sh("echo unrelated")).await;
    let mut other = server.runner("other", &[], 1).await;
    let got = other
        .client
        .claim(pb::ClaimRequest {
            max_jobs: 1,
            wait_seconds: 0,
        })
        .await
        .expect("claim")
        .into_inner()
        .assignments;
    assert_eq!(got.len(), 1, "the unrelated job waits behind the lock");
    assert_eq!(got[0].job_id, unrelated);
    server.stop().await;
}

async fn capacity_is_checked_by_the_claim_itself(db: Db) {
    let server = TestServer::start(db).await;
    let mut jobs = server.jobs().await;
    let mut runner = server.runner("one-slot", &[], 1).await;
    submit(&mut jobs, sh("true")).await;
    let a = runner.claim_one().await;
    let id = submit(&mut jobs, sh("true")).await;
    // A session granting a slot the runner does not have gets nothing: its heartbeat's answer
    // comes first (work is pushed before the session reads on).
    let mut session = runner.session(1, vec![lease_ref(&a)]).await;
    session
        .send(pb::session_request::Kind::Heartbeat(pb::HeartbeatRequest {
            held: vec![lease_ref(&a)],
        }))
        .await;
    match session.next().await {
        Out::HeartbeatAck(_) => {}
        other => panic!("expected the heartbeat's answer, got {other:?}"),
    }
    let got = runner
        .client
        .claim(pb::ClaimRequest {
            max_jobs: 4,
            wait_seconds: 0,
        })
        .await
        .expect("claim")
        .into_inner()
        .assignments;
    assert!(got.is_empty(), "{got:?}");
    assert_eq!(get(&mut jobs, &id).await.status, JobStatus::Queued as i32);
    server.stop().await;
}

async fn a_draining_runner_says_so_in_its_hello(db: Db) {
    let server = TestServer::start(db).await;
    let mut jobs = server.jobs().await;
    let mut admin = server.admin().await;
    let mut runner = server.runner("leaving", &[], 1).await;
    submit(&mut jobs, sh("true")).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::SessionRequest {
        kind: Some(pb::session_request::Kind::Hello(pb::Hello {
            free_slots: 1,
            held: vec![],
            draining: true,
            drain_reason: "SIGTERM".into(),
        })),
    })
    .await
    .expect("queue hello");
    let mut session = Session {
        tx,
        inbound: runner
            .client
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("open")
            .into_inner(),
    };
    assert!(matches!(session.next().await, Out::Welcome(_)));
    assert_eq!(
        runner_state(&mut admin, &runner.id).await,
        pb::RunnerState::Draining
    );
    session
        .send(pb::session_request::Kind::Heartbeat(
            pb::HeartbeatRequest::default(),
        ))
        .await;
    match session.next().await {
        Out::HeartbeatAck(h) => assert_eq!(h.state, pb::RunnerState::Draining as i32),
        other => panic!("no work for a draining runner, got {other:?}"),
    }
    server.stop().await;
}

/// Replicas on PostgreSQL agree on leases through the database's clock, whatever their hosts'
/// clocks say: a replica whose host clock is an hour ahead (a test double of a wrong clock)
/// still gives leases that end a lease period from the database's now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_agree_on_lease_times_whatever_their_clocks() {
    let Some(db) = Db::postgres() else { return };
    let server = TestServer::start(db).await;
    let mut jobs = server.jobs().await;
    let ahead = server.replica_with(|c| c.clock_skew_ms = 3_600_000).await;
    let mut runner = server.runner("r", &[], 1).await;
    runner.reconnect_to(&format!("http://{}", ahead.addr)).await;
    let id = submit(&mut jobs, sh("sleep 100")).await;
    let a = runner.claim_one().await;
    assert_eq!(a.job_id, id);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    let lease = i64::from(server.config.lease_seconds) * 1000;
    let until = a.lease_expires_at_unix_ms;
    assert!(
        (now..=now + lease + 5_000).contains(&until),
        "lease ends at {until}, now is {now}: {} ms off",
        until - now
    );
    // Its reaper, too, reads the database's time: the lease is not expired by it.
    runner
        .report(&a, status(JobStatus::Running))
        .await
        .expect("running on the replica with the wrong clock");
    ahead.shutdown().await.expect("replica stops");
    server.stop().await;
}

/// A real runner against a server that takes small messages sizes its reports by the limits
/// the server announces: a job's whole megabyte of output arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_sizes_its_reports_by_the_servers_limits() {
    let server = ServerProcess::start(&["--max-message-bytes", "65536"]).await;
    let mut jobs = server.jobs().await;
    let runner = RunnerProcess::start_for(
        &server.url,
        &server.registration_token,
        "small-messages",
        &["--executors", "process"],
    );
    let id = submit(
        &mut jobs,
        sh("head -c 1048576 /dev/zero | tr '\\0' x; echo"),
    )
    .await;
    let events = wait_for_status(&mut jobs, &id, JobStatus::Succeeded).await;
    assert!(!events.is_empty());
    let (out, _) = logs(&mut jobs, &id).await;
    assert_eq!(out.len(), 1_048_577, "runner log:\n{}", runner.log());
    drop(runner);
}

/// A real runner whose record retention deleted registers again and goes on working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_runner_deleted_by_retention_registers_again() {
    let server = ServerProcess::start(&["--retention-seconds", "1", "--lease-seconds", "3"]).await;
    let mut jobs = server.jobs().await;
    let admin = pb::admin_service_client::AdminServiceClient::with_interceptor(
        channel(&server.url).await,
        Bearer::new(&server.api_token),
    );
    let mut runner = RunnerProcess::start_for(
        &server.url,
        &server.registration_token,
        "comes-back",
        &["--executors", "process"],
    );
    let first_id = runner.id().await;
    let id = submit(&mut jobs, sh("echo one")).await;
    wait_for_status(&mut jobs, &id, JobStatus::Succeeded).await;
    runner.kill().await;
    deleted_by_retention(&admin, &first_id).await;
    runner.restart();
    let id = submit(&mut jobs, sh("echo two")).await;
    wait_for_status(&mut jobs, &id, JobStatus::Succeeded).await;
    let second_id = runner.id().await;
    assert_ne!(first_id, second_id, "runner log:\n{}", runner.log());
    drop(runner);
    drop(server);
}

/// Four readers of a 100 MiB log, each paused after its first chunk, add less than 32 MiB
/// to the server's resident memory: reads stream from the database in bounded pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_readers_of_a_large_log_do_not_hold_it_in_memory() {
    const MIB: usize = 1024 * 1024;
    let server = ServerProcess::start(&[]).await;
    let pid = server.pid().expect("server pid");
    let ch = channel(&server.url).await;
    let mut reg = pb::runner_service_client::RunnerServiceClient::with_interceptor(
        ch.clone(),
        Bearer::new(&server.registration_token),
    );
    let registered = reg
        .register(pb::RegisterRequest {
            name: "writer".into(),
            capacity: 1,
            executors: vec![pb::ExecutorKind::Process as i32],
            ..Default::default()
        })
        .await
        .expect("register")
        .into_inner();
    let mut runner = pb::runner_service_client::RunnerServiceClient::with_interceptor(
        ch.clone(),
        Bearer::new(&registered.credential),
    );
    let mut jobs = server.jobs().await;
    let id = submit(&mut jobs, sh("true")).await;
    let a = runner
        .claim(pb::ClaimRequest {
            max_jobs: 1,
            wait_seconds: 10,
        })
        .await
        .expect("claim")
        .into_inner()
        .assignments
        .pop()
        .expect("assignment");
    // 100 MiB of output, 1 MiB a report, in calls of 10.
    for call in 0..10u64 {
        let reports: Vec<pb::Report> = (0..10u64)
            .map(|i| {
                let n = call * 10 + i;
                pb::Report {
                    job_id: a.job_id.clone(),
                    lease_id: a.lease_id.clone(),
                    sequence: n + 1,
                    body: Some(stdout(n * MIB as u64, &vec![b'z'; MIB])),
                }
            })
            .collect();
        runner
            .report_events(tokio_stream::iter(reports))
            .await
            .expect("report");
    }
    let rss = || -> i64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
            .expect("VmRSS")
            * 1024
    };
    let before = rss();
    let mut readers = Vec::new();
    for _ in 0..4 {
        // A connection each, so that one paused reader's flow control does not pause another.
        let mut client = pb::job_service_client::JobServiceClient::with_interceptor(
            channel(&server.url).await,
            Bearer::new(&server.api_token),
        );
        let mut stream = client
            .get_logs(pb::GetLogsRequest {
                job_id: id.clone(),
                attempt: 1,
                ..Default::default()
            })
            .await
            .expect("get logs")
            .into_inner();
        let first = stream.next().await.expect("a chunk").expect("chunk");
        assert_eq!(first.offset, 0);
        readers.push((client, stream));
    }
    // The readers hold their streams without reading on; whatever the server buffers for
    // them it buffers now. The largest resident size over a second is what they cost.
    let mut most = rss();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        most = most.max(rss());
    }
    let grown = most - before;
    eprintln!(
        "four paused readers of a 100 MiB log: server RSS {} -> {} MiB",
        before / MIB as i64,
        most / MIB as i64
    );
    assert!(
        grown < 32 * MIB as i64,
        "four paused readers added {} MiB",
        grown / MIB as i64
    );
    // And a reader that reads on gets every byte.
    let (mut client, _) = readers.pop().expect("a reader");
    let mut all = client
        .get_logs(pb::GetLogsRequest {
            job_id: id.clone(),
            attempt: 1,
            ..Default::default()
        })
        .await
        .expect("get logs")
        .into_inner();
    let mut total = 0usize;
    while let Some(chunk) = all.next().await {
        let chunk = chunk.expect("chunk");
        assert_eq!(chunk.offset as usize, total, "contiguous");
        total += chunk.data.len();
    }
    assert_eq!(total, 100 * MIB);
    drop(readers);
    drop(server);
}

/// Free text with a NUL (which PostgreSQL's text columns refuse) is bad input: refused with
/// INVALID_ARGUMENT naming the field, changing nothing. Before, on PostgreSQL, one such
/// report failed the whole group transaction it was in (every session in it ended
/// UNAVAILABLE, and the runner sent it again for ever) and a cancel reason got UNAVAILABLE.
async fn text_with_nul_is_refused_naming_the_field_and_changes_nothing(db: Db) {
    let server = TestServer::start(db).await;
    let mut jobs = server.jobs().await;
    let mut admin = server.admin().await;
    let mut runner = server.runner("nul", &[], 1).await;
    let id = submit(&mut jobs, sh("x")).await;
    let a = runner.claim_one().await;
    let mut session = runner.session(0, holding(&a)).await;
    let mk = |seq, message: &str| pb::Report {
        job_id: id.clone(),
        lease_id: a.lease_id.clone(),
        sequence: seq,
        body: Some(pb::report::Body::Status(pb::StatusReport {
            status: JobStatus::Failed as i32,
            failure_kind: pb::FailureKind::ExitNonzero as i32,
            exit_code: Some(3),
            message: message.into(),
            ..Default::default()
        })),
    };
    session
        .send(pb::session_request::Kind::Reports(pb::ReportBatch {
            reports: vec![mk(1, "exit\0ed")],
        }))
        .await;
    let rejected = loop {
        match session.next().await {
            Out::Rejected(r) => break r,
            Out::Acks(a) => assert!(a.acks.is_empty(), "nothing is acknowledged: {a:?}"),
            _ => {}
        }
    };
    assert_eq!(rejected.code, Code::InvalidArgument as i32, "{rejected:?}");
    assert!(
        rejected.message.contains("status.message") && rejected.message.contains("NUL"),
        "{}",
        rejected.message
    );
    assert_eq!(get(&mut jobs, &id).await.status, JobStatus::Assigned as i32);
    // The session lives on, and the report without the NUL is stored.
    session
        .send(pb::session_request::Kind::Reports(pb::ReportBatch {
            reports: vec![mk(1, "exited 3")],
        }))
        .await;
    loop {
        if let Out::Acks(a) = session.next().await
            && a.acks.iter().any(|a| a.acked_sequence == 1)
        {
            break;
        }
    }
    let job = get(&mut jobs, &id).await;
    assert_eq!(job.status, JobStatus::Failed as i32);
    assert_eq!(job.failure_message, "exited 3");

    let mut keyed = sh("x");
    keyed.idempotency_key = "k\0".into();
    let err = jobs
        .submit_job(pb::SubmitJobRequest { spec: Some(keyed) })
        .await
        .expect_err("NUL in idempotency key");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("spec.idempotency_key"), "{err:?}");
    let queued = submit(&mut jobs, sh("x")).await;
    let err = jobs
        .cancel_job(pb::CancelJobRequest {
            job_id: queued.clone(),
            reason: "a\0b".into(),
        })
        .await
        .expect_err("NUL in reason");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("reason"), "{err:?}");
    assert_eq!(
        get(&mut jobs, &queued).await.status,
        JobStatus::Queued as i32
    );
    let err = admin
        .drain_runner(pb::DrainRunnerRequest {
            runner_id: runner.id.clone(),
            reason: "a\0b".into(),
        })
        .await
        .expect_err("NUL in reason");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(
        runner_state(&mut admin, &runner.id).await,
        pb::RunnerState::Online
    );
    server.stop().await;
}
