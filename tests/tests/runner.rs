//! The real runner: `gantry-runner` processes against a real server, running real containers
//! on the Docker engine (the test image is built locally from a static busybox) and real
//! local processes. Faults are real too: SIGKILL of a runner, SIGKILL of a server.
use gantry_proto as pb;
use gantry_tests::{
    Db, TestServer, get, logs,
    procs::{
        Proxy, RunnerProcess, ServerProcess, busybox_image, containers_with_label, docker_sh,
        eventually, until_no_container, wait_for_output,
    },
    sh, submit, wait_for_status,
};
use nix::sys::signal::Signal;
use pb::JobStatus;

/// Phases of the job's events, in order.
fn phases(events: &[pb::JobEvent]) -> Vec<pb::ExecutorPhase> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(pb::job_event::Kind::Phase(p)) => pb::ExecutorPhase::try_from(p.phase).ok(),
            _ => None,
        })
        .collect()
}

fn progress(events: &[pb::JobEvent]) -> Vec<pb::Progress> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(pb::job_event::Kind::Progress(p)) => Some(p.clone()),
            _ => None,
        })
        .collect()
}

/// Status changes into `to` among the events.
fn transitions_to(events: &[pb::JobEvent], to: JobStatus) -> usize {
    events
        .iter()
        .filter(|e| matches!(&e.kind, Some(pb::job_event::Kind::Status(s)) if s.to == to as i32 && s.from != 0))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_job_succeeds_with_exact_output_and_phases() {
    let server = TestServer::start(Db::Sqlite).await;
    let mut jobs = server.jobs().await;
    let _runner = RunnerProcess::start(&server, "proc", &["--executors", "process"]);
    let mut spec = sh(
        "echo one; echo err-one >&2; printf 'two\\nno-newline'; echo \"job=$GANTRY_JOB_ID attempt=$GANTRY_ATTEMPT greeting=$GREETING token=${GANTRY_REGISTRATION_TOKEN:-hidden}\"",
    );
    spec.env.insert("GREETING".into(), "hello".into());
    let id = submit(&mut jobs, spec).await;
    let events = wait_for_status(&mut jobs, &id, JobStatus::Succeeded).await;
    let (out, err) = logs(&mut jobs, &id).await;
    assert_eq!(
        String::from_utf8_lossy(&out),
        format!("one\ntwo\nno-newlinejob={id} attempt=1 greeting=hello token=hidden\n")
    );
    assert_eq!(String::from_utf8_lossy(&err), "err-one\n");
    let job = get(&mut jobs, &id).await;
    assert_eq!(job.exit_code, Some(0));
    use pb::ExecutorPhase::*;
    assert_eq!(phases(&events), [Creating, Starting, Running]);

    // A working directory is honoured; without one the job runs in a scratch directory
    // that is gone afterwards.
    let dir = tempfile::tempdir().expect("work dir");
    let mut spec = sh("pwd");
    spec.working_dir = dir.path().display().to_string();
    let id = submit(&mut jobs, spec).await;
    wait_for_status(&mut jobs, &id, JobStatus::Succeeded).await;
    assert_eq!(
        String::from_utf8_lossy(&logs(&mut jobs, &id).await.0),
        format!("{}\n", dir.path().display())
    );
    let id = submit(&mut jobs, sh("pwd")).await;
    wait_for_status(&mut jobs, &id, JobStatus::Succeeded).await;
    let scratch = String::from_utf8_lossy(&logs(&mut jobs, &id).await.0)
        .trim()
        .to_string();
    assert!(scratch.contains("/work/"), "{scratch}");
    assert!(
        !std::path::Path::new(&scratch).exists(),
        "{scratch} is removed"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_job_succeeds_with_exact_output_and_its_container_is_removed() {
    let server = TestServer::start(Db::Sqlite).await;
    let mut jobs = server.jobs().await;
    let _runner = RunnerProcess::start(&server, "dock", &["--executors", "docker"]);
    let mut spec = docker_sh(
        "echo one; echo err-one >&2; echo two; echo err-two >&2; echo \"job=$GANTRY_JOB_ID attempt=$GANTRY_ATTEMPT greeting=$GREETING pwd=$(pwd)\"",
    )
    .await;
    spec.env.insert("GREETING".into(), "hello".into());
    spec.working_dir = "/tmp".into();
    let id = submit(&mut jobs, spec).await;
    let events = wait_for_status(&mut jobs, &id, JobStatus::Succeeded).await;
    let (out, err) = logs(&mut jobs, &id).await;
    assert_eq!(
        String::from_utf8_lossy(&out),
        format!("one\ntwo\njob={id} attempt=1 greeting=hello pwd=/tmp\n")
    );
    assert_eq!(String::from_utf8_lossy(&err), "err-one\nerr-two\n");
    assert_eq!(get(&mut jobs, &id).await.exit_code, Some(0));
    use pb::ExecutorPhase::*;
    // The image is present and the policy is NEVER: no pull.
    assert_eq!(phases(&events)[..3], [Creating, Starting, Running]);
    // REMOVING comes after the final status (it is reported as the container goes).
    until_no_container(&format!("gantry.job-id={id}"), "the container is removed").await;
    let all = gantry_tests::events(&mut jobs, &id).await;
    assert_eq!(phases(&all).last(), Some(&Removing));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nonzero_exit_fails_with_its_code_on_both_executors() {
    let server = TestServer::start(Db::Sqlite).await;
    let mut jobs = server.jobs().await;
    let _runner = RunnerProcess::start(&server, "both", &["--executors", "docker,process"]);
    let docker_job = submit(&mut jobs, docker_sh("echo before; exit 7").await).await;
    let process_job = submit(&mut jobs, sh("echo before; exit 9")).await;
    for (id, code) in [(docker_job, 7), (process_job, 9)] {
        wait_for_status(&mut jobs, &id, JobStatus::Failed).await;
        let job = get(&mut jobs, &id).await;
        assert_eq!(job.failure_kind, pb::FailureKind::ExitNonzero as i32);
        assert_eq!(job.exit_code, Some(code));
        assert!(
            job.failure_message.contains(&format!("code {code}")),
            "{}",
            job.failure_message
        );
        assert_eq!(logs(&mut jobs, &id).await.0, b"before\n");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_lines_become_progress_events_not_log_lines() {
    let server = TestServer::start(Db::Sqlite).await;
    let mut jobs = server.jobs().await;
    let _runner = RunnerProcess::start(&server, "prog", &["--executors", "docker"]);
    let id = submit(
        &mut jobs,
        docker_sh(
            "echo start; echo '::progress 40 loading data::'; echo middle; echo '::progress 75 upload::3 of 4 files'; echo '::progress lots::'; echo end",
        )
        .await,
    )
    .await;
    let events = wait_for_status(&mut jobs, &id, JobStatus::Succeeded).await;
    let p = progress(&events);
    assert_eq!(p.len(), 2, "{p:?}");
    assert_eq!(
        (p[0].percent, p[0].stage.as_str(), p[0].message.as_str()),
        (40, "loading data", "")
    );
    assert_eq!(
        (p[1].percent, p[1].stage.as_str(), p[1].message.as_str()),
        (75, "upload", "3 of 4 files")
    );
    let (out, _) = logs(&mut jobs, &id).await;
    assert_eq!(
        String::from_utf8_lossy(&out),
        "start\nmiddle\n::progress lots::\nend\n"
    );
    let job = get(&mut jobs, &id).await;
    assert_eq!(job.progress.map(|p| p.percent), Some(75));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_running_container_and_removes_it() {
    let server = TestServer::start(Db::Sqlite).await;
    let mut jobs = server.jobs().await;
    let runner = RunnerProcess::start(&server, "cancel", &["--executors", "docker"]);
    let runner_id = runner.id().await;
    let mut spec = docker_sh("echo ready; sleep 300").await;
    spec.resources = Some(pb::Resources {
        memory_bytes: 64 * 1024 * 1024,
        cpu_millis: 250,
    });
    let id = submit(&mut jobs, spec).await;
    wait_for_output(&mut jobs, &id, "ready").await;
    // While it runs, the container carries the job's labels and limits.
    let running = containers_with_label(&format!("gantry.job-id={id}")).await;
    assert_eq!(running.len(), 1);
    let labels = running[0].labels.clone().unwrap_or_default();
    assert_eq!(labels.get("gantry.attempt").map(String::as_str), Some("1"));
    assert_eq!(labels.get("gantry.runner-id"), Some(&runner_id));
    let container_id = running[0].id.clone().expect("container id");
    let host = gantry_tests::procs::docker()
        .await
        .inspect_container(&container_id, None)
        .await
        .expect("inspect")
        .host_config
        .expect("host config");
    assert_eq!(host.memory, Some(64 * 1024 * 1024));
    assert_eq!(host.nano_cpus, Some(250_000_000));
    jobs.cancel_job(pb::CancelJobRequest {
        job_id: id.clone(),
        reason: "test".into(),
    })
    .await
    .expect("cancel");
    let events = wait_for_status(&mut jobs, &id, JobStatus::Canceled).await;
    assert!(phases(&events).contains(&pb::ExecutorPhase::Stopping));
    let job = get(&mut jobs, &id).await;
    assert_eq!(job.failure_kind, pb::FailureKind::Canceled as i32);
    until_no_container(
        &format!("gantry.job-id={id}"),
        "the canceled job's container is gone from the engine",
    )
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_honours_the_grace_period_of_a_job_that_traps_sigterm() {
    let server = TestServer::start(Db::Sqlite).await;
    let mut jobs = server.jobs().await;
    let _runner = RunnerProcess::start(&server, "grace", &["--executors", "docker,process"]);
    // Cleanup that takes a second after SIGTERM: it completes within a 60 s grace.
    let script = "trap 'echo got-term; sleep 1; echo cleaned-up; exit 0' TERM; echo ready; while true; do sleep 0.1; done";
    let mut docker_spec = docker_sh(script).await;
    docker_spec.cancel_grace_seconds = 60;
    let mut process_spec = sh(script);
    process_spec.cancel_grace_seconds = 60;
    // A job that ignores SIGTERM is killed once its 1 s grace runs out.
    let mut stubborn = sh("trap '' TERM; echo ready; while true; do sleep 0.1; done");
    stubborn.cancel_grace_seconds = 1;
    let mut ids = Vec::new();
    for spec in [docker_spec, process_spec, stubborn] {
        let id = submit(&mut jobs, spec).await;
        wait_for_output(&mut jobs, &id, "ready").await;
        jobs.cancel_job(pb::CancelJobRequest {
            job_id: id.clone(),
            reason: "grace test".into(),
        })
        .await
        .expect("cancel");
        ids.push(id);
    }
    for id in &ids[..2] {
        wait_for_status(&mut jobs, id, JobStatus::Canceled).await;
        let (out, _) = logs(&mut jobs, id).await;
        assert_eq!(
            String::from_utf8_lossy(&out),
            "ready\ngot-term\ncleaned-up\n",
            "job {id}"
        );
    }
    wait_for_status(&mut jobs, &ids[2], JobStatus::Canceled).await;
    let stubborn = get(&mut jobs, &ids[2]).await;
    // Killed by SIGKILL: 128 + 9.
    assert_eq!(stubborn.exit_code, Some(137));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_past_its_timeout_is_killed_and_timed_out_by_the_runner() {
    // The server's own deadline check is pushed far away: only the runner can time it out.
    let server = TestServer::start_with(Db::Sqlite, |c| c.timeout_grace_seconds = 3600).await;
    let mut jobs = server.jobs().await;
    let _runner = RunnerProcess::start(&server, "timeout", &["--executors", "docker,process"]);
    let mut docker_spec = docker_sh("echo started; sleep 300").await;
    docker_spec.timeout_seconds = 1;
    docker_spec.cancel_grace_seconds = 1;
    let mut process_spec = sh("echo started; sleep 300");
    process_spec.timeout_seconds = 1;
    for spec in [docker_spec, process_spec] {
        let id = submit(&mut jobs, spec).await;
        wait_for_status(&mut jobs, &id, JobStatus::TimedOut).await;
        let job = get(&mut jobs, &id).await;
        assert_eq!(job.failure_kind, pb::FailureKind::Timeout as i32);
        assert!(
            job.failure_message.contains("timeout of 1 s"),
            "{}",
            job.failure_message
        );
        assert_eq!(logs(&mut jobs, &id).await.0, b"started\n");
        until_no_container(
            &format!("gantry.job-id={id}"),
            "the timed-out container is gone",
        )
        .await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_n_runs_n_jobs_at_once_and_no_more() {
    let server = TestServer::start(Db::Sqlite).await;
    let mut jobs = server.jobs().await;
    let gate = tempfile::tempdir().expect("gate dir");
    let go = gate.path().join("go");
    let script = format!(
        "echo started; while [ ! -e {} ]; do sleep 0.05; done; echo released",
        go.display()
    );
    // Three jobs wait before the runner starts: a runner granting more than its capacity
    // would be given all three at once.
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(submit(&mut jobs, sh(&script)).await);
    }
    let _runner = RunnerProcess::start(
        &server,
        "cap2",
        &["--executors", "process", "--capacity", "2"],
    );
    let (running, waiting) = eventually("two jobs run", || {
        let mut jobs = jobs.clone();
        let ids = ids.clone();
        async move {
            let mut running = Vec::new();
            let mut waiting = Vec::new();
            for id in &ids {
                let job = get(&mut jobs, id).await;
                if job.status == JobStatus::Running as i32 {
                    running.push(id.clone());
                } else {
                    waiting.push((id.clone(), job.status));
                }
            }
            (running.len() == 2).then_some((running, waiting))
        }
    })
    .await;
    assert_eq!(waiting.len(), 1);
    assert_eq!(
        waiting[0].1,
        JobStatus::Queued as i32,
        "the third job waits"
    );
    std::fs::write(&go, b"").expect("open the gate");
    for id in &ids {
        wait_for_status(&mut jobs, id, JobStatus::Succeeded).await;
    }
    // The third job was assigned only after one of the first two finished.
    let first_end = {
        let a = get(&mut jobs, &running[0]).await.finished_at_unix_ms;
        let b = get(&mut jobs, &running[1]).await.finished_at_unix_ms;
        a.min(b)
    };
    let third = get(&mut jobs, &waiting[0].0).await;
    assert!(
        third.attempts[0].assigned_at_unix_ms >= first_end,
        "the third job was assigned at {} before a slot freed at {first_end}",
        third.attempts[0].assigned_at_unix_ms
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_route_jobs_to_the_runner_that_carries_them() {
    let server = TestServer::start(Db::Sqlite).await;
    let mut jobs = server.jobs().await;
    let gpu = RunnerProcess::start(
        &server,
        "gpu",
        &[
            "--executors",
            "process",
            "--label",
            "gpu=a100",
            "--capacity",
            "4",
        ],
    );
    let plain = RunnerProcess::start(
        &server,
        "plain",
        &[
            "--executors",
            "process",
            "--label",
            "zone=b",
            "--capacity",
            "4",
        ],
    );
    let (gpu_id, plain_id) = (gpu.id().await, plain.id().await);
    let mut gpu_jobs = Vec::new();
    let mut zone_jobs = Vec::new();
    for _ in 0..3 {
        let mut spec = sh("echo gpu");
        spec.labels.insert("gpu".into(), "a100".into());
        gpu_jobs.push(submit(&mut jobs, spec).await);
        let mut spec = sh("echo zone");
        spec.labels.insert("zone".into(), "b".into());
        zone_jobs.push(submit(&mut jobs, spec).await);
    }
    for (ids, want) in [(&gpu_jobs, &gpu_id), (&zone_jobs, &plain_id)] {
        for id in ids {
            wait_for_status(&mut jobs, id, JobStatus::Succeeded).await;
            let job = get(&mut jobs, id).await;
            assert_eq!(
                &job.attempts[0].runner_id, want,
                "job {id} went to the wrong runner"
            );
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_runner_loses_its_lease_another_finishes_and_its_orphan_is_removed() {
    let server = TestServer::start(Db::Sqlite).await;
    let mut jobs = server.jobs().await;
    let mut first = RunnerProcess::start(&server, "doomed", &["--executors", "docker"]);
    let first_id = first.id().await;
    let mut spec = docker_sh(
        "if [ \"$GANTRY_ATTEMPT\" = 1 ]; then echo attempt-one; sleep 300; fi; echo attempt-two-done",
    )
    .await;
    spec.retry = Some(pb::RetryPolicy {
        max_attempts: 2,
        ..Default::default()
    });
    let id = submit(&mut jobs, spec).await;
    wait_for_output(&mut jobs, &id, "attempt-one").await;
    first.kill().await;
    // The container outlives the killed runner.
    let orphan_label = format!("gantry.runner-id={first_id}");
    assert_eq!(containers_with_label(&orphan_label).await.len(), 1);

    let _second = RunnerProcess::start(&server, "survivor", &["--executors", "docker"]);
    wait_for_status(&mut jobs, &id, JobStatus::Succeeded).await;
    let job = get(&mut jobs, &id).await;
    assert_eq!(job.attempts.len(), 2);
    assert_eq!(
        job.attempts[0].failure_kind,
        pb::FailureKind::RunnerLost as i32
    );
    assert_eq!(job.attempts[0].runner_id, first_id);
    assert_ne!(job.attempts[1].runner_id, first_id);
    assert_eq!(logs(&mut jobs, &id).await.0, b"attempt-two-done\n");

    // The first runner comes back as the same runner and removes what it left behind.
    let restarted_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    first.restart();
    assert_eq!(
        first.id().await,
        first_id,
        "the state file keeps the identity"
    );
    let admin = server.admin().await;
    eventually("the restarted runner opens a session", || {
        let mut admin = admin.clone();
        let first_id = first_id.clone();
        async move {
            let r = admin
                .get_runner(pb::GetRunnerRequest {
                    runner_id: first_id.clone(),
                })
                .await
                .ok()?
                .into_inner();
            (r.last_heartbeat_unix_ms >= restarted_at && r.state == pb::RunnerState::Online as i32)
                .then_some(())
        }
    })
    .await;
    assert!(
        containers_with_label(&orphan_label).await.is_empty(),
        "the orphan container is removed; runner log:\n{}",
        first.log()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_job_loses_no_log_byte_and_records_the_end_once() {
    let mut server = ServerProcess::start(&["--lease-seconds", "30"]).await;
    let mut jobs = server.jobs().await;
    let runner = RunnerProcess::start_for(
        &server.url,
        &server.registration_token,
        "steady",
        &["--executors", "process"],
    );
    let gate = tempfile::tempdir().expect("gate dir");
    let (go, finished) = (gate.path().join("go"), gate.path().join("finished"));
    // Output before the crash, output while the server is down, then the end.
    let script = format!(
        "for i in $(seq 1 200); do echo before-$i; done; echo half >&2; \
         while [ ! -e {go} ]; do sleep 0.05; done; \
         for i in $(seq 1 300); do echo during-$i; done; echo tail >&2; touch {finished}",
        go = go.display(),
        finished = finished.display()
    );
    let id = submit(&mut jobs, sh(&script)).await;
    wait_for_output(&mut jobs, &id, "before-200\n").await;
    server.kill().await;
    std::fs::write(&go, b"").expect("open the gate");
    eventually("the job finishes while the server is down", || async {
        finished.exists().then_some(())
    })
    .await;
    server.restart().await;
    let mut jobs = server.jobs().await;
    wait_for_status(&mut jobs, &id, JobStatus::Succeeded).await;
    let (out, err) = logs(&mut jobs, &id).await;
    let mut want = String::new();
    for i in 1..=200 {
        want += &format!("before-{i}\n");
    }
    for i in 1..=300 {
        want += &format!("during-{i}\n");
    }
    assert_eq!(
        String::from_utf8_lossy(&out),
        want,
        "runner log:\n{}",
        runner.log()
    );
    assert_eq!(String::from_utf8_lossy(&err), "half\ntail\n");
    let events = gantry_tests::events(&mut jobs, &id).await;
    assert_eq!(transitions_to(&events, JobStatus::Succeeded), 1);
    assert_eq!(transitions_to(&events, JobStatus::Running), 1);
    assert_eq!(
        get(&mut jobs, &id).await.attempts.len(),
        1,
        "no retry was needed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_that_cannot_be_had_fails_cleanly() {
    let server = TestServer::start(Db::Sqlite).await;
    let mut jobs = server.jobs().await;
    let _runner = RunnerProcess::start(
        &server,
        "noimage",
        &["--executors", "docker", "--pull-timeout-seconds", "30"],
    );
    let absent = format!("gantry-test/absent-{}:1", uuid::Uuid::new_v4().simple());
    // ALWAYS pulls even an image the engine has: with no registry that fails too.
    let present = busybox_image().await;
    for (image, policy) in [
        (&absent, pb::PullPolicy::Never),
        (&absent, pb::PullPolicy::IfNotPresent),
        (&present, pb::PullPolicy::Always),
    ] {
        let spec = pb::JobSpec {
            image: image.clone(),
            pull_policy: policy as i32,
            ..Default::default()
        };
        let id = submit(&mut jobs, spec).await;
        wait_for_status(&mut jobs, &id, JobStatus::Failed).await;
        let job = get(&mut jobs, &id).await;
        assert_eq!(
            job.failure_kind,
            pb::FailureKind::ImageUnavailable as i32,
            "{policy:?}: {}",
            job.failure_message
        );
        assert!(
            job.failure_message.contains(image.as_str()),
            "{}",
            job.failure_message
        );
        assert!(
            containers_with_label(&format!("gantry.job-id={id}"))
                .await
                .is_empty()
        );
        let pulled = phases(&gantry_tests::events(&mut jobs, &id).await)
            .contains(&pb::ExecutorPhase::Pulling);
        assert_eq!(pulled, policy != pb::PullPolicy::Never, "{policy:?}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_lets_running_work_finish_then_deregisters_and_exits_0() {
    let server = TestServer::start(Db::Sqlite).await;
    let mut jobs = server.jobs().await;
    let mut admin = server.admin().await;
    let mut runner = RunnerProcess::start(
        &server,
        "drainer",
        &["--executors", "process", "--capacity", "2"],
    );
    let runner_id = runner.id().await;
    let gate = tempfile::tempdir().expect("gate dir");
    let go = gate.path().join("go");
    let running = submit(
        &mut jobs,
        sh(&format!(
            "echo ready; while [ ! -e {} ]; do sleep 0.05; done; echo finished",
            go.display()
        )),
    )
    .await;
    wait_for_output(&mut jobs, &running, "ready").await;
    runner.signal(Signal::SIGTERM);
    eventually("the runner drains", || {
        let mut admin = admin.clone();
        let runner_id = runner_id.clone();
        async move {
            let r = admin
                .get_runner(pb::GetRunnerRequest {
                    runner_id: runner_id.clone(),
                })
                .await
                .ok()?
                .into_inner();
            (r.state == pb::RunnerState::Draining as i32).then_some(())
        }
    })
    .await;
    // A draining runner takes no new work, though it has a free slot.
    let later = submit(&mut jobs, sh("echo should-not-run")).await;
    std::fs::write(&go, b"").expect("open the gate");
    wait_for_status(&mut jobs, &running, JobStatus::Succeeded).await;
    assert_eq!(runner.wait().await, 0, "runner log:\n{}", runner.log());
    let r = admin
        .get_runner(pb::GetRunnerRequest { runner_id })
        .await
        .expect("get runner")
        .into_inner();
    assert_eq!(r.state, pb::RunnerState::Offline as i32, "deregistered");
    assert_eq!(
        get(&mut jobs, &later).await.status,
        JobStatus::Queued as i32
    );
    assert_eq!(logs(&mut jobs, &running).await.0, b"ready\nfinished\n");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_grace_that_runs_out_stops_the_work_and_reports_it() {
    let server = TestServer::start(Db::Sqlite).await;
    let mut jobs = server.jobs().await;
    let mut runner = RunnerProcess::start(
        &server,
        "impatient",
        &["--executors", "docker", "--drain-grace-seconds", "1"],
    );
    let mut spec = docker_sh("echo ready; sleep 300").await;
    spec.cancel_grace_seconds = 1;
    let id = submit(&mut jobs, spec).await;
    wait_for_output(&mut jobs, &id, "ready").await;
    runner.signal(Signal::SIGTERM);
    wait_for_status(&mut jobs, &id, JobStatus::Failed).await;
    let job = get(&mut jobs, &id).await;
    assert_eq!(job.failure_kind, pb::FailureKind::RunnerLost as i32);
    assert!(
        job.failure_message.contains("drain grace of 1 s"),
        "{}",
        job.failure_message
    );
    assert_eq!(runner.wait().await, 0, "runner log:\n{}", runner.log());
    assert!(
        containers_with_label(&format!("gantry.job-id={id}"))
            .await
            .is_empty()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_takes_exactly_one_job_and_exits_with_its_outcome() {
    let server = TestServer::start(Db::Sqlite).await;
    let mut jobs = server.jobs().await;
    let failing = submit(&mut jobs, sh("echo failing; exit 3")).await;
    let second = submit(&mut jobs, sh("echo second")).await;
    let mut runner = RunnerProcess::start(
        &server,
        "ephemeral",
        &["--executors", "process", "--once", "--capacity", "4"],
    );
    assert_eq!(
        runner.wait().await,
        1,
        "FAILED exits 1; log:\n{}",
        runner.log()
    );
    assert_eq!(
        get(&mut jobs, &failing).await.status,
        JobStatus::Failed as i32
    );
    assert_eq!(
        get(&mut jobs, &second).await.status,
        JobStatus::Queued as i32,
        "exactly one job"
    );
    let mut next = RunnerProcess::start(
        &server,
        "ephemeral-2",
        &["--executors", "process", "--once"],
    );
    assert_eq!(
        next.wait().await,
        0,
        "SUCCEEDED exits 0; log:\n{}",
        next.log()
    );
    assert_eq!(
        get(&mut jobs, &second).await.status,
        JobStatus::Succeeded as i32
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_runner_leaves_after_its_idle_timeout() {
    let server = TestServer::start(Db::Sqlite).await;
    let mut runner = RunnerProcess::start(
        &server,
        "idler",
        &["--executors", "process", "--idle-timeout-seconds", "1"],
    );
    let runner_id = runner.id().await;
    assert_eq!(runner.wait().await, 0, "runner log:\n{}", runner.log());
    let r = server
        .admin()
        .await
        .get_runner(pb::GetRunnerRequest { runner_id })
        .await
        .expect("get runner")
        .into_inner();
    assert_eq!(r.state, pb::RunnerState::Offline as i32);
    assert!(runner.log().contains("idle for 1 s"), "{}", runner.log());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_loss_within_the_lease_loses_nothing() {
    let server = TestServer::start_with(Db::Sqlite, |c| c.lease_seconds = 30).await;
    let mut jobs = server.jobs().await;
    let network = Proxy::start(server.addr).await;
    let runner = RunnerProcess::start_for(
        &network.url(),
        &server.registration_token,
        "flaky",
        &["--executors", "process", "--reconnect-max-ms", "200"],
    );
    let gate = tempfile::tempdir().expect("gate dir");
    let (go, finished) = (gate.path().join("go"), gate.path().join("finished"));
    let script = format!(
        "for i in $(seq 1 100); do echo before-$i; done; \
         while [ ! -e {go} ]; do sleep 0.05; done; \
         for i in $(seq 1 100); do echo during-$i; done; touch {finished}",
        go = go.display(),
        finished = finished.display()
    );
    let id = submit(&mut jobs, sh(&script)).await;
    wait_for_output(&mut jobs, &id, "before-100\n").await;
    network.cut();
    std::fs::write(&go, b"").expect("open the gate");
    eventually("the job finishes while the network is down", || async {
        finished.exists().then_some(())
    })
    .await;
    network.restore();
    wait_for_status(&mut jobs, &id, JobStatus::Succeeded).await;
    let want: String = (1..=100)
        .map(|i| format!("before-{i}\n"))
        .chain((1..=100).map(|i| format!("during-{i}\n")))
        .collect();
    let (out, _) = logs(&mut jobs, &id).await;
    assert_eq!(
        String::from_utf8_lossy(&out),
        want,
        "runner log:\n{}",
        runner.log()
    );
    let events = gantry_tests::events(&mut jobs, &id).await;
    assert_eq!(transitions_to(&events, JobStatus::Succeeded), 1);
    assert_eq!(get(&mut jobs, &id).await.attempts.len(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_cut_off_past_its_lease_stops_the_work_it_lost() {
    let server = TestServer::start(Db::Sqlite).await;
    let mut jobs = server.jobs().await;
    let network = Proxy::start(server.addr).await;
    let cut_off = RunnerProcess::start_for(
        &network.url(),
        &server.registration_token,
        "cut-off",
        &["--executors", "docker", "--reconnect-max-ms", "200"],
    );
    let cut_off_id = cut_off.id().await;
    let mut spec = docker_sh(
        "if [ \"$GANTRY_ATTEMPT\" = 1 ]; then echo attempt-one; sleep 300; fi; echo attempt-two",
    )
    .await;
    spec.retry = Some(pb::RetryPolicy {
        max_attempts: 2,
        ..Default::default()
    });
    let id = submit(&mut jobs, spec).await;
    wait_for_output(&mut jobs, &id, "attempt-one").await;
    network.cut();
    let _other = RunnerProcess::start(&server, "other", &["--executors", "docker"]);
    wait_for_status(&mut jobs, &id, JobStatus::Succeeded).await;
    let job = get(&mut jobs, &id).await;
    assert_eq!(job.attempts[0].runner_id, cut_off_id);
    assert_eq!(
        job.attempts[0].failure_kind,
        pb::FailureKind::RunnerLost as i32
    );
    let first_lease = format!("gantry.lease-id={}", job.attempts[0].lease_id);
    // The first attempt's container still runs on the cut-off runner...
    assert_eq!(containers_with_label(&first_lease).await.len(), 1);
    // ...until it is back and learns that its lease is gone: it stops that work.
    network.restore();
    until_no_container(
        &first_lease,
        "the cut-off runner stops the work of its lost lease",
    )
    .await;
    assert!(cut_off.log().contains("lease lost"), "{}", cut_off.log());
    assert_eq!(logs(&mut jobs, &id).await.0, b"attempt-two\n");
    let events = gantry_tests::events(&mut jobs, &id).await;
    assert_eq!(transitions_to(&events, JobStatus::Succeeded), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_past_its_memory_limit_is_reported_oom_killed() {
    let server = TestServer::start(Db::Sqlite).await;
    let mut jobs = server.jobs().await;
    let _runner = RunnerProcess::start(&server, "oom", &["--executors", "docker"]);
    // The shell keeps 256 MiB of output in a variable under a 16 MiB limit.
    let mut spec = docker_sh("echo filling; x=$(yes | head -c 268435456); echo survived").await;
    spec.resources = Some(pb::Resources {
        memory_bytes: 16 * 1024 * 1024,
        cpu_millis: 500,
    });
    let id = submit(&mut jobs, spec).await;
    wait_for_status(&mut jobs, &id, JobStatus::Failed).await;
    let job = get(&mut jobs, &id).await;
    assert_eq!(
        job.failure_kind,
        pb::FailureKind::OomKilled as i32,
        "{}",
        job.failure_message
    );
    assert_eq!(logs(&mut jobs, &id).await.0, b"filling\n");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_reaches_a_tls_server_through_its_ca() {
    let tls_files = gantry_tests::TlsFiles::self_signed("localhost");
    let server = TestServer::start_with(Db::Sqlite, |c| tls_files.serve(c)).await;
    let url = format!("https://localhost:{}", server.addr.port());
    let runner = RunnerProcess::start_for(
        &url,
        &server.registration_token,
        "tls",
        &["--executors", "process", "--tls-ca", tls_files.cert_arg()],
    );
    let runner_id = runner.id().await;
    let tls = tonic::transport::Channel::from_shared(url)
        .expect("url")
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&tls_files.cert_pem)),
        )
        .expect("tls config")
        .connect()
        .await
        .expect("connect over TLS");
    let mut jobs = pb::job_service_client::JobServiceClient::with_interceptor(
        tls,
        gantry_tests::Bearer::new(&server.api_token),
    );
    let id = submit(&mut jobs, sh("echo over-tls")).await;
    wait_for_status(&mut jobs, &id, JobStatus::Succeeded).await;
    assert_eq!(get(&mut jobs, &id).await.attempts[0].runner_id, runner_id);
    assert_eq!(logs(&mut jobs, &id).await.0, b"over-tls\n");
    // The CLI reaches it through the same CA.
    let cli = tokio::process::Command::new(gantry_tests::procs::binary("gantry", "GANTRY_CLI_BIN"))
        .args([
            "--server",
            &format!("https://localhost:{}", server.addr.port()),
        ])
        .args(["--token", &server.api_token, "--tls-ca"])
        .arg(&tls_files.cert)
        .args(["get", &id])
        .output()
        .await
        .expect("run gantry");
    assert!(cli.status.success(), "{cli:?}");
    assert!(String::from_utf8_lossy(&cli.stdout).contains("succeeded"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_drain_command_drains_the_runner_which_then_exits_0() {
    let server = TestServer::start(Db::Sqlite).await;
    let mut jobs = server.jobs().await;
    let mut runner = RunnerProcess::start(&server, "drained", &["--executors", "process"]);
    let runner_id = runner.id().await;
    let gate = tempfile::tempdir().expect("gate dir");
    let go = gate.path().join("go");
    let id = submit(
        &mut jobs,
        sh(&format!(
            "echo ready; while [ ! -e {} ]; do sleep 0.05; done; echo done",
            go.display()
        )),
    )
    .await;
    wait_for_output(&mut jobs, &id, "ready").await;
    server
        .admin()
        .await
        .drain_runner(pb::DrainRunnerRequest {
            runner_id: runner_id.clone(),
            reason: "kernel upgrade".into(),
        })
        .await
        .expect("drain");
    std::fs::write(&go, b"").expect("open the gate");
    wait_for_status(&mut jobs, &id, JobStatus::Succeeded).await;
    assert_eq!(runner.wait().await, 0, "runner log:\n{}", runner.log());
    assert!(runner.log().contains("kernel upgrade"), "{}", runner.log());
    let r = server
        .admin()
        .await
        .get_runner(pb::GetRunnerRequest { runner_id })
        .await
        .expect("get runner")
        .into_inner();
    assert_eq!(r.state, pb::RunnerState::Offline as i32);
    server.stop().await;
}
