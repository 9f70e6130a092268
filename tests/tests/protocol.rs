//! The runner protocol end to end, each scenario on SQLite and on PostgreSQL: a real server
//! on a loopback port, driven through the generated clients.
use gantry_proto as pb;
use gantry_tests::*;
use pb::{JobStatus, report::Body, session_response::Kind as Out};

on_both_databases!(
    unary_path_runs_a_job_to_success,
    session_path_pushes_work_and_acks_reports,
    lost_lease_retries_and_second_attempt_succeeds,
    stale_and_foreign_leases_are_fenced,
    duplicate_reports_are_stored_once,
    lock_keys_serialize_and_release_on_every_end,
    cancel_is_pushed_to_a_connected_session,
    cancel_of_a_queued_job_is_immediate_and_final,
    restart_keeps_every_acknowledged_report,
    server_enforces_timeouts,
    unconfirmed_cancel_finishes_by_lease_expiry,
    commands_are_polled_and_acknowledged_without_a_session,
    drain_stops_dispatch_to_a_runner,
    followers_resume_and_follow_live_across_retries,
    a_runner_that_reconnects_without_its_work_loses_it_at_once,
    a_cancel_a_live_runner_never_confirms_ends_canceled,
    session_credits_never_exceed_capacity,
    a_refused_report_stops_the_rest_of_its_batch,
    a_runner_drains_itself_then_deregisters_releasing_what_it_held,
    a_silent_session_is_closed,
);

async fn unary_path_runs_a_job_to_success(db: Db) {
    let server = TestServer::start(db).await;
    let mut jobs = server.jobs().await;
    let mut runner = server.runner("r1", &[], 1).await;
    let id = submit(&mut jobs, sh("echo hello")).await;
    assert_eq!(get(&mut jobs, &id).await.status, JobStatus::Queued as i32);

    let a = runner.claim_one().await;
    assert_eq!(a.job_id, id);
    assert_eq!(a.attempt, 1);
    assert_eq!(get(&mut jobs, &id).await.status, JobStatus::Assigned as i32);

    runner
        .report(
            &a,
            Body::Phase(pb::PhaseChange {
                phase: pb::ExecutorPhase::Starting as i32,
                message: "spawn".into(),
            }),
        )
        .await
        .expect("phase");
    runner
        .report(&a, status(JobStatus::Running))
        .await
        .expect("running");
    runner
        .report(
            &a,
            Body::Progress(pb::Progress {
                percent: 40,
                stage: "load".into(),
                message: "loading".into(),
            }),
        )
        .await
        .expect("progress");
    runner.report(&a, stdout(0, b"hello ")).await.expect("log");
    runner.report(&a, stderr(0, b"warn\n")).await.expect("log");
    runner.report(&a, stdout(6, b"world\n")).await.expect("log");
    let hb = runner
        .client
        .heartbeat(pb::HeartbeatRequest { held: holding(&a) })
        .await
        .expect("heartbeat")
        .into_inner();
    assert!(hb.revoked.is_empty());
    assert!(hb.lease_expires_at_unix_ms >= a.lease_expires_at_unix_ms);
    let resp = runner
        .report(&a, status(JobStatus::Succeeded))
        .await
        .expect("final");
    assert_eq!(resp.acks.len(), 1);
    assert_eq!(resp.acks[0].acked_sequence, 7);

    let job = get(&mut jobs, &id).await;
    assert_eq!(job.status, JobStatus::Succeeded as i32);
    assert_eq!(job.exit_code, Some(0));
    assert_eq!(job.attempts.len(), 1);
    assert_eq!(job.progress.as_ref().map(|p| p.percent), Some(40));
    let events = wait_for_status(&mut jobs, &id, JobStatus::Succeeded).await;
    let statuses: Vec<i32> = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(pb::job_event::Kind::Status(s)) => Some(s.to),
            _ => None,
        })
        .collect();
    assert_eq!(
        statuses,
        vec![
            JobStatus::Queued as i32,
            JobStatus::Assigned as i32,
            JobStatus::Running as i32,
            JobStatus::Succeeded as i32
        ]
    );
    let seqs: Vec<u64> = events.iter().map(|e| e.sequence).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "event sequences have no gaps"
    );
    assert!(events.iter().any(|e| matches!(&e.kind, Some(pb::job_event::Kind::Phase(p)) if p.phase == pb::ExecutorPhase::Starting as i32)));
    let (out, err) = logs(&mut jobs, &id).await;
    assert_eq!(out, b"hello world\n");
    assert_eq!(err, b"warn\n");
    server.stop().await;
}

async fn session_path_pushes_work_and_acks_reports(db: Db) {
    let server = TestServer::start(db).await;
    let mut jobs = server.jobs().await;
    let mut runner = server.runner("r1", &[], 2).await;
    let mut session = runner.session(2, vec![]).await;
    let id = submit(&mut jobs, sh("echo hi")).await;
    let a = session.next_assignment().await;
    assert_eq!(a.job_id, id);
    let mk = |seq, body| pb::Report {
        job_id: a.job_id.clone(),
        lease_id: a.lease_id.clone(),
        sequence: seq,
        body: Some(body),
    };
    let acks = session
        .report(vec![
            mk(1, status(JobStatus::Running)),
            mk(2, stdout(0, b"hi\n")),
            mk(3, status(JobStatus::Succeeded)),
        ])
        .await;
    assert_eq!(acks.acks.len(), 1);
    assert_eq!(acks.acks[0].acked_sequence, 3);
    session
        .send(pb::session_request::Kind::Heartbeat(pb::HeartbeatRequest {
            held: holding(&a),
        }))
        .await;
    loop {
        if let Out::HeartbeatAck(hb) = session.next().await {
            assert_eq!(
                hb.revoked.len(),
                1,
                "the finished attempt's lease is revoked"
            );
            break;
        }
    }
    assert_eq!(
        get(&mut jobs, &id).await.status,
        JobStatus::Succeeded as i32
    );
    assert_eq!(logs(&mut jobs, &id).await.0, b"hi\n");
    // One credit left: a second job is pushed too, a third is not until a credit returns.
    let id2 = submit(&mut jobs, sh("true")).await;
    assert_eq!(session.next_assignment().await.job_id, id2);
    let id3 = submit(&mut jobs, sh("true")).await;
    session
        .send(pb::session_request::Kind::Credits(pb::Credits { slots: 1 }))
        .await;
    assert_eq!(session.next_assignment().await.job_id, id3);
    server.stop().await;
}

async fn lost_lease_retries_and_second_attempt_succeeds(db: Db) {
    let server = TestServer::start(db).await;
    let mut jobs = server.jobs().await;
    let mut first = server.runner("first", &[], 1).await;
    let mut second = server.runner("second", &[], 1).await;
    let mut spec = sh("echo again");
    spec.retry = Some(pb::RetryPolicy {
        max_attempts: 2,
        initial_backoff_ms: 10,
        max_backoff_ms: 10,
    });
    let id = submit(&mut jobs, spec).await;
    let a1 = first.claim_one().await;
    first
        .report(&a1, status(JobStatus::Running))
        .await
        .expect("running");
    // `first` goes silent: its lease expires and the job is queued again.
    let events = wait_for_status(&mut jobs, &id, JobStatus::Queued).await;
    let requeue = events.iter().rev().find_map(|e| match &e.kind {
        Some(pb::job_event::Kind::Status(s)) if s.to == JobStatus::Queued as i32 && s.from != 0 => {
            Some(s.clone())
        }
        _ => None,
    });
    let requeue = requeue.expect("requeue event");
    assert_eq!(requeue.failure_kind, pb::FailureKind::RunnerLost as i32);
    let a2 = second.claim_one().await;
    assert_eq!(a2.job_id, id);
    assert_eq!(a2.attempt, 2);
    assert_ne!(a2.lease_id, a1.lease_id);
    second
        .report(&a2, status(JobStatus::Running))
        .await
        .expect("running");
    second
        .report(&a2, status(JobStatus::Succeeded))
        .await
        .expect("final");
    let job = get(&mut jobs, &id).await;
    assert_eq!(job.status, JobStatus::Succeeded as i32);
    assert_eq!(job.attempts.len(), 2);
    assert_eq!(
        job.attempts[0].failure_kind,
        pb::FailureKind::RunnerLost as i32
    );

    // Without attempts left, a lost lease fails the job with runner_lost (once the runner
    // has reported on it: see a_claim_its_runner_never_received_does_not_count).
    let id = submit(&mut jobs, sh("echo once")).await;
    let a = second.claim_one().await;
    assert_eq!(a.job_id, id);
    second
        .report(&a, status(JobStatus::Running))
        .await
        .expect("running");
    wait_for_status(&mut jobs, &id, JobStatus::Failed).await;
    let job = get(&mut jobs, &id).await;
    assert_eq!(job.failure_kind, pb::FailureKind::RunnerLost as i32);
    server.stop().await;
}

async fn stale_and_foreign_leases_are_fenced(db: Db) {
    let server = TestServer::start(db).await;
    let mut jobs = server.jobs().await;
    let mut owner = server.runner("owner", &[], 1).await;
    let mut other = server.runner("other", &[], 1).await;
    let spec = sh_retried("sleep 1", 3);
    let id = submit(&mut jobs, spec).await;
    let a1 = owner.claim_one().await;
    owner
        .report(&a1, status(JobStatus::Running))
        .await
        .expect("running");

    // Another runner may not report on this attempt.
    let err = other
        .report_seq(&a1.job_id, &a1.lease_id, 1, stdout(0, b"x"))
        .await
        .expect_err("foreign");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");

    // The lease expires; attempt 2 is claimed by `other`; the old lease is now stale.
    wait_for_status(&mut jobs, &id, JobStatus::Queued).await;
    let a2 = other.claim_one().await;
    assert_eq!(a2.attempt, 2);
    let err = owner
        .report(&a1, stdout(0, b"late"))
        .await
        .expect_err("stale");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(
        err.message().contains("no longer current"),
        "{}",
        err.message()
    );
    let err = owner
        .report(&a1, status(JobStatus::Succeeded))
        .await
        .expect_err("stale final");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    // Heartbeat tells the old holder which lease it lost.
    let hb = owner
        .client
        .heartbeat(pb::HeartbeatRequest { held: holding(&a1) })
        .await
        .expect("heartbeat")
        .into_inner();
    assert_eq!(hb.revoked.len(), 1);
    // On a session, a fenced report comes back as `rejected` with the code.
    let mut session = owner.session(0, holding(&a1)).await;
    session
        .send(pb::session_request::Kind::Reports(pb::ReportBatch {
            reports: vec![pb::Report {
                job_id: a1.job_id.clone(),
                lease_id: a1.lease_id.clone(),
                sequence: 10,
                body: Some(stdout(0, b"x")),
            }],
        }))
        .await;
    loop {
        if let Out::Rejected(r) = session.next().await {
            assert_eq!(r.code, tonic::Code::FailedPrecondition as i32);
            break;
        }
    }
    // Nothing of the stale reports was stored, and the job is still the second attempt's.
    other
        .report(&a2, status(JobStatus::Running))
        .await
        .expect("running");
    other
        .report(&a2, status(JobStatus::Succeeded))
        .await
        .expect("final");
    let job = get(&mut jobs, &id).await;
    assert_eq!(job.status, JobStatus::Succeeded as i32);
    let mut first_attempt_logs = jobs
        .get_logs(pb::GetLogsRequest {
            job_id: id.clone(),
            attempt: 1,
            ..Default::default()
        })
        .await
        .expect("logs")
        .into_inner();
    assert!(
        tokio_stream::StreamExt::next(&mut first_attempt_logs)
            .await
            .is_none(),
        "no stale log stored"
    );
    server.stop().await;
}

async fn duplicate_reports_are_stored_once(db: Db) {
    let server = TestServer::start(db).await;
    let mut jobs = server.jobs().await;
    let mut runner = server.runner("r", &[], 1).await;
    let id = submit(&mut jobs, sh("echo dup")).await;
    let a = runner.claim_one().await;
    for round in 0..3u64 {
        // Acknowledgements are cumulative: a resend is answered with the highest stored.
        let r = runner
            .report_seq(&id, &a.lease_id, 1, status(JobStatus::Running))
            .await
            .expect("running");
        assert_eq!(r.acks[0].acked_sequence, if round == 0 { 1 } else { 3 });
        let r = runner
            .report_seq(&id, &a.lease_id, 2, stdout(0, b"once\n"))
            .await
            .expect("log");
        assert_eq!(r.acks[0].acked_sequence, if round == 0 { 2 } else { 3 });
        let r = runner
            .report_seq(
                &id,
                &a.lease_id,
                3,
                Body::Progress(pb::Progress {
                    percent: 50,
                    stage: "s".into(),
                    message: String::new(),
                }),
            )
            .await
            .expect("progress");
        assert_eq!(r.acks[0].acked_sequence, 3);
    }
    // A resend that overlaps stored bytes (re-coalesced chunks) stores only the new part.
    runner
        .report_seq(&id, &a.lease_id, 4, stdout(0, b"once\nmore\n"))
        .await
        .expect("overlap");
    for _ in 0..2 {
        runner
            .report_seq(&id, &a.lease_id, 5, status(JobStatus::Succeeded))
            .await
            .expect("final, resent");
    }
    assert_eq!(logs(&mut jobs, &id).await.0, b"once\nmore\n");
    let events = wait_for_status(&mut jobs, &id, JobStatus::Succeeded).await;
    let progress = events
        .iter()
        .filter(|e| matches!(e.kind, Some(pb::job_event::Kind::Progress(_))))
        .count();
    assert_eq!(progress, 1);
    let running = events
        .iter()
        .filter(|e| matches!(&e.kind, Some(pb::job_event::Kind::Status(s)) if s.to == JobStatus::Running as i32))
        .count();
    assert_eq!(running, 1);
    let finals = events
        .iter()
        .filter(|e| matches!(&e.kind, Some(pb::job_event::Kind::Status(s)) if s.to == JobStatus::Succeeded as i32))
        .count();
    assert_eq!(finals, 1, "the final status is recorded exactly once");
    server.stop().await;
}

async fn lock_keys_serialize_and_release_on_every_end(db: Db) {
    let server = TestServer::start(db).await;
    let mut jobs = server.jobs().await;
    let mut runner = server.runner("r", &[], 8).await;
    let locked = |script: &str| {
        let mut s = sh(script);
        s.lock_key = "deploy-prod".into();
        s
    };
    let ids = [
        submit(&mut jobs, locked("one")).await,
        submit(&mut jobs, locked("two")).await,
        submit(&mut jobs, locked("three")).await,
        submit(&mut jobs, locked("four")).await,
        submit(&mut jobs, locked("five")).await,
    ];
    let free = submit(&mut jobs, sh("unlocked")).await;
    let claim_all = |runner: &mut TestRunner| {
        let mut c = runner.client.clone();
        async move {
            c.claim(pb::ClaimRequest {
                max_jobs: 8,
                wait_seconds: 0,
            })
            .await
            .expect("claim")
            .into_inner()
            .assignments
        }
    };
    // One locked job and the unlocked one, never two holders of the key.
    let got = claim_all(&mut runner).await;
    let got_ids: Vec<&str> = got.iter().map(|a| a.job_id.as_str()).collect();
    assert_eq!(got.len(), 2, "{got_ids:?}");
    assert!(got_ids.contains(&ids[0].as_str()) && got_ids.contains(&free.as_str()));
    let a1 = got.into_iter().find(|a| a.job_id == ids[0]).expect("first");
    assert!(claim_all(&mut runner).await.is_empty(), "the key is held");

    // Released on success.
    runner
        .report(&a1, status(JobStatus::Succeeded))
        .await
        .expect("final");
    let a2 = runner.claim_one().await;
    assert_eq!(a2.job_id, ids[1]);
    assert!(claim_all(&mut runner).await.is_empty());
    // Released on failure.
    runner
        .report(
            &a2,
            Body::Status(pb::StatusReport {
                status: JobStatus::Failed as i32,
                exit_code: Some(3),
                failure_kind: pb::FailureKind::ExitNonzero as i32,
                message: "exit 3".into(),
                ..Default::default()
            }),
        )
        .await
        .expect("failed");
    let a3 = runner.claim_one().await;
    assert_eq!(a3.job_id, ids[2]);
    // Released on cancel (confirmed by the runner).
    jobs.cancel_job(pb::CancelJobRequest {
        job_id: ids[2].clone(),
        reason: "test".into(),
    })
    .await
    .expect("cancel");
    assert!(
        claim_all(&mut runner).await.is_empty(),
        "held while CANCELING"
    );
    runner
        .report(
            &a3,
            Body::Status(pb::StatusReport {
                status: JobStatus::Canceled as i32,
                ..Default::default()
            }),
        )
        .await
        .expect("canceled");
    let a4 = runner.claim_one().await;
    assert_eq!(a4.job_id, ids[3]);
    runner
        .report(&a4, status(JobStatus::Running))
        .await
        .expect("running");
    // Released on lease loss.
    wait_for_status(&mut jobs, &ids[3], JobStatus::Failed).await;
    let a5 = runner.claim_one().await;
    assert_eq!(a5.job_id, ids[4]);
    assert_eq!(
        get(&mut jobs, &ids[3]).await.failure_kind,
        pb::FailureKind::RunnerLost as i32
    );
    server.stop().await;
}

async fn cancel_is_pushed_to_a_connected_session(db: Db) {
    // The session's safety-net re-check is set to an hour: only the push can deliver.
    let server = TestServer::start_with(db, |c| c.session_recheck_ms = 3_600_000).await;
    let mut jobs = server.jobs().await;
    let mut runner = server.runner("r", &[], 1).await;
    let mut session = runner.session(1, vec![]).await;
    let id = submit(&mut jobs, sh("sleep 600")).await;
    let a = session.next_assignment().await;
    session
        .report(vec![pb::Report {
            job_id: id.clone(),
            lease_id: a.lease_id.clone(),
            sequence: 1,
            body: Some(status(JobStatus::Running)),
        }])
        .await;
    let resp = jobs
        .cancel_job(pb::CancelJobRequest {
            job_id: id.clone(),
            reason: "user".into(),
        })
        .await
        .expect("cancel")
        .into_inner();
    assert_eq!(resp.job.expect("job").status, JobStatus::Canceling as i32);
    let cmd = loop {
        if let Out::Command(c) = session.next().await {
            break c;
        }
    };
    match cmd.kind {
        Some(pb::command::Kind::Cancel(c)) => {
            assert_eq!(c.job_id, id);
            assert_eq!(c.lease_id, a.lease_id);
            assert_eq!(c.reason, "user");
        }
        other => panic!("expected a cancel command, got {other:?}"),
    }
    session
        .send(pb::session_request::Kind::CommandAck(
            pb::AckCommandRequest {
                sequence: cmd.sequence,
            },
        ))
        .await;
    session
        .report(vec![pb::Report {
            job_id: id.clone(),
            lease_id: a.lease_id.clone(),
            sequence: 2,
            body: Some(pb::report::Body::Status(pb::StatusReport {
                status: JobStatus::Canceled as i32,
                ..Default::default()
            })),
        }])
        .await;
    let job = get(&mut jobs, &id).await;
    assert_eq!(job.status, JobStatus::Canceled as i32);
    assert_eq!(job.failure_kind, pb::FailureKind::Canceled as i32);
    server.stop().await;
}

async fn cancel_of_a_queued_job_is_immediate_and_final(db: Db) {
    let server = TestServer::start(db).await;
    let mut jobs = server.jobs().await;
    let id = submit(&mut jobs, sh("never")).await;
    let resp = jobs
        .cancel_job(pb::CancelJobRequest {
            job_id: id.clone(),
            reason: String::new(),
        })
        .await
        .expect("cancel")
        .into_inner();
    assert_eq!(resp.job.expect("job").status, JobStatus::Canceled as i32);
    let err = jobs
        .cancel_job(pb::CancelJobRequest {
            job_id: id.clone(),
            reason: String::new(),
        })
        .await
        .expect_err("terminal");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let mut runner = server.runner("r", &[], 1).await;
    let none = runner
        .client
        .claim(pb::ClaimRequest {
            max_jobs: 1,
            wait_seconds: 0,
        })
        .await
        .expect("claim")
        .into_inner();
    assert!(
        none.assignments.is_empty(),
        "a canceled job is never dispatched"
    );
    // RetryJob makes a new job from the terminal one.
    let retried = jobs
        .retry_job(pb::RetryJobRequest { job_id: id.clone() })
        .await
        .expect("retry")
        .into_inner()
        .job
        .expect("job");
    assert_ne!(retried.id, id);
    assert_eq!(retried.retried_from_job_id, id);
    assert_eq!(retried.status, JobStatus::Queued as i32);
    server.stop().await;
}

async fn restart_keeps_every_acknowledged_report(db: Db) {
    let mut server = TestServer::start_with(db, |c| c.lease_seconds = 30).await;
    let mut jobs = server.jobs().await;
    let mut runner = server.runner("r", &[], 1).await;
    let id = submit(&mut jobs, sh("echo long")).await;
    let a = runner.claim_one().await;
    let held = holding(&a);
    let mut session = runner.session(0, held).await;
    let mut expected = Vec::new();
    let mut reports = vec![pb::Report {
        job_id: id.clone(),
        lease_id: a.lease_id.clone(),
        sequence: 1,
        body: Some(status(JobStatus::Running)),
    }];
    for i in 0..50u64 {
        let line = format!("line {i}\n");
        reports.push(pb::Report {
            job_id: id.clone(),
            lease_id: a.lease_id.clone(),
            sequence: i + 2,
            body: Some(stdout(expected.len() as u64, line.as_bytes())),
        });
        expected.extend_from_slice(line.as_bytes());
    }
    let acks = session.report(reports).await;
    assert_eq!(acks.acks[0].acked_sequence, 51);
    drop(session);

    server.restart().await;

    let mut jobs = server.jobs().await;
    runner.reconnect(&server).await;
    let mut session = runner.session(0, holding(&a)).await;
    assert_eq!(
        logs(&mut jobs, &id).await.0,
        expected,
        "every acknowledged byte survived the restart"
    );
    // The runner resends what it is unsure of (seq 51) plus new reports; the duplicate is ignored.
    let tail = b"done\n";
    let acks = session
        .report(vec![
            pb::Report {
                job_id: id.clone(),
                lease_id: a.lease_id.clone(),
                sequence: 51,
                body: Some(stdout(expected.len() as u64 - 8, b"line 49\n")),
            },
            pb::Report {
                job_id: id.clone(),
                lease_id: a.lease_id.clone(),
                sequence: 52,
                body: Some(stdout(expected.len() as u64, tail)),
            },
            pb::Report {
                job_id: id.clone(),
                lease_id: a.lease_id.clone(),
                sequence: 53,
                body: Some(status(JobStatus::Succeeded)),
            },
        ])
        .await;
    assert_eq!(acks.acks[0].acked_sequence, 53);
    expected.extend_from_slice(tail);
    assert_eq!(logs(&mut jobs, &id).await.0, expected);
    assert_eq!(
        get(&mut jobs, &id).await.status,
        JobStatus::Succeeded as i32
    );
    server.stop().await;
}

async fn server_enforces_timeouts(db: Db) {
    let server = TestServer::start(db).await;
    let mut jobs = server.jobs().await;
    let mut runner = server.runner("r", &[], 1).await;
    let mut spec = sh("sleep 100");
    spec.timeout_seconds = 1;
    let id = submit(&mut jobs, spec).await;
    let a = runner.claim_one().await;
    runner
        .report(&a, status(JobStatus::Running))
        .await
        .expect("running");
    // The runner keeps its lease alive but never reports an end: the server times it out.
    let beat = runner.keep_alive(&[&a]);
    wait_for_status(&mut jobs, &id, JobStatus::TimedOut).await;
    beat.abort();
    let job = get(&mut jobs, &id).await;
    assert_eq!(job.failure_kind, pb::FailureKind::Timeout as i32);
    server.stop().await;
}

async fn unconfirmed_cancel_finishes_by_lease_expiry(db: Db) {
    let server = TestServer::start(db).await;
    let mut jobs = server.jobs().await;
    let mut runner = server.runner("r", &[], 1).await;
    let spec = sh_retried("sleep 100", 5);
    let id = submit(&mut jobs, spec).await;
    let a = runner.claim_one().await;
    runner
        .report(&a, status(JobStatus::Running))
        .await
        .expect("running");
    jobs.cancel_job(pb::CancelJobRequest {
        job_id: id.clone(),
        reason: String::new(),
    })
    .await
    .expect("cancel");
    // The runner never confirms and goes silent: the lease expiry ends the job CANCELED,
    // not retried even though attempts remain.
    wait_for_status(&mut jobs, &id, JobStatus::Canceled).await;
    let job = get(&mut jobs, &id).await;
    assert_eq!(job.status, JobStatus::Canceled as i32);
    assert_eq!(job.attempt_count, 1);
    server.stop().await;
}

async fn commands_are_polled_and_acknowledged_without_a_session(db: Db) {
    let server = TestServer::start(db).await;
    let mut jobs = server.jobs().await;
    let mut runner = server.runner("r", &[], 1).await;
    let id = submit(&mut jobs, sh("sleep 100")).await;
    let a = runner.claim_one().await;
    let mut poller = runner.client.clone();
    let poll = tokio::spawn(async move {
        poller
            .poll_commands(pb::PollCommandsRequest {
                after_sequence: 0,
                wait_seconds: 30,
            })
            .await
            .expect("poll")
            .into_inner()
    });
    jobs.cancel_job(pb::CancelJobRequest {
        job_id: id.clone(),
        reason: "stop".into(),
    })
    .await
    .expect("cancel");
    let polled = poll.await.expect("poll task");
    assert_eq!(polled.commands.len(), 1);
    let cmd = &polled.commands[0];
    assert!(matches!(&cmd.kind, Some(pb::command::Kind::Cancel(c)) if c.lease_id == a.lease_id));
    // Unacknowledged commands come back on heartbeat too.
    let hb = runner
        .client
        .heartbeat(pb::HeartbeatRequest::default())
        .await
        .expect("hb")
        .into_inner();
    assert_eq!(hb.commands.len(), 1);
    runner
        .client
        .ack_command(pb::AckCommandRequest {
            sequence: cmd.sequence,
        })
        .await
        .expect("ack");
    let hb = runner
        .client
        .heartbeat(pb::HeartbeatRequest::default())
        .await
        .expect("hb")
        .into_inner();
    assert!(
        hb.commands.is_empty(),
        "acknowledged commands are not sent again"
    );
    let err = runner
        .client
        .ack_command(pb::AckCommandRequest { sequence: 99 })
        .await
        .expect_err("beyond");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    server.stop().await;
}

async fn drain_stops_dispatch_to_a_runner(db: Db) {
    let server = TestServer::start(db).await;
    let mut jobs = server.jobs().await;
    let mut admin = server.admin().await;
    let mut runner = server.runner("r", &[], 1).await;
    let mut session = runner.session(0, vec![]).await;
    let drained = admin
        .drain_runner(pb::DrainRunnerRequest {
            runner_id: runner.id.clone(),
            reason: "maintenance".into(),
        })
        .await
        .expect("drain")
        .into_inner();
    assert_eq!(drained.state, pb::RunnerState::Draining as i32);
    match session.next().await {
        Out::Command(pb::Command {
            kind: Some(pb::command::Kind::Drain(d)),
            ..
        }) => assert_eq!(d.reason, "maintenance"),
        other => panic!("expected a drain command, got {other:?}"),
    }
    submit(&mut jobs, sh("true")).await;
    let none = runner
        .client
        .claim(pb::ClaimRequest {
            max_jobs: 1,
            wait_seconds: 0,
        })
        .await
        .expect("claim")
        .into_inner();
    assert!(
        none.assignments.is_empty(),
        "a draining runner gets no work"
    );
    server.stop().await;
}

async fn followers_resume_and_follow_live_across_retries(db: Db) {
    let server = TestServer::start(db).await;
    let mut jobs = server.jobs().await;
    let mut runner = server.runner("r", &[], 1).await;
    let spec = sh_retried("echo twice", 2);
    let id = submit(&mut jobs, spec).await;

    // Follow the logs (attempt 0: the latest, then every later one) before anything ran.
    let mut follower = jobs
        .get_logs(pb::GetLogsRequest {
            job_id: id.clone(),
            follow: true,
            ..Default::default()
        })
        .await
        .expect("follow logs")
        .into_inner();
    let collected = tokio::spawn(async move {
        let mut chunks = Vec::new();
        while let Some(chunk) = tokio_stream::StreamExt::next(&mut follower).await {
            let chunk = chunk.expect("chunk");
            chunks.push((chunk.attempt, chunk.offset, chunk.data));
        }
        chunks
    });

    // Attempt 1 writes a line, then its runner goes silent and the lease expires.
    let a1 = runner.claim_one().await;
    runner
        .report(&a1, status(JobStatus::Running))
        .await
        .expect("running");
    runner
        .report(&a1, stdout(0, b"first\n"))
        .await
        .expect("log");
    wait_for_status(&mut jobs, &id, JobStatus::Queued).await;
    // Attempt 2 writes in two reports, then succeeds.
    let a2 = runner.claim_one().await;
    assert_eq!(a2.attempt, 2);
    runner
        .report(&a2, status(JobStatus::Running))
        .await
        .expect("running");
    runner
        .report(&a2, stdout(0, b"second "))
        .await
        .expect("log");
    runner.report(&a2, stdout(7, b"try\n")).await.expect("log");
    runner
        .report(&a2, status(JobStatus::Succeeded))
        .await
        .expect("final");

    // The follower saw both attempts, live, and its stream ended with the job.
    let chunks = tokio::time::timeout(PATIENCE, collected)
        .await
        .expect("follower ends")
        .expect("task");
    let per_attempt = |n: u32| {
        chunks
            .iter()
            .filter(|c| c.0 == n)
            .flat_map(|c| c.2.clone())
            .collect::<Vec<u8>>()
    };
    assert_eq!(per_attempt(1), b"first\n");
    assert_eq!(per_attempt(2), b"second try\n");
    assert!(
        chunks.windows(2).all(|w| w[0].0 <= w[1].0),
        "attempts in order: {chunks:?}"
    );

    // Replay from an offset: attempt 2's stdout from byte 7.
    let mut from_offset = jobs
        .get_logs(pb::GetLogsRequest {
            job_id: id.clone(),
            attempt: 2,
            stream: pb::LogStream::Stdout as i32,
            stdout_offset: 7,
            ..Default::default()
        })
        .await
        .expect("logs from offset")
        .into_inner();
    let mut tail = Vec::new();
    while let Some(chunk) = tokio_stream::StreamExt::next(&mut from_offset).await {
        let chunk = chunk.expect("chunk");
        if tail.is_empty() {
            assert_eq!(chunk.offset, 7);
        }
        tail.extend(chunk.data);
    }
    assert_eq!(tail, b"try\n");
    let err = jobs
        .get_logs(pb::GetLogsRequest {
            job_id: id.clone(),
            attempt: 3,
            ..Default::default()
        })
        .await
        .expect_err("no third attempt");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // Resume the event trail after a sequence: exactly the events after it.
    let last = get(&mut jobs, &id).await.last_event_sequence;
    let mut resumed = jobs
        .watch_job(pb::WatchJobRequest {
            job_id: id.clone(),
            after_sequence: last - 2,
            follow: true,
        })
        .await
        .expect("watch")
        .into_inner();
    let mut seqs = Vec::new();
    while let Some(ev) = tokio_stream::StreamExt::next(&mut resumed).await {
        seqs.push(ev.expect("event").sequence);
    }
    assert_eq!(
        seqs,
        vec![last - 1, last],
        "a terminal job's follow ends after its last event"
    );
    server.stop().await;
}

async fn a_runner_that_reconnects_without_its_work_loses_it_at_once(db: Db) {
    // A long lease: only the session's hello can end the attempt before the test's patience.
    let server = TestServer::start_with(db, |c| c.lease_seconds = 600).await;
    let mut jobs = server.jobs().await;
    let mut runner = server.runner("r", &[], 1).await;
    let spec = sh_retried("echo lost", 2);
    let id = submit(&mut jobs, spec).await;
    let a1 = runner.claim_one().await;
    runner
        .report(&a1, status(JobStatus::Running))
        .await
        .expect("running");
    // The runner restarted and lost its work: its hello holds nothing.
    let mut session = runner.session(1, vec![]).await;
    let a2 = session.next_assignment().await;
    assert_eq!(a2.job_id, id);
    assert_eq!(a2.attempt, 2);
    let job = get(&mut jobs, &id).await;
    assert_eq!(job.attempts[0].lease_id, a1.lease_id);
    assert_eq!(
        job.attempts[0].failure_kind,
        pb::FailureKind::RunnerLost as i32
    );
    server.stop().await;
}

async fn a_cancel_a_live_runner_never_confirms_ends_canceled(db: Db) {
    let server = TestServer::start(db).await;
    let mut jobs = server.jobs().await;
    let mut runner = server.runner("r", &[], 1).await;
    let mut spec = sh("trap '' TERM; sleep 100");
    spec.cancel_grace_seconds = 1;
    let id = submit(&mut jobs, spec).await;
    let a = runner.claim_one().await;
    runner
        .report(&a, status(JobStatus::Running))
        .await
        .expect("running");
    // The runner stays alive (heartbeats keep its lease) but never confirms the cancel.
    let beat = runner.keep_alive(&[&a]);
    jobs.cancel_job(pb::CancelJobRequest {
        job_id: id.clone(),
        reason: String::new(),
    })
    .await
    .expect("cancel");
    wait_for_status(&mut jobs, &id, JobStatus::Canceled).await;
    beat.abort();
    let job = get(&mut jobs, &id).await;
    assert_eq!(job.failure_kind, pb::FailureKind::Canceled as i32);
    assert!(
        job.attempts[0].failure_message.contains("did not confirm"),
        "{:?}",
        job.attempts[0]
    );
    server.stop().await;
}

async fn session_credits_never_exceed_capacity(db: Db) {
    let server = TestServer::start(db).await;
    let mut jobs = server.jobs().await;
    let first = submit(&mut jobs, sh("one")).await;
    submit(&mut jobs, sh("two")).await;
    let mut runner = server.runner("r", &[], 1).await;
    // The runner grants 5 slots though it registered a capacity of 1.
    let mut session = runner.session(5, vec![]).await;
    session
        .send(pb::session_request::Kind::Heartbeat(
            pb::HeartbeatRequest::default(),
        ))
        .await;
    // The claim for the hello's credits happens before the heartbeat is read, so every
    // assignment it made arrives before the heartbeat's answer.
    let mut assigned = Vec::new();
    loop {
        match session.next().await {
            Out::Assignment(a) => assigned.push(a.job_id),
            Out::HeartbeatAck(_) => break,
            _ => {}
        }
    }
    assert_eq!(assigned, vec![first]);
    // Unary Claim counts the held attempt against the capacity too.
    let more = runner
        .client
        .claim(pb::ClaimRequest {
            max_jobs: 5,
            wait_seconds: 0,
        })
        .await
        .expect("claim")
        .into_inner();
    assert!(more.assignments.is_empty());
    server.stop().await;
}

async fn a_refused_report_stops_the_rest_of_its_batch(db: Db) {
    let server = TestServer::start(db).await;
    let mut jobs = server.jobs().await;
    let mut runner = server.runner("r", &[], 1).await;
    let id = submit(&mut jobs, sh("x")).await;
    let a = runner.claim_one().await;
    let mut session = runner.session(0, holding(&a)).await;
    let mk = |seq, body| pb::Report {
        job_id: id.clone(),
        lease_id: a.lease_id.clone(),
        sequence: seq,
        body: Some(body),
    };
    session
        .send(pb::session_request::Kind::Reports(pb::ReportBatch {
            reports: vec![
                mk(1, status(JobStatus::Running)),
                mk(2, stdout(50, b"hole")),
                mk(3, stdout(0, b"fine")),
            ],
        }))
        .await;
    let (mut acks, mut rejected) = (Vec::new(), Vec::new());
    while rejected.len() < 2 {
        match session.next().await {
            Out::Acks(a) => acks.extend(a.acks),
            Out::Rejected(r) => rejected.push(r),
            _ => {}
        }
    }
    let acked: Vec<u64> = acks.iter().map(|a| a.acked_sequence).collect();
    assert_eq!(acked, vec![1], "the ack stops before the refused report");
    assert_eq!(rejected[0].code, tonic::Code::InvalidArgument as i32);
    assert!(
        rejected[0].message.contains("log.offset"),
        "{}",
        rejected[0].message
    );
    // Not applied because of the refusal before it: ABORTED, "send it again".
    assert_eq!(rejected[1].code, tonic::Code::Aborted as i32);
    assert!(
        logs(&mut jobs, &id).await.0.is_empty(),
        "nothing after the refused report was stored"
    );
    server.stop().await;
}

async fn a_runner_drains_itself_then_deregisters_releasing_what_it_held(db: Db) {
    let server = TestServer::start(db).await;
    let mut jobs = server.jobs().await;
    let mut admin = server.admin().await;
    let mut runner = server.runner("leaver", &[], 2).await;
    let held = submit(&mut jobs, sh("sleep 60")).await;
    let assignment = runner.claim_one().await;
    assert_eq!(assignment.job_id, held);
    runner
        .report(&assignment, status(JobStatus::Running))
        .await
        .expect("running");
    let session = runner.session(1, holding(&assignment)).await;
    session
        .send(pb::session_request::Kind::Drain(pb::SessionDrain {
            reason: "SIGTERM".into(),
        }))
        .await;
    // The drain is applied in order: a heartbeat answered after it proves it.
    let mut session = session;
    session
        .send(pb::session_request::Kind::Heartbeat(pb::HeartbeatRequest {
            held: vec![lease_ref(&assignment)],
        }))
        .await;
    loop {
        if let Out::HeartbeatAck(_) = session.next().await {
            break;
        }
    }
    let r = admin
        .get_runner(pb::GetRunnerRequest {
            runner_id: runner.id.clone(),
        })
        .await
        .expect("get runner")
        .into_inner();
    assert_eq!(r.state, pb::RunnerState::Draining as i32);
    // A draining runner gets no new work.
    let waiting = submit(&mut jobs, sh("true")).await;
    let none = runner
        .client
        .claim(pb::ClaimRequest {
            max_jobs: 1,
            wait_seconds: 0,
        })
        .await
        .expect("claim")
        .into_inner();
    assert!(none.assignments.is_empty());
    // Bad input changes nothing.
    let err = runner
        .client
        .deregister(pb::DeregisterRequest {
            reason: "x".repeat(2000),
        })
        .await
        .expect_err("too long");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("reason"), "{}", err.message());
    let gone = runner
        .client
        .deregister(pb::DeregisterRequest {
            reason: "drained".into(),
        })
        .await
        .expect("deregister")
        .into_inner();
    assert_eq!(gone.released_attempts, 1);
    let r = admin
        .get_runner(pb::GetRunnerRequest {
            runner_id: runner.id.clone(),
        })
        .await
        .expect("get runner")
        .into_inner();
    assert_eq!(r.state, pb::RunnerState::Offline as i32);
    let job = get(&mut jobs, &held).await;
    assert_eq!(job.status, JobStatus::Failed as i32);
    assert_eq!(job.failure_kind, pb::FailureKind::RunnerLost as i32);
    assert!(
        job.failure_message.contains("deregistered"),
        "{}",
        job.failure_message
    );
    assert_eq!(
        get(&mut jobs, &waiting).await.status,
        JobStatus::Queued as i32
    );
    server.stop().await;
}

async fn a_silent_session_is_closed(db: Db) {
    let server = TestServer::start(db).await;
    let mut runner = server.runner("quiet", &[], 1).await;
    let mut session = runner.session(0, vec![]).await;
    // The runner says nothing (as behind a black-holed connection): the server closes the
    // session after two heartbeat intervals, so no assignment can vanish into it.
    let end = tokio::time::timeout(PATIENCE, session.inbound.message())
        .await
        .expect("the server closes a silent session");
    match end {
        Err(status) => {
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
            assert!(
                status.message().contains("two heartbeat intervals"),
                "{status:?}"
            );
        }
        other => panic!("expected UNAVAILABLE, got {other:?}"),
    }
    server.stop().await;
}
