//! Sandboxes at the protocol: a real server on a loopback port, and a runner driven by the
//! test through the real RunnerService (session and unary calls), so that every rule of the
//! server — placement, commands one at a time, pushed cancels, fencing, loss, idle timeout,
//! one-shot, lock keys, bad input — is checked on its own. `sandbox_runner.rs` runs the same
//! capability end to end with the real runner, processes and the Docker engine.
use gantry_proto as pb;
use gantry_tests::{procs::eventually, *};
use pb::{CommandStatus, JobStatus, SandboxStatus, session_response::Kind as Out};
use tonic::Code;

on_both_databases!(
    a_sandbox_goes_through_its_lifecycle_and_runs_commands_one_at_a_time,
    canceling_a_queued_command_is_immediate_and_a_running_one_is_pushed,
    reports_from_another_runner_or_a_stale_lease_are_refused,
    a_lost_sandbox_fails_with_its_commands_and_releases_its_lock,
    idle_timeout_and_one_shot_delete_the_sandbox,
    a_unary_runner_gets_commands_by_polling,
    bad_input_is_refused_naming_the_field_and_changes_nothing,
    a_lock_key_held_by_a_sandbox_blocks_a_job_until_the_sandbox_is_deleted,
    commands_accepted_at_once_are_numbered_in_order_and_one_refusal_refuses_no_other,
);

/// A process sandbox with these settings.
fn process_sandbox() -> pb::SandboxSpec {
    pb::SandboxSpec {
        env: [("FROM_SANDBOX".to_string(), "s".to_string())].into(),
        ..Default::default()
    }
}

/// The next runner command pushed on the session (skipping acks).
async fn next_command(session: &mut Session) -> pb::command::Kind {
    loop {
        match session.next().await {
            Out::Command(c) => {
                session
                    .send(pb::session_request::Kind::CommandAck(
                        pb::AckCommandRequest {
                            sequence: c.sequence,
                        },
                    ))
                    .await;
                return c.kind.expect("command kind");
            }
            Out::Acks(_) | Out::HeartbeatAck(_) => continue,
            other => panic!("expected a command, got {other:?}"),
        }
    }
}

async fn next_exec(session: &mut Session) -> pb::ExecCommand {
    match next_command(session).await {
        pb::command::Kind::Exec(e) => e,
        other => panic!("expected an exec command, got {other:?}"),
    }
}

async fn next_cancel(session: &mut Session) -> pb::CancelCommand {
    match next_command(session).await {
        pb::command::Kind::Cancel(c) => c,
        other => panic!("expected a cancel command, got {other:?}"),
    }
}

/// Reports on (job, lease) with the runner's next sequence for that lease.
fn report(runner: &TestRunner, job: &str, lease: &str, body: pb::report::Body) -> pb::Report {
    pb::Report {
        job_id: job.into(),
        lease_id: lease.into(),
        sequence: runner.next_seq(lease),
        body: Some(body),
    }
}

fn phase(p: pb::ExecutorPhase) -> pb::report::Body {
    pb::report::Body::Phase(pb::PhaseChange {
        phase: p as i32,
        message: String::new(),
    })
}

fn running(container: &str) -> pb::report::Body {
    pb::report::Body::Status(pb::StatusReport {
        status: JobStatus::Running as i32,
        container_id: container.into(),
        ..Default::default()
    })
}

fn exited(code: i32) -> pb::report::Body {
    pb::report::Body::Status(pb::StatusReport {
        status: if code == 0 {
            JobStatus::Succeeded
        } else {
            JobStatus::Failed
        } as i32,
        exit_code: Some(code),
        failure_kind: if code == 0 {
            0
        } else {
            pb::FailureKind::ExitNonzero as i32
        },
        ..Default::default()
    })
}

/// A runner with a session holding one running sandbox; returns the sandbox's assignment.
async fn running_sandbox(
    server: &TestServer,
    sandboxes: &mut Sandboxes,
    spec: pb::SandboxSpec,
) -> (TestRunner, Session, pb::Assignment) {
    let mut runner = server.runner("r", &[], 2).await;
    let sandbox = create_sandbox(sandboxes, spec).await;
    let mut session = runner.session(2, vec![]).await;
    let a = session.next_assignment().await;
    assert_eq!(a.job_id, sandbox.id);
    assert!(a.sandbox, "the assignment says it is a sandbox");
    session
        .report(vec![
            report(
                &runner,
                &a.job_id,
                &a.lease_id,
                phase(pb::ExecutorPhase::Creating),
            ),
            report(
                &runner,
                &a.job_id,
                &a.lease_id,
                phase(pb::ExecutorPhase::Starting),
            ),
        ])
        .await;
    assert_eq!(
        get_sandbox(sandboxes, &a.job_id).await.status,
        SandboxStatus::Starting as i32
    );
    session
        .report(vec![report(
            &runner,
            &a.job_id,
            &a.lease_id,
            running("/work/ws"),
        )])
        .await;
    let heartbeat =
        pb::session_request::Kind::Heartbeat(pb::HeartbeatRequest { held: holding(&a) });
    session.send(heartbeat).await;
    (runner, session, a)
}

/// Runs an exec to the end on the session with `out` on stdout and exit `code`.
async fn finish(
    runner: &TestRunner,
    session: &mut Session,
    e: &pb::ExecCommand,
    out: &[u8],
    code: i32,
) {
    session
        .report(vec![
            report(runner, &e.command_id, &e.lease_id, running("exec-1")),
            report(runner, &e.command_id, &e.lease_id, stdout(0, out)),
            report(runner, &e.command_id, &e.lease_id, exited(code)),
        ])
        .await;
}

async fn a_sandbox_goes_through_its_lifecycle_and_runs_commands_one_at_a_time(db: Db) {
    let server = TestServer::start(db).await;
    let mut sandboxes = server.sandboxes().await;
    let (runner, mut session, a) =
        running_sandbox(&server, &mut sandboxes, process_sandbox()).await;
    let sandbox = get_sandbox(&mut sandboxes, &a.job_id).await;
    assert_eq!(sandbox.status, SandboxStatus::Running as i32);
    assert_eq!(sandbox.container_id, "/work/ws");
    assert_eq!(sandbox.runner_id, runner.id);

    // Three commands at once: only the first is sent; each next one when the one before ended.
    let mut env_cmd = pb::CommandSpec {
        argv: vec!["first".into()],
        env: [("OWN".to_string(), "c".to_string())].into(),
        stdin: b"input".to_vec(),
        ..Default::default()
    };
    env_cmd.working_dir = "/tmp".into();
    let c1 = run_command(&mut sandboxes, &a.job_id, env_cmd).await;
    let c2 = run_in(&mut sandboxes, &a.job_id, &["second"]).await;
    let c3 = run_in(&mut sandboxes, &a.job_id, &["third", "arg"]).await;
    assert_eq!((c1.number, c2.number, c3.number), (1, 2, 3));
    assert_eq!(c1.stdin_bytes, 5);
    let e1 = next_exec(&mut session).await;
    assert_eq!(e1.command_id, c1.id);
    assert_eq!(e1.sandbox_id, a.job_id);
    assert_eq!(e1.sandbox_lease_id, a.lease_id);
    assert_eq!(e1.argv, ["first"]);
    assert_eq!(e1.stdin, b"input");
    assert_eq!(e1.working_dir, "/tmp");
    assert_eq!(e1.env.get("FROM_SANDBOX").map(String::as_str), Some("s"));
    assert_eq!(e1.env.get("OWN").map(String::as_str), Some("c"));
    assert_eq!(
        get_command(&mut sandboxes, &c2.id).await.status,
        CommandStatus::Queued as i32
    );
    finish(&runner, &mut session, &e1, b"one\n", 0).await;
    let e2 = next_exec(&mut session).await;
    assert_eq!(e2.command_id, c2.id);
    finish(&runner, &mut session, &e2, b"two\n", 3).await;
    let e3 = next_exec(&mut session).await;
    assert_eq!((e3.command_id.as_str(), e3.number), (c3.id.as_str(), 3));
    assert_eq!(e3.argv, ["third", "arg"]);
    // Progress of a command shows in the sandbox's trail too.
    session
        .report(vec![
            report(&runner, &e3.command_id, &e3.lease_id, running("exec-3")),
            report(
                &runner,
                &e3.command_id,
                &e3.lease_id,
                pb::report::Body::Progress(pb::Progress {
                    percent: 40,
                    stage: "load".into(),
                    message: String::new(),
                }),
            ),
            report(&runner, &e3.command_id, &e3.lease_id, exited(0)),
        ])
        .await;
    let done = wait_for_command(&mut sandboxes, &a.job_id, &c3.id, CommandStatus::Succeeded).await;
    assert_eq!(done.progress.map(|p| p.percent), Some(40));

    let one = get_command(&mut sandboxes, &c1.id).await;
    assert_eq!(
        (one.status, one.exit_code),
        (CommandStatus::Succeeded as i32, Some(0))
    );
    assert_eq!(command_logs(&mut sandboxes, &c1.id).await.0, b"one\n");
    let two = get_command(&mut sandboxes, &c2.id).await;
    assert_eq!(
        (two.status, two.exit_code),
        (CommandStatus::Failed as i32, Some(3))
    );
    assert_eq!(two.failure_kind, pb::FailureKind::ExitNonzero as i32);
    assert_eq!(command_logs(&mut sandboxes, &c2.id).await.0, b"two\n");
    let listed = sandboxes
        .list_commands(pb::ListCommandsRequest {
            sandbox_id: a.job_id.clone(),
            page_size: 2,
            ..Default::default()
        })
        .await
        .expect("list commands")
        .into_inner();
    let ids: Vec<&str> = listed.commands.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, [c1.id.as_str(), c2.id.as_str()]);
    assert!(!listed.next_page_token.is_empty());
    // Sandboxes and their commands are not jobs.
    let mut jobs = server.jobs().await;
    let err = jobs
        .get_job(pb::GetJobRequest {
            job_id: c1.id.clone(),
        })
        .await
        .expect_err("a command is not a job");
    assert_eq!(err.code(), Code::NotFound);
    let listed = jobs
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect("list jobs")
        .into_inner();
    assert!(listed.jobs.is_empty(), "{:?}", listed.jobs);

    // Delete: the runner is told at once, confirms, and the lifecycle is complete and in order.
    let deleting = sandboxes
        .delete_sandbox(pb::DeleteSandboxRequest {
            sandbox_id: a.job_id.clone(),
            reason: "done".into(),
        })
        .await
        .expect("delete")
        .into_inner()
        .sandbox
        .expect("sandbox");
    assert_eq!(deleting.status, SandboxStatus::Deleting as i32);
    let cancel = next_cancel(&mut session).await;
    assert_eq!(
        (cancel.job_id.as_str(), cancel.lease_id.as_str()),
        (a.job_id.as_str(), a.lease_id.as_str())
    );
    session
        .report(vec![
            report(
                &runner,
                &a.job_id,
                &a.lease_id,
                phase(pb::ExecutorPhase::Removing),
            ),
            report(&runner, &a.job_id, &a.lease_id, status(JobStatus::Canceled)),
        ])
        .await;
    let events = wait_for_sandbox(&mut sandboxes, &a.job_id, SandboxStatus::Deleted).await;
    use SandboxStatus::*;
    assert_eq!(
        lifecycle(&events),
        [Pending, Creating, Starting, Running, Deleting, Deleted]
    );
    let running_event = events
        .iter()
        .find_map(|e| match &e.kind {
            Some(pb::job_event::Kind::Sandbox(c)) if c.to == Running as i32 => Some(c.clone()),
            _ => None,
        })
        .expect("running event");
    assert_eq!(running_event.container_id, "/work/ws");
    assert_eq!(running_event.runner_id, runner.id);
    let gone = get_sandbox(&mut sandboxes, &a.job_id).await;
    assert_eq!(gone.status, Deleted as i32);
    assert_eq!(gone.failure_kind, 0);
    assert_eq!(gone.command_count, 3);
    assert!(gone.finished_at_unix_ms > 0);
    // Deleting again answers the sandbox as it is.
    let again = sandboxes
        .delete_sandbox(pb::DeleteSandboxRequest {
            sandbox_id: a.job_id.clone(),
            reason: String::new(),
        })
        .await
        .expect("delete again")
        .into_inner();
    assert_eq!(again.sandbox.map(|s| s.status), Some(Deleted as i32));
    let listed = sandboxes
        .list_sandboxes(pb::ListSandboxesRequest {
            statuses: vec![Deleted as i32],
            ..Default::default()
        })
        .await
        .expect("list sandboxes")
        .into_inner();
    assert_eq!(listed.sandboxes.len(), 1);
    server.stop().await;
}

async fn canceling_a_queued_command_is_immediate_and_a_running_one_is_pushed(db: Db) {
    let server = TestServer::start(db).await;
    let mut sandboxes = server.sandboxes().await;
    let (runner, mut session, a) =
        running_sandbox(&server, &mut sandboxes, process_sandbox()).await;
    let c1 = run_in(&mut sandboxes, &a.job_id, &["sleep", "600"]).await;
    let c2 = run_in(&mut sandboxes, &a.job_id, &["queued"]).await;
    let c3 = run_in(&mut sandboxes, &a.job_id, &["after"]).await;
    let e1 = next_exec(&mut session).await;
    session
        .report(vec![report(
            &runner,
            &e1.command_id,
            &e1.lease_id,
            running("exec"),
        )])
        .await;
    // The queued one ends at once, without the runner.
    let canceled = sandboxes
        .cancel_sandbox_command(pb::CancelSandboxCommandRequest {
            command_id: c2.id.clone(),
            reason: "not needed".into(),
        })
        .await
        .expect("cancel queued")
        .into_inner()
        .command
        .expect("command");
    assert_eq!(canceled.status, CommandStatus::Canceled as i32);
    // The running one: CANCELING, and its runner is told at once about that command only.
    let canceling = sandboxes
        .cancel_sandbox_command(pb::CancelSandboxCommandRequest {
            command_id: c1.id.clone(),
            reason: String::new(),
        })
        .await
        .expect("cancel running")
        .into_inner()
        .command
        .expect("command");
    assert_eq!(canceling.status, CommandStatus::Canceling as i32);
    let cancel = next_cancel(&mut session).await;
    assert_eq!(
        (cancel.job_id.as_str(), cancel.lease_id.as_str()),
        (c1.id.as_str(), e1.lease_id.as_str())
    );
    session
        .report(vec![report(
            &runner,
            &e1.command_id,
            &e1.lease_id,
            status(JobStatus::Canceled),
        )])
        .await;
    let c1 = wait_for_command(&mut sandboxes, &a.job_id, &c1.id, CommandStatus::Canceled).await;
    assert_eq!(c1.failure_kind, pb::FailureKind::Canceled as i32);
    // The sandbox lives on and runs the next command.
    assert_eq!(
        get_sandbox(&mut sandboxes, &a.job_id).await.status,
        SandboxStatus::Running as i32
    );
    let e3 = next_exec(&mut session).await;
    assert_eq!(e3.command_id, c3.id);
    finish(&runner, &mut session, &e3, b"ok", 0).await;
    wait_for_command(&mut sandboxes, &a.job_id, &c3.id, CommandStatus::Succeeded).await;
    // An ended command never changes.
    let err = sandboxes
        .cancel_sandbox_command(pb::CancelSandboxCommandRequest {
            command_id: c3.id.clone(),
            reason: String::new(),
        })
        .await
        .expect_err("ended");
    assert_eq!(err.code(), Code::FailedPrecondition);
    server.stop().await;
}

async fn reports_from_another_runner_or_a_stale_lease_are_refused(db: Db) {
    let server = TestServer::start(db).await;
    let mut sandboxes = server.sandboxes().await;
    let (runner, mut session, a) =
        running_sandbox(&server, &mut sandboxes, process_sandbox()).await;
    let c1 = run_in(&mut sandboxes, &a.job_id, &["x"]).await;
    let e1 = next_exec(&mut session).await;
    let mut other = server.runner("other", &[], 1).await;
    for (job, lease) in [(&a.job_id, &a.lease_id), (&c1.id, &e1.lease_id)] {
        let err = other
            .report_seq(job, lease, 1, status(JobStatus::Succeeded))
            .await
            .expect_err("another runner's");
        assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    }
    finish(&runner, &mut session, &e1, b"", 0).await;
    wait_for_command(&mut sandboxes, &a.job_id, &c1.id, CommandStatus::Succeeded).await;
    // The command's lease ended with it.
    let mut again = runner.clone_on(&server.url()).await;
    let err = again
        .report_seq(&c1.id, &e1.lease_id, 100, stdout(0, b"late"))
        .await
        .expect_err("stale");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    // Nothing changed.
    let c1 = get_command(&mut sandboxes, &c1.id).await;
    assert_eq!(c1.status, CommandStatus::Succeeded as i32);
    assert_eq!(c1.stdout_bytes, 0);
    server.stop().await;
}

async fn a_lost_sandbox_fails_with_its_commands_and_releases_its_lock(db: Db) {
    let server = TestServer::start(db).await;
    let mut sandboxes = server.sandboxes().await;
    let spec = pb::SandboxSpec {
        lock_key: "ws-lock".into(),
        ..process_sandbox()
    };
    let (runner, mut session, a) = running_sandbox(&server, &mut sandboxes, spec).await;
    let c1 = run_in(&mut sandboxes, &a.job_id, &["sleep", "600"]).await;
    let c2 = run_in(&mut sandboxes, &a.job_id, &["queued"]).await;
    let e1 = next_exec(&mut session).await;
    session
        .report(vec![report(
            &runner,
            &e1.command_id,
            &e1.lease_id,
            running("exec"),
        )])
        .await;
    // The runner goes silent: the session ends and the lease runs out.
    drop(session);
    let events = wait_for_sandbox(&mut sandboxes, &a.job_id, SandboxStatus::Failed).await;
    assert_eq!(lifecycle(&events).last(), Some(&SandboxStatus::Failed));
    let sandbox = get_sandbox(&mut sandboxes, &a.job_id).await;
    assert_eq!(sandbox.failure_kind, pb::FailureKind::RunnerLost as i32);
    for id in [&c1.id, &c2.id] {
        let c = get_command(&mut sandboxes, id).await;
        assert_eq!(c.status, CommandStatus::Failed as i32, "{c:?}");
        assert_eq!(c.failure_kind, pb::FailureKind::RunnerLost as i32, "{c:?}");
    }
    // Never placed again: it stays FAILED; and its lock is free for a job.
    let mut jobs = server.jobs().await;
    let mut spec = sh("true");
    spec.lock_key = "ws-lock".into();
    let job = submit(&mut jobs, spec).await;
    let mut taker = server.runner("taker", &[], 1).await;
    let got = taker.claim_one().await;
    assert_eq!(got.job_id, job);
    assert!(!got.sandbox);
    assert_eq!(
        get_sandbox(&mut sandboxes, &a.job_id).await.status,
        SandboxStatus::Failed as i32
    );
    server.stop().await;
}

async fn idle_timeout_and_one_shot_delete_the_sandbox(db: Db) {
    let server = TestServer::start(db).await;
    let mut sandboxes = server.sandboxes().await;
    // Idle: no command for a second after it started running.
    let spec = pb::SandboxSpec {
        idle_timeout_seconds: 1,
        ..process_sandbox()
    };
    let (runner, mut session, a) = running_sandbox(&server, &mut sandboxes, spec).await;
    let cancel = next_cancel(&mut session).await;
    assert_eq!(cancel.lease_id, a.lease_id);
    assert!(cancel.reason.contains("idle"), "{cancel:?}");
    assert_eq!(
        get_sandbox(&mut sandboxes, &a.job_id).await.status,
        SandboxStatus::Deleting as i32
    );
    // A deleting sandbox takes no more commands.
    let err = sandboxes
        .run_command(pb::RunCommandRequest {
            sandbox_id: a.job_id.clone(),
            command: Some(pb::CommandSpec {
                argv: vec!["late".into()],
                ..Default::default()
            }),
        })
        .await
        .expect_err("deleting");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    session
        .report(vec![report(
            &runner,
            &a.job_id,
            &a.lease_id,
            status(JobStatus::Canceled),
        )])
        .await;
    let done = wait_for_sandbox(&mut sandboxes, &a.job_id, SandboxStatus::Deleted).await;
    assert!(
        done.iter().any(|e| matches!(&e.kind, Some(pb::job_event::Kind::Sandbox(c)) if c.message.contains("idle for 1 s"))),
        "{done:#?}"
    );
    drop(session);

    // One-shot: deleted once its first command ended.
    let spec = pb::SandboxSpec {
        one_shot: true,
        ..process_sandbox()
    };
    let (runner, mut session, a) = running_sandbox(&server, &mut sandboxes, spec).await;
    let c1 = run_in(&mut sandboxes, &a.job_id, &["only"]).await;
    let e1 = next_exec(&mut session).await;
    assert_eq!(e1.command_id, c1.id);
    // A queued command canceled is no turn taken: the sandbox stays.
    let c2 = run_in(&mut sandboxes, &a.job_id, &["second"]).await;
    sandboxes
        .cancel_sandbox_command(pb::CancelSandboxCommandRequest {
            command_id: c2.id.clone(),
            reason: String::new(),
        })
        .await
        .expect("cancel queued");
    assert_eq!(
        get_sandbox(&mut sandboxes, &a.job_id).await.status,
        SandboxStatus::Running as i32
    );
    finish(&runner, &mut session, &e1, b"", 0).await;
    let cancel = next_cancel(&mut session).await;
    assert_eq!(cancel.lease_id, a.lease_id);
    assert!(cancel.reason.contains("one-shot"), "{cancel:?}");
    session
        .report(vec![report(
            &runner,
            &a.job_id,
            &a.lease_id,
            status(JobStatus::Canceled),
        )])
        .await;
    wait_for_sandbox(&mut sandboxes, &a.job_id, SandboxStatus::Deleted).await;
    server.stop().await;
}

async fn a_unary_runner_gets_commands_by_polling(db: Db) {
    let server = TestServer::start(db).await;
    let mut sandboxes = server.sandboxes().await;
    let mut runner = server.runner("unary", &[], 1).await;
    let sandbox = create_sandbox(&mut sandboxes, process_sandbox()).await;
    let a = runner.claim_one().await;
    assert_eq!((a.job_id.as_str(), a.sandbox), (sandbox.id.as_str(), true));
    runner.report(&a, running("/ws")).await.expect("running");
    let _alive = runner.keep_alive(&[&a]);
    // The sandbox holds the runner's one slot: a job waits ...
    let mut jobs = server.jobs().await;
    let job = submit(&mut jobs, sh("true")).await;
    let got = runner
        .client
        .claim(pb::ClaimRequest {
            max_jobs: 1,
            wait_seconds: 1,
        })
        .await
        .expect("claim")
        .into_inner();
    assert!(got.assignments.is_empty(), "{got:?}");
    assert_eq!(get(&mut jobs, &job).await.status, JobStatus::Queued as i32);
    // ... while its commands take no slot of their own.
    let c1 = run_in(&mut sandboxes, &a.job_id, &["echo", "hi"]).await;
    let polled = runner
        .client
        .poll_commands(pb::PollCommandsRequest {
            after_sequence: 0,
            wait_seconds: 10,
        })
        .await
        .expect("poll")
        .into_inner();
    let (sequence, exec) = polled
        .commands
        .iter()
        .find_map(|c| match &c.kind {
            Some(pb::command::Kind::Exec(e)) => Some((c.sequence, e.clone())),
            _ => None,
        })
        .expect("an exec command");
    assert_eq!(exec.command_id, c1.id);
    runner
        .client
        .ack_command(pb::AckCommandRequest { sequence })
        .await
        .expect("ack");
    for body in [running("e"), stdout(0, b"hi\n"), exited(0)] {
        runner
            .report_seq(
                &exec.command_id,
                &exec.lease_id,
                runner.next_seq(&exec.lease_id),
                body,
            )
            .await
            .expect("report");
    }
    wait_for_command(&mut sandboxes, &a.job_id, &c1.id, CommandStatus::Succeeded).await;
    assert_eq!(command_logs(&mut sandboxes, &c1.id).await.0, b"hi\n");
    server.stop().await;
}

async fn bad_input_is_refused_naming_the_field_and_changes_nothing(db: Db) {
    let server = TestServer::start(db).await;
    let mut sandboxes = server.sandboxes().await;
    let sandbox = create_sandbox(&mut sandboxes, process_sandbox()).await;
    let unknown = "018f0000-0000-7000-8000-000000000000";
    let code_of = |r: Result<tonic::Response<pb::RunCommandResponse>, tonic::Status>| {
        let e = r.expect_err("refused");
        (e.code(), e.message().to_string())
    };
    let run = |id: &str, command: pb::CommandSpec| pb::RunCommandRequest {
        sandbox_id: id.into(),
        command: Some(command),
    };
    let argv = |a: &[&str]| pb::CommandSpec {
        argv: a.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let cases = [
        (run(unknown, argv(&["x"])), Code::NotFound, "sandbox"),
        (
            run("nope", argv(&["x"])),
            Code::InvalidArgument,
            "sandbox_id",
        ),
        (
            run(&sandbox.id, argv(&[])),
            Code::InvalidArgument,
            "command.argv",
        ),
        (
            run(&sandbox.id, argv(&[""])),
            Code::InvalidArgument,
            "command.argv",
        ),
        (
            run(&sandbox.id, argv(&["a\0b"])),
            Code::InvalidArgument,
            "command.argv[0]",
        ),
        (
            run(
                &sandbox.id,
                pb::CommandSpec {
                    stdin: vec![7; (1 << 20) + 1],
                    ..argv(&["cat"])
                },
            ),
            Code::InvalidArgument,
            "command.stdin",
        ),
        (
            run(
                &sandbox.id,
                pb::CommandSpec {
                    timeout_seconds: 604_801,
                    ..argv(&["x"])
                },
            ),
            Code::InvalidArgument,
            "command.timeout_seconds",
        ),
    ];
    for (request, code, field) in cases {
        let (got, message) = code_of(sandboxes.run_command(request).await);
        assert_eq!(got, code, "{message}");
        assert!(message.contains(field), "{message} names {field}");
    }
    // A sandbox spec broken in each way names its field.
    let bad = [
        (
            pb::SandboxSpec {
                executor: pb::ExecutorKind::Docker as i32,
                ..Default::default()
            },
            "spec.image",
        ),
        (
            pb::SandboxSpec {
                max_lifetime_seconds: 604_801,
                ..Default::default()
            },
            "spec.max_lifetime_seconds",
        ),
        (
            pb::SandboxSpec {
                idle_timeout_seconds: 604_801,
                ..Default::default()
            },
            "spec.idle_timeout_seconds",
        ),
        (
            pb::SandboxSpec {
                lock_key: "bad key".into(),
                ..Default::default()
            },
            "spec.lock_key",
        ),
    ];
    for (spec, field) in bad {
        let err = sandboxes
            .create_sandbox(pb::CreateSandboxRequest {
                spec: Some(spec),
                idempotency_key: String::new(),
            })
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        assert!(
            err.message().contains(field),
            "{} names {field}",
            err.message()
        );
    }
    for err in [
        sandboxes
            .get_sandbox(pb::GetSandboxRequest {
                sandbox_id: unknown.into(),
            })
            .await
            .expect_err("unknown"),
        sandboxes
            .get_command(pb::GetCommandRequest {
                command_id: sandbox.id.clone(),
            })
            .await
            .expect_err("a sandbox is not a command"),
        sandboxes
            .cancel_sandbox_command(pb::CancelSandboxCommandRequest {
                command_id: unknown.into(),
                reason: String::new(),
            })
            .await
            .expect_err("unknown"),
        sandboxes
            .delete_sandbox(pb::DeleteSandboxRequest {
                sandbox_id: unknown.into(),
                reason: String::new(),
            })
            .await
            .expect_err("unknown"),
    ] {
        assert_eq!(err.code(), Code::NotFound, "{err}");
    }
    let err = sandboxes
        .list_sandboxes(pb::ListSandboxesRequest {
            page_size: 1001,
            ..Default::default()
        })
        .await
        .expect_err("page size");
    assert!(err.message().contains("page_size"), "{err}");
    let err = sandboxes
        .get_command_logs(pb::GetCommandLogsRequest {
            command_id: unknown.into(),
            ..Default::default()
        })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
    // A command that, with the sandbox's environment, would not fit in one message to the
    // runner: refused naming `command`.
    let big_env: std::collections::HashMap<String, String> = (0..24)
        .map(|i| (format!("BIG{i}"), "e".repeat(128 * 1024)))
        .collect();
    let heavy = create_sandbox(
        &mut sandboxes,
        pb::SandboxSpec {
            env: big_env,
            ..Default::default()
        },
    )
    .await;
    let (code, message) = code_of(
        sandboxes
            .run_command(run(
                &heavy.id,
                pb::CommandSpec {
                    stdin: vec![1; 1 << 20],
                    ..argv(&["cat"])
                },
            ))
            .await,
    );
    assert_eq!(code, Code::InvalidArgument, "{message}");
    assert!(message.contains("command"), "{message}");
    assert_eq!(
        get_sandbox(&mut sandboxes, &heavy.id).await.command_count,
        0
    );
    delete_sandbox(&mut sandboxes, &heavy.id).await;
    // Nothing was accepted.
    let after = get_sandbox(&mut sandboxes, &sandbox.id).await;
    assert_eq!(after.command_count, 0);
    assert_eq!(after.last_event_sequence, sandbox.last_event_sequence);
    let listed = sandboxes
        .list_sandboxes(pb::ListSandboxesRequest {
            statuses: vec![SandboxStatus::Pending as i32],
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    let ids: Vec<&str> = listed.sandboxes.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(
        ids,
        [sandbox.id.as_str()],
        "no sandbox was created by a refusal"
    );
    // A command to a deleted sandbox.
    delete_sandbox(&mut sandboxes, &sandbox.id).await;
    let (code, message) = code_of(sandboxes.run_command(run(&sandbox.id, argv(&["x"]))).await);
    assert_eq!(code, Code::FailedPrecondition, "{message}");
    assert!(message.contains("DELETED"), "{message}");
    // Idempotent create.
    let request = pb::CreateSandboxRequest {
        spec: Some(process_sandbox()),
        idempotency_key: "k1".into(),
    };
    let first = sandboxes
        .create_sandbox(request.clone())
        .await
        .expect("create")
        .into_inner();
    let second = sandboxes
        .create_sandbox(request)
        .await
        .expect("create")
        .into_inner();
    assert!(!first.deduplicated && second.deduplicated);
    assert_eq!(first.sandbox.map(|s| s.id), second.sandbox.map(|s| s.id));
    server.stop().await;
}

async fn a_lock_key_held_by_a_sandbox_blocks_a_job_until_the_sandbox_is_deleted(db: Db) {
    let server = TestServer::start(db).await;
    let mut sandboxes = server.sandboxes().await;
    let spec = pb::SandboxSpec {
        lock_key: "shared".into(),
        ..process_sandbox()
    };
    let (runner, mut session, a) = running_sandbox(&server, &mut sandboxes, spec).await;
    let mut jobs = server.jobs().await;
    let mut spec = sh("true");
    spec.lock_key = "shared".into();
    let job = submit(&mut jobs, spec).await;
    let mut taker = server.runner("taker", &[], 1).await;
    // A claim that waits and finds nothing: the lock holds the job back.
    let got = taker
        .client
        .claim(pb::ClaimRequest {
            max_jobs: 1,
            wait_seconds: 1,
        })
        .await
        .expect("claim")
        .into_inner();
    assert!(got.assignments.is_empty(), "{got:?}");
    assert_eq!(get(&mut jobs, &job).await.status, JobStatus::Queued as i32);
    delete_sandbox(&mut sandboxes, &a.job_id).await;
    next_cancel(&mut session).await;
    session
        .report(vec![report(
            &runner,
            &a.job_id,
            &a.lease_id,
            status(JobStatus::Canceled),
        )])
        .await;
    let got = taker.claim_one().await;
    assert_eq!(got.job_id, job);
    eventually("the sandbox is deleted", || {
        let mut sandboxes = sandboxes.clone();
        let id = a.job_id.clone();
        async move {
            (get_sandbox(&mut sandboxes, &id).await.status == SandboxStatus::Deleted as i32)
                .then_some(())
        }
    })
    .await;
    server.stop().await;
}

async fn commands_accepted_at_once_are_numbered_in_order_and_one_refusal_refuses_no_other(db: Db) {
    let server = TestServer::start(db).await;
    let mut sandboxes = server.sandboxes().await;
    let open = create_sandbox(&mut sandboxes, process_sandbox()).await;
    let gone = create_sandbox(&mut sandboxes, process_sandbox()).await;
    delete_sandbox(&mut sandboxes, &gone.id).await;
    // Forty calls at once (they share transactions), one of them to the deleted sandbox and
    // one repeating an idempotency key.
    let mut calls = Vec::new();
    for i in 0..40 {
        let mut client = sandboxes.clone();
        let target = if i == 17 {
            gone.id.clone()
        } else {
            open.id.clone()
        };
        let key = if i == 30 || i == 31 {
            "same".to_string()
        } else {
            String::new()
        };
        calls.push(tokio::spawn(async move {
            client
                .run_command(pb::RunCommandRequest {
                    sandbox_id: target,
                    command: Some(pb::CommandSpec {
                        argv: vec![format!("c{i}")],
                        idempotency_key: key,
                        ..Default::default()
                    }),
                })
                .await
        }));
    }
    let mut accepted = Vec::new();
    for (i, call) in calls.into_iter().enumerate() {
        match call.await.expect("task") {
            Ok(r) => accepted.push(r.into_inner()),
            Err(e) => {
                assert_eq!(i, 17, "only the deleted sandbox's command is refused: {e}");
                assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
            }
        }
    }
    assert_eq!(accepted.len(), 39);
    let deduplicated: Vec<&pb::RunCommandResponse> =
        accepted.iter().filter(|r| r.deduplicated).collect();
    assert_eq!(
        deduplicated.len(),
        1,
        "the repeated key returns the first command"
    );
    let mut numbers: Vec<u32> = accepted
        .iter()
        .filter(|r| !r.deduplicated)
        .filter_map(|r| r.command.as_ref().map(|c| c.number))
        .collect();
    numbers.sort();
    assert_eq!(numbers, (1..=38).collect::<Vec<u32>>());
    let listed = sandboxes
        .list_commands(pb::ListCommandsRequest {
            sandbox_id: open.id.clone(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    let in_order: Vec<u32> = listed.commands.iter().map(|c| c.number).collect();
    assert_eq!(
        in_order,
        (1..=38).collect::<Vec<u32>>(),
        "listed in the order accepted"
    );
    assert_eq!(get_sandbox(&mut sandboxes, &gone.id).await.command_count, 0);
    // Sandboxes newest first, a page at a time.
    let first = sandboxes
        .list_sandboxes(pb::ListSandboxesRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    let ids: Vec<&str> = first.sandboxes.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, [gone.id.as_str()]);
    let second = sandboxes
        .list_sandboxes(pb::ListSandboxesRequest {
            page_size: 1,
            page_token: first.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    let ids: Vec<&str> = second.sandboxes.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, [open.id.as_str()]);
    assert!(second.next_page_token.is_empty());
    // A command's idempotency key is its sandbox's own: another sandbox, and a job, may use
    // the same key for something new.
    let other = create_sandbox(&mut sandboxes, process_sandbox()).await;
    let fresh = sandboxes
        .run_command(pb::RunCommandRequest {
            sandbox_id: other.id.clone(),
            command: Some(pb::CommandSpec {
                argv: vec!["x".into()],
                idempotency_key: "same".into(),
                ..Default::default()
            }),
        })
        .await
        .expect("another sandbox, the same key")
        .into_inner();
    assert!(!fresh.deduplicated);
    let mut jobs = server.jobs().await;
    let mut spec = sh("true");
    spec.idempotency_key = "same".into();
    let job = jobs
        .submit_job(pb::SubmitJobRequest { spec: Some(spec) })
        .await
        .expect("a job, the same key")
        .into_inner();
    assert!(!job.deduplicated);
    let command = fresh.command.expect("command");
    assert_eq!(
        command.spec.map(|s| s.idempotency_key),
        Some("same".to_string())
    );
    server.stop().await;
}
