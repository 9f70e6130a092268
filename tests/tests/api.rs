//! The user- and operator-facing API, and the rules every RPC keeps: authentication, bad
//! input, listing and paging, idempotency, stats, retention, health, TLS — on SQLite and
//! PostgreSQL where the database matters.
use gantry_proto as pb;
use gantry_tests::*;
use pb::{
    JobStatus, admin_service_client::AdminServiceClient, job_service_client::JobServiceClient,
    runner_service_client::RunnerServiceClient,
};
use tonic::Code;

on_both_databases!(
    every_rpc_refuses_missing_and_wrong_tokens,
    bad_input_names_the_field_and_changes_nothing,
    list_filters_pages_and_stats,
    idempotent_submit_returns_the_first_job,
    retention_deletes_old_terminal_jobs,
    dispatch_follows_labels_queues_and_priority,
);

/// Calls every authenticated RPC through clients carrying `bearer`; returns each code.
async fn call_all(server: &TestServer, bearer: Bearer) -> Vec<(&'static str, Code)> {
    let ch = server.channel().await;
    let mut jobs = JobServiceClient::with_interceptor(ch.clone(), bearer.clone());
    let mut admin = AdminServiceClient::with_interceptor(ch.clone(), bearer.clone());
    let mut runner = RunnerServiceClient::with_interceptor(ch, bearer);
    let id = uuid::Uuid::now_v7().to_string();
    let code = |r: Result<(), tonic::Status>| r.err().map_or(Code::Ok, |e| e.code());
    vec![
        (
            "SubmitJob",
            code(
                jobs.submit_job(pb::SubmitJobRequest {
                    spec: Some(sh("true")),
                })
                .await
                .map(|_| ()),
            ),
        ),
        (
            "GetJob",
            code(
                jobs.get_job(pb::GetJobRequest { job_id: id.clone() })
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "ListJobs",
            code(
                jobs.list_jobs(pb::ListJobsRequest::default())
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "CancelJob",
            code(
                jobs.cancel_job(pb::CancelJobRequest {
                    job_id: id.clone(),
                    reason: String::new(),
                })
                .await
                .map(|_| ()),
            ),
        ),
        (
            "RetryJob",
            code(
                jobs.retry_job(pb::RetryJobRequest { job_id: id.clone() })
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "WatchJob",
            code(
                jobs.watch_job(pb::WatchJobRequest {
                    job_id: id.clone(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            ),
        ),
        (
            "GetLogs",
            code(
                jobs.get_logs(pb::GetLogsRequest {
                    job_id: id.clone(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            ),
        ),
        (
            "ListRunners",
            code(
                admin
                    .list_runners(pb::ListRunnersRequest::default())
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "GetRunner",
            code(
                admin
                    .get_runner(pb::GetRunnerRequest {
                        runner_id: id.clone(),
                    })
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "DrainRunner",
            code(
                admin
                    .drain_runner(pb::DrainRunnerRequest {
                        runner_id: id.clone(),
                        reason: String::new(),
                    })
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "GetStats",
            code(admin.get_stats(pb::GetStatsRequest {}).await.map(|_| ())),
        ),
        (
            "Register",
            code(
                runner
                    .register(pb::RegisterRequest {
                        name: "x".into(),
                        capacity: 1,
                        executors: vec![2],
                        ..Default::default()
                    })
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "Claim",
            code(runner.claim(pb::ClaimRequest::default()).await.map(|_| ())),
        ),
        (
            "Heartbeat",
            code(
                runner
                    .heartbeat(pb::HeartbeatRequest::default())
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "ReportEvents",
            code(
                runner
                    .report_events(tokio_stream::iter(Vec::<pb::Report>::new()))
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "PollCommands",
            code(
                runner
                    .poll_commands(pb::PollCommandsRequest::default())
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "AckCommand",
            code(
                runner
                    .ack_command(pb::AckCommandRequest::default())
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "Session",
            code(
                runner
                    .session(tokio_stream::iter(Vec::<pb::SessionRequest>::new()))
                    .await
                    .map(|_| ()),
            ),
        ),
    ]
}

async fn every_rpc_refuses_missing_and_wrong_tokens(db: Db) {
    let server = TestServer::start(db).await;
    for bearer in [
        Bearer(None),
        Bearer::new("wrong"),
        Bearer::new("grc_0000_bogus"),
    ] {
        for (rpc, code) in call_all(&server, bearer).await {
            assert_eq!(code, Code::Unauthenticated, "{rpc} without a valid token");
        }
    }
    // Each kind of token opens only its own door; at another door its bearer is known, but
    // not allowed: PERMISSION_DENIED, not UNAUTHENTICATED.
    let runner = server.runner("r", &[], 1).await;
    for (token, kind) in [
        (server.api_token.clone(), "api"),
        (server.registration_token.clone(), "registration"),
        (runner.credential.clone(), "runner"),
    ] {
        for (rpc, code) in call_all(&server, Bearer::new(&token)).await {
            let runner_rpc = matches!(
                rpc,
                "Claim" | "Heartbeat" | "ReportEvents" | "PollCommands" | "AckCommand" | "Session"
            );
            let allowed = match kind {
                "api" => !runner_rpc && rpc != "Register",
                "registration" => rpc == "Register",
                _ => runner_rpc,
            };
            if allowed {
                assert!(
                    !matches!(code, Code::Unauthenticated | Code::PermissionDenied),
                    "{rpc} with the {kind} token: {code:?}"
                );
            } else {
                assert_eq!(code, Code::PermissionDenied, "{rpc} with the {kind} token");
            }
        }
    }
    // Nothing was stored by the refused calls (the api-token round submitted one job).
    let mut jobs = server.jobs().await;
    let listed = jobs
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.jobs.len(), 1);
    server.stop().await;
}

fn expect_invalid<T: std::fmt::Debug>(what: &str, r: Result<T, tonic::Status>, field: &str) {
    let err = r.expect_err(what);
    assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err}");
    assert!(
        err.message().contains(field),
        "{what}: message {:?} should name {field}",
        err.message()
    );
}

async fn bad_input_names_the_field_and_changes_nothing(db: Db) {
    let server = TestServer::start(db).await;
    let mut jobs = server.jobs().await;
    let mut admin = server.admin().await;
    let mut runner = server.runner("r", &[], 1).await;

    let bad_specs: Vec<(pb::JobSpec, &str)> = vec![
        (pb::JobSpec::default(), "spec.command"),
        (
            pb::JobSpec {
                executor: pb::ExecutorKind::Docker as i32,
                ..Default::default()
            },
            "spec.image",
        ),
        (
            {
                let mut s = sh("x");
                s.labels.insert("Bad Key".into(), "v".into());
                s
            },
            "spec.labels",
        ),
        (
            {
                let mut s = sh("x");
                s.timeout_seconds = 999_999_999;
                s
            },
            "spec.timeout_seconds",
        ),
        (
            {
                let mut s = sh("x");
                s.retry = Some(pb::RetryPolicy {
                    max_attempts: 101,
                    ..Default::default()
                });
                s
            },
            "spec.retry.max_attempts",
        ),
        (
            {
                let mut s = sh("x");
                s.priority = -5000;
                s
            },
            "spec.priority",
        ),
        (
            {
                let mut s = sh("x");
                s.queue = "no spaces".into();
                s
            },
            "spec.queue",
        ),
        (
            {
                let mut s = sh("x");
                s.env.insert("A-B".into(), "v".into());
                s
            },
            "spec.env",
        ),
        (
            {
                let mut s = sh("x");
                s.resources = Some(pb::Resources {
                    memory_bytes: 10,
                    cpu_millis: 0,
                });
                s
            },
            "spec.resources.memory_bytes",
        ),
        (
            {
                let mut s = sh("x");
                s.working_dir = "relative".into();
                s
            },
            "spec.working_dir",
        ),
    ];
    for (spec, field) in bad_specs {
        expect_invalid(
            field,
            jobs.submit_job(pb::SubmitJobRequest { spec: Some(spec) })
                .await,
            field,
        );
    }
    expect_invalid(
        "no spec",
        jobs.submit_job(pb::SubmitJobRequest { spec: None }).await,
        "spec",
    );
    expect_invalid(
        "get",
        jobs.get_job(pb::GetJobRequest {
            job_id: "nope".into(),
        })
        .await,
        "job_id",
    );
    expect_invalid(
        "get empty",
        jobs.get_job(pb::GetJobRequest {
            job_id: String::new(),
        })
        .await,
        "job_id",
    );
    expect_invalid(
        "list size",
        jobs.list_jobs(pb::ListJobsRequest {
            page_size: 5000,
            ..Default::default()
        })
        .await,
        "page_size",
    );
    expect_invalid(
        "list token",
        jobs.list_jobs(pb::ListJobsRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await,
        "page_token",
    );
    expect_invalid(
        "list status",
        jobs.list_jobs(pb::ListJobsRequest {
            statuses: vec![77],
            ..Default::default()
        })
        .await,
        "statuses",
    );
    expect_invalid(
        "list runner",
        jobs.list_jobs(pb::ListJobsRequest {
            runner_id: "x".into(),
            ..Default::default()
        })
        .await,
        "runner_id",
    );
    expect_invalid(
        "cancel",
        jobs.cancel_job(pb::CancelJobRequest {
            job_id: "x".into(),
            reason: String::new(),
        })
        .await,
        "job_id",
    );
    expect_invalid(
        "retry",
        jobs.retry_job(pb::RetryJobRequest { job_id: "x".into() })
            .await,
        "job_id",
    );
    expect_invalid(
        "watch",
        jobs.watch_job(pb::WatchJobRequest {
            job_id: "x".into(),
            ..Default::default()
        })
        .await,
        "job_id",
    );
    expect_invalid(
        "logs",
        jobs.get_logs(pb::GetLogsRequest {
            job_id: "x".into(),
            ..Default::default()
        })
        .await,
        "job_id",
    );
    expect_invalid(
        "runners",
        admin
            .list_runners(pb::ListRunnersRequest {
                states: vec![42],
                ..Default::default()
            })
            .await,
        "states",
    );
    expect_invalid(
        "runner",
        admin
            .get_runner(pb::GetRunnerRequest {
                runner_id: "x".into(),
            })
            .await,
        "runner_id",
    );
    expect_invalid(
        "drain",
        admin
            .drain_runner(pb::DrainRunnerRequest {
                runner_id: String::new(),
                reason: String::new(),
            })
            .await,
        "runner_id",
    );

    let mut reg = RunnerServiceClient::with_interceptor(
        server.channel().await,
        Bearer::new(&server.registration_token),
    );
    let good = pb::RegisterRequest {
        name: "n".into(),
        capacity: 1,
        executors: vec![pb::ExecutorKind::Process as i32],
        ..Default::default()
    };
    expect_invalid(
        "register name",
        reg.register(pb::RegisterRequest {
            name: String::new(),
            ..good.clone()
        })
        .await,
        "name",
    );
    expect_invalid(
        "register capacity",
        reg.register(pb::RegisterRequest {
            capacity: 0,
            ..good.clone()
        })
        .await,
        "capacity",
    );
    expect_invalid(
        "register executors",
        reg.register(pb::RegisterRequest {
            executors: vec![],
            ..good.clone()
        })
        .await,
        "executors",
    );
    expect_invalid(
        "register labels",
        reg.register(pb::RegisterRequest {
            labels: [("UP".to_string(), "v".to_string())].into(),
            ..good.clone()
        })
        .await,
        "labels",
    );
    expect_invalid(
        "claim max",
        runner
            .client
            .claim(pb::ClaimRequest {
                max_jobs: 1000,
                wait_seconds: 0,
            })
            .await,
        "max_jobs",
    );
    expect_invalid(
        "claim wait",
        runner
            .client
            .claim(pb::ClaimRequest {
                max_jobs: 1,
                wait_seconds: 3600,
            })
            .await,
        "wait_seconds",
    );
    expect_invalid(
        "poll wait",
        runner
            .client
            .poll_commands(pb::PollCommandsRequest {
                after_sequence: 0,
                wait_seconds: 61,
            })
            .await,
        "wait_seconds",
    );
    expect_invalid(
        "ack",
        runner
            .client
            .ack_command(pb::AckCommandRequest { sequence: 5 })
            .await,
        "sequence",
    );

    // Reports: each malformed report is refused and stores nothing.
    let id = submit(&mut jobs, sh("echo x")).await;
    let a = runner.claim_one().await;
    let bad_reports: Vec<(u64, pb::report::Body, &str)> = vec![
        (0, status(JobStatus::Running), "sequence"),
        (
            1,
            pb::report::Body::Status(pb::StatusReport {
                status: JobStatus::Queued as i32,
                ..Default::default()
            }),
            "status.status",
        ),
        (
            1,
            pb::report::Body::Status(pb::StatusReport {
                status: JobStatus::Failed as i32,
                ..Default::default()
            }),
            "status.failure_kind",
        ),
        (
            1,
            pb::report::Body::Progress(pb::Progress {
                percent: 101,
                ..Default::default()
            }),
            "progress.percent",
        ),
        (
            1,
            pb::report::Body::Log(pb::LogData {
                stream: 0,
                offset: 0,
                data: b"x".to_vec(),
            }),
            "log.stream",
        ),
        (1, stdout(100, b"gap"), "log.offset"),
        (
            1,
            pb::report::Body::Phase(pb::PhaseChange {
                phase: 0,
                message: String::new(),
            }),
            "phase.phase",
        ),
    ];
    for (seq, body, field) in bad_reports {
        expect_invalid(
            field,
            runner.report_seq(&id, &a.lease_id, seq, body).await,
            field,
        );
    }
    expect_invalid(
        "report job id",
        runner
            .report_seq("nope", &a.lease_id, 1, status(JobStatus::Running))
            .await,
        "job_id",
    );
    expect_invalid(
        "report lease id",
        runner
            .report_seq(&id, "nope", 1, status(JobStatus::Running))
            .await,
        "lease_id",
    );
    // A session must start with hello.
    let resp = runner
        .client
        .session(tokio_stream::iter(vec![pb::SessionRequest {
            kind: Some(pb::session_request::Kind::Credits(pb::Credits { slots: 1 })),
        }]))
        .await
        .expect("stream opens");
    let first = resp.into_inner().message().await;
    expect_invalid("session without hello", first, "hello");

    let job = get(&mut jobs, &id).await;
    assert_eq!(
        job.status,
        JobStatus::Assigned as i32,
        "refused reports changed nothing"
    );
    assert_eq!(
        job.last_event_sequence, 2,
        "only submit and claim events exist"
    );
    let listed = jobs
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.jobs.len(), 1, "no invalid job was stored");
    server.stop().await;
}

async fn list_filters_pages_and_stats(db: Db) {
    let server = TestServer::start(db).await;
    let mut jobs = server.jobs().await;
    let mut admin = server.admin().await;
    let mut ids = Vec::new();
    for i in 0..7 {
        let mut spec = sh("true");
        if i % 2 == 0 {
            spec.queue = "gpu".into();
            spec.labels.insert("arch".into(), "arm64".into());
        }
        ids.push(submit(&mut jobs, spec).await);
    }
    let mut runner = server.runner("r", &[("arch", "arm64")], 1).await;
    // The runner serves the default queue: it gets the oldest default job.
    let claimed = runner.claim_one().await;
    assert_eq!(claimed.job_id, ids[1]);
    // Newest first, in pages of 3.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = jobs
            .list_jobs(pb::ListJobsRequest {
                page_size: 3,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner();
        assert!(page.jobs.len() <= 3);
        seen.extend(page.jobs.into_iter().map(|j| j.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first);
    let gpu = jobs
        .list_jobs(pb::ListJobsRequest {
            queue: "gpu".into(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(gpu.jobs.len(), 4);
    let arm = jobs
        .list_jobs(pb::ListJobsRequest {
            labels: [("arch".to_string(), "arm64".to_string())].into(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(arm.jobs.len(), 4);
    jobs.cancel_job(pb::CancelJobRequest {
        job_id: ids[3].clone(),
        reason: String::new(),
    })
    .await
    .expect("cancel");
    let canceled = jobs
        .list_jobs(pb::ListJobsRequest {
            statuses: vec![JobStatus::Canceled as i32],
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(
        canceled
            .jobs
            .iter()
            .map(|j| j.id.clone())
            .collect::<Vec<_>>(),
        vec![ids[3].clone()]
    );
    let by_runner = jobs
        .list_jobs(pb::ListJobsRequest {
            runner_id: runner.id.clone(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(
        by_runner
            .jobs
            .iter()
            .map(|j| j.id.clone())
            .collect::<Vec<_>>(),
        vec![ids[1].clone()]
    );

    let stats = admin
        .get_stats(pb::GetStatsRequest {})
        .await
        .expect("stats")
        .into_inner();
    let count = |s: JobStatus| {
        stats
            .jobs_by_status
            .iter()
            .find(|c| c.status == s as i32)
            .map_or(0, |c| c.count)
    };
    assert_eq!(count(JobStatus::Queued), 5);
    assert_eq!(count(JobStatus::Assigned), 1);
    assert_eq!(count(JobStatus::Canceled), 1);
    let queue = |q: &str| {
        stats
            .queues
            .iter()
            .find(|s| s.queue == q)
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(queue("gpu").queued, 4);
    assert_eq!(queue("default").queued, 1);
    assert_eq!(queue("default").active, 1);
    assert_eq!(
        stats.runners_by_state.iter().map(|r| r.count).sum::<u64>(),
        1
    );

    let runners = admin
        .list_runners(pb::ListRunnersRequest::default())
        .await
        .expect("runners")
        .into_inner();
    assert_eq!(runners.runners.len(), 1);
    assert_eq!(
        runners.runners[0].labels.get("arch").map(String::as_str),
        Some("arm64")
    );
    assert_eq!(runners.runners[0].active_jobs, 1);
    let one = admin
        .get_runner(pb::GetRunnerRequest {
            runner_id: runner.id.clone(),
        })
        .await
        .expect("runner")
        .into_inner();
    assert_eq!(one.state, pb::RunnerState::Online as i32);
    let missing = admin
        .get_runner(pb::GetRunnerRequest {
            runner_id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .expect_err("missing");
    assert_eq!(missing.code(), Code::NotFound);
    server.stop().await;
}

async fn idempotent_submit_returns_the_first_job(db: Db) {
    let server = TestServer::start(db).await;
    let mut jobs = server.jobs().await;
    let mut spec = sh("echo once");
    spec.idempotency_key = "order-42".into();
    let first = jobs
        .submit_job(pb::SubmitJobRequest {
            spec: Some(spec.clone()),
        })
        .await
        .expect("submit")
        .into_inner();
    assert!(!first.deduplicated);
    // Concurrent resubmits all get the first job.
    let mut handles = Vec::new();
    for _ in 0..8 {
        let mut c = jobs.clone();
        let s = spec.clone();
        handles.push(tokio::spawn(async move {
            c.submit_job(pb::SubmitJobRequest { spec: Some(s) })
                .await
                .expect("resubmit")
                .into_inner()
        }));
    }
    for h in handles {
        let again = h.await.expect("task");
        assert!(again.deduplicated);
        assert_eq!(
            again.job.expect("job").id,
            first.job.clone().expect("job").id
        );
    }
    // A fresh key submitted many times at once (group-committed into one batch, or a few):
    // exactly one job, and exactly one answer that is not a duplicate.
    let mut handles = Vec::new();
    for _ in 0..16 {
        let mut c = jobs.clone();
        let mut s = spec.clone();
        s.idempotency_key = "order-43".into();
        handles.push(tokio::spawn(async move {
            c.submit_job(pb::SubmitJobRequest { spec: Some(s) })
                .await
                .expect("submit")
                .into_inner()
        }));
    }
    let mut ids = std::collections::HashSet::new();
    let mut originals = 0;
    for h in handles {
        let r = h.await.expect("task");
        originals += usize::from(!r.deduplicated);
        ids.insert(r.job.expect("job").id);
    }
    assert_eq!((ids.len(), originals), (1, 1));
    let listed = jobs
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.jobs.len(), 2);
    server.stop().await;
}

async fn retention_deletes_old_terminal_jobs(db: Db) {
    let server = TestServer::start_with(db, |c| c.retention_seconds = 1).await;
    let mut jobs = server.jobs().await;
    let old = submit(&mut jobs, sh("old")).await;
    jobs.cancel_job(pb::CancelJobRequest {
        job_id: old.clone(),
        reason: String::new(),
    })
    .await
    .expect("cancel");
    let live = submit(&mut jobs, sh("live")).await;
    // The reaper deletes it once it is older than the retention; wait for that event.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match jobs
            .get_job(pb::GetJobRequest {
                job_id: old.clone(),
            })
            .await
        {
            Err(e) if e.code() == Code::NotFound => break,
            Ok(_) => {}
            Err(e) => panic!("get: {e}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the finished job was never purged"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        get(&mut jobs, &live).await.status,
        JobStatus::Queued as i32,
        "unfinished jobs are kept"
    );
    // A runner that went away is forgotten too, once offline for longer than the retention.
    let gone = server.runner("gone", &[], 1).await;
    let mut admin = server.admin().await;
    loop {
        match admin
            .get_runner(pb::GetRunnerRequest {
                runner_id: gone.id.clone(),
            })
            .await
        {
            Err(e) if e.code() == Code::NotFound => break,
            Ok(_) => {}
            Err(e) => panic!("get runner: {e}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the silent runner was never purged"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    server.stop().await;
}

async fn dispatch_follows_labels_queues_and_priority(db: Db) {
    let server = TestServer::start(db).await;
    let mut jobs = server.jobs().await;
    let plain = server.runner("plain", &[], 4).await;
    let arm = server
        .runner("arm", &[("arch", "arm64"), ("zone", "a")], 4)
        .await;
    let mut needs_arm = sh("arm only");
    needs_arm.labels.insert("arch".into(), "arm64".into());
    let arm_job = submit(&mut jobs, needs_arm).await;
    let low = submit(&mut jobs, sh("low")).await;
    let mut high = sh("high");
    high.priority = 10;
    let high = submit(&mut jobs, high).await;
    let claim = |c: &TestRunner| {
        let mut c = c.client.clone();
        async move {
            c.claim(pb::ClaimRequest {
                max_jobs: 4,
                wait_seconds: 0,
            })
            .await
            .expect("claim")
            .into_inner()
            .assignments
        }
    };
    let got: Vec<String> = claim(&plain).await.into_iter().map(|a| a.job_id).collect();
    assert_eq!(
        got,
        vec![high.clone(), low.clone()],
        "priority first, then age; the labelled job is not for this runner"
    );
    let got: Vec<String> = claim(&arm).await.into_iter().map(|a| a.job_id).collect();
    assert_eq!(got, vec![arm_job]);

    // Executor kind: a process-only runner never gets a docker job, a docker runner does.
    let docker_job = submit(
        &mut jobs,
        pb::JobSpec {
            image: "busybox".into(),
            ..Default::default()
        },
    )
    .await;
    let process_only = server
        .runner_offering("proc", &[], 4, &[pb::ExecutorKind::Process])
        .await;
    assert!(claim(&process_only).await.is_empty());
    let docker_only = server
        .runner_offering("dock", &[], 4, &[pb::ExecutorKind::Docker])
        .await;
    let got: Vec<String> = claim(&docker_only)
        .await
        .into_iter()
        .map(|a| a.job_id)
        .collect();
    assert_eq!(got, vec![docker_job]);

    // not_before: a job waiting out a retry backoff is not dispatched before its time.
    let mut backoff = sh("fails once");
    backoff.retry = Some(pb::RetryPolicy {
        max_attempts: 2,
        initial_backoff_ms: 3_600_000,
        max_backoff_ms: 0,
    });
    let backoff = submit(&mut jobs, backoff).await;
    let a = claim(&process_only).await.pop().expect("claimed");
    assert_eq!(a.job_id, backoff);
    let mut reporter = process_only;
    reporter
        .report(
            &a,
            pb::report::Body::Status(pb::StatusReport {
                status: JobStatus::Failed as i32,
                exit_code: Some(1),
                failure_kind: pb::FailureKind::ExitNonzero as i32,
                ..Default::default()
            }),
        )
        .await
        .expect("failed");
    let job = get(&mut jobs, &backoff).await;
    assert_eq!(job.status, JobStatus::Queued as i32);
    assert!(
        job.not_before_unix_ms > job.updated_at_unix_ms + 3_500_000,
        "{job:?}"
    );
    assert!(
        claim(&reporter).await.is_empty(),
        "not before its backoff ends"
    );
    server.stop().await;
}
