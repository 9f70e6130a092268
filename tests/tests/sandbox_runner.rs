//! Sandboxes end to end: the real `gantry-runner` holding sandboxes as local process
//! workspaces and as containers on the Docker engine (the test image is built locally from a
//! static busybox), against a real server. Faults are real: SIGKILL of the runner, SIGKILL
//! of the server.
use gantry_proto as pb;
use gantry_tests::{
    procs::{
        RunnerProcess, ServerProcess, busybox_image, containers_with_label, eventually,
        until_no_container,
    },
    *,
};
use pb::{CommandStatus, SandboxStatus};

/// The Docker label the runner puts on a sandbox's container.
fn sandbox_label(id: &str) -> String {
    format!("gantry.sandbox-id={id}")
}

async fn docker_sandbox() -> pb::SandboxSpec {
    pb::SandboxSpec {
        executor: pb::ExecutorKind::Docker as i32,
        image: busybox_image().await,
        pull_policy: pb::PullPolicy::Never as i32,
        ..Default::default()
    }
}

fn sh_in(script: &str) -> pb::CommandSpec {
    pb::CommandSpec {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

/// Runs `script` in the sandbox and waits for it to end in `status`; returns its stdout.
async fn run_to_end(
    sandboxes: &mut Sandboxes,
    sandbox: &str,
    command: pb::CommandSpec,
    status: CommandStatus,
) -> (pb::SandboxCommand, String) {
    let c = run_command(sandboxes, sandbox, command).await;
    let c = wait_for_command(sandboxes, sandbox, &c.id, status).await;
    let out = command_logs(sandboxes, &c.id).await.0;
    (c, String::from_utf8_lossy(&out).into_owned())
}

/// Waits until the runner has started the command (its attempt reported RUNNING).
async fn until_started(sandboxes: &Sandboxes, id: &str) {
    eventually("the command starts", || {
        let mut sandboxes = sandboxes.clone();
        let id = id.to_string();
        async move { (get_command(&mut sandboxes, &id).await.started_at_unix_ms > 0).then_some(()) }
    })
    .await
}

/// The whole life of a sandbox on one executor: the workspace persists across commands;
/// a canceled command and a timed-out one leave the sandbox running; stdin arrives; three
/// commands sent at once run in order; delete removes the workspace and the lifecycle is
/// reported in order with the container.
async fn a_sandbox_lives_through_its_commands(spec: pb::SandboxSpec, runner_args: &[&str]) {
    let server = TestServer::start(Db::Sqlite).await;
    let mut sandboxes = server.sandboxes().await;
    let runner = RunnerProcess::start(&server, "sandboxes", runner_args);
    let docker = spec.executor == pb::ExecutorKind::Docker as i32;
    let sandbox = create_sandbox(&mut sandboxes, spec).await;
    let id = sandbox.id.clone();
    wait_for_sandbox(&mut sandboxes, &id, SandboxStatus::Running).await;
    let running = get_sandbox(&mut sandboxes, &id).await;
    assert!(!running.container_id.is_empty());
    if docker {
        let containers = containers_with_label(&sandbox_label(&id)).await;
        assert_eq!(containers.len(), 1, "one container for the sandbox");
        let full = containers[0].id.clone().unwrap_or_default();
        assert!(
            full.starts_with(&running.container_id),
            "{full} is the container the sandbox reports ({})",
            running.container_id
        );
    }

    // The workspace carries over.
    let (_, out) = run_to_end(
        &mut sandboxes,
        &id,
        sh_in("echo hello > state.txt; echo wrote"),
        CommandStatus::Succeeded,
    )
    .await;
    assert_eq!(out, "wrote\n");
    let (_, out) = run_to_end(
        &mut sandboxes,
        &id,
        sh_in("cat state.txt"),
        CommandStatus::Succeeded,
    )
    .await;
    assert_eq!(out, "hello\n", "runner log:\n{}", runner.log());

    // A canceled command ends CANCELED; the sandbox stays and runs the next one.
    let long = run_command(&mut sandboxes, &id, sh_in("echo started; sleep 600")).await;
    until_started(&sandboxes, &long.id).await;
    sandboxes
        .cancel_sandbox_command(pb::CancelSandboxCommandRequest {
            command_id: long.id.clone(),
            reason: "enough".into(),
        })
        .await
        .expect("cancel");
    let canceled = wait_for_command(&mut sandboxes, &id, &long.id, CommandStatus::Canceled).await;
    assert_eq!(canceled.failure_kind, pb::FailureKind::Canceled as i32);
    assert_eq!(
        get_sandbox(&mut sandboxes, &id).await.status,
        SandboxStatus::Running as i32
    );
    let (_, out) = run_to_end(
        &mut sandboxes,
        &id,
        sh_in("cat state.txt"),
        CommandStatus::Succeeded,
    )
    .await;
    assert_eq!(out, "hello\n");

    // Past its timeout: TIMED_OUT, and the sandbox lives on.
    let slow = pb::CommandSpec {
        timeout_seconds: 1,
        ..sh_in("sleep 600")
    };
    let (timed_out, _) = run_to_end(&mut sandboxes, &id, slow, CommandStatus::TimedOut).await;
    assert_eq!(timed_out.failure_kind, pb::FailureKind::Timeout as i32);

    // Stdin, and a non-zero exit with its code.
    let piped = pb::CommandSpec {
        stdin: b"piped bytes".to_vec(),
        ..sh_in("cat")
    };
    let (_, out) = run_to_end(&mut sandboxes, &id, piped, CommandStatus::Succeeded).await;
    assert_eq!(out, "piped bytes");
    let (failed, _) = run_to_end(&mut sandboxes, &id, sh_in("exit 7"), CommandStatus::Failed).await;
    assert_eq!(failed.exit_code, Some(7));

    // Three at once run in the order accepted.
    let batch: Vec<pb::SandboxCommand> = {
        let mut v = Vec::new();
        for n in 1..=3 {
            v.push(run_command(&mut sandboxes, &id, sh_in(&format!("echo {n} >> order"))).await);
        }
        v
    };
    for c in &batch {
        wait_for_command(&mut sandboxes, &id, &c.id, CommandStatus::Succeeded).await;
    }
    let (_, out) = run_to_end(
        &mut sandboxes,
        &id,
        sh_in("cat order"),
        CommandStatus::Succeeded,
    )
    .await;
    assert_eq!(out, "1\n2\n3\n");

    // Delete: the workspace is removed; the lifecycle arrived in order with the container.
    sandboxes
        .delete_sandbox(pb::DeleteSandboxRequest {
            sandbox_id: id.clone(),
            reason: "test over".into(),
        })
        .await
        .expect("delete");
    let events = wait_for_sandbox(&mut sandboxes, &id, SandboxStatus::Deleted).await;
    use SandboxStatus::*;
    assert_eq!(
        lifecycle(&events),
        [Pending, Creating, Starting, Running, Deleting, Deleted],
        "runner log:\n{}",
        runner.log()
    );
    let with_container = events.iter().any(|e| {
        matches!(&e.kind, Some(pb::job_event::Kind::Sandbox(c))
            if c.to == Running as i32 && c.container_id == running.container_id)
    });
    assert!(with_container, "{events:#?}");
    if docker {
        assert!(
            containers_with_label(&sandbox_label(&id)).await.is_empty(),
            "the container is removed"
        );
    } else {
        assert!(
            !std::path::Path::new(&running.container_id).exists(),
            "the workspace {} is removed",
            running.container_id
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_sandbox_lives_through_its_commands() {
    a_sandbox_lives_through_its_commands(pb::SandboxSpec::default(), &["--executors", "process"])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_docker_sandbox_lives_through_its_commands() {
    a_sandbox_lives_through_its_commands(docker_sandbox().await, &["--executors", "docker"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_and_one_shot_remove_the_container() {
    let server = TestServer::start(Db::Sqlite).await;
    let mut sandboxes = server.sandboxes().await;
    let _runner = RunnerProcess::start(&server, "endings", &["--executors", "docker"]);
    let idle = create_sandbox(
        &mut sandboxes,
        pb::SandboxSpec {
            idle_timeout_seconds: 1,
            ..docker_sandbox().await
        },
    )
    .await;
    let one_shot = create_sandbox(
        &mut sandboxes,
        pb::SandboxSpec {
            one_shot: true,
            ..docker_sandbox().await
        },
    )
    .await;
    let (_, out) = run_to_end(
        &mut sandboxes,
        &one_shot.id,
        sh_in("echo once"),
        CommandStatus::Succeeded,
    )
    .await;
    assert_eq!(out, "once\n");
    for id in [&idle.id, &one_shot.id] {
        wait_for_sandbox(&mut sandboxes, id, SandboxStatus::Deleted).await;
        until_no_container(&sandbox_label(id), "the sandbox's container is removed").await;
    }
    let idle = get_sandbox(&mut sandboxes, &idle.id).await;
    assert!(idle.message.contains("idle for 1 s"), "{idle:?}");
    let one_shot = get_sandbox(&mut sandboxes, &one_shot.id).await;
    assert!(one_shot.message.contains("one-shot"), "{one_shot:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_runner_fails_its_sandbox_and_removes_the_container_when_back() {
    let server = TestServer::start(Db::Sqlite).await;
    let mut sandboxes = server.sandboxes().await;
    let mut runner = RunnerProcess::start(&server, "doomed", &["--executors", "docker"]);
    let sandbox = create_sandbox(&mut sandboxes, docker_sandbox().await).await;
    let id = sandbox.id.clone();
    wait_for_sandbox(&mut sandboxes, &id, SandboxStatus::Running).await;
    let long = run_command(&mut sandboxes, &id, sh_in("sleep 600")).await;
    until_started(&sandboxes, &long.id).await;
    let queued = run_command(&mut sandboxes, &id, sh_in("echo never")).await;
    runner.kill().await;
    assert_eq!(containers_with_label(&sandbox_label(&id)).await.len(), 1);
    wait_for_sandbox(&mut sandboxes, &id, SandboxStatus::Failed).await;
    let failed = get_sandbox(&mut sandboxes, &id).await;
    assert_eq!(failed.failure_kind, pb::FailureKind::RunnerLost as i32);
    for c in [&long.id, &queued.id] {
        let c = get_command(&mut sandboxes, c).await;
        assert_eq!(c.status, CommandStatus::Failed as i32, "{c:?}");
        assert_eq!(c.failure_kind, pb::FailureKind::RunnerLost as i32);
    }
    // Back as the same runner: it removes the container it left behind, and the sandbox is
    // not re-created anywhere.
    runner.restart();
    until_no_container(
        &sandbox_label(&id),
        "the orphan sandbox container is removed",
    )
    .await;
    assert_eq!(
        get_sandbox(&mut sandboxes, &id).await.status,
        SandboxStatus::Failed as i32
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_command_loses_no_output_and_records_the_end_once() {
    let mut server = ServerProcess::start(&["--lease-seconds", "30"]).await;
    let mut sandboxes = server.sandboxes().await;
    let runner = RunnerProcess::start_for(
        &server.url,
        &server.registration_token,
        "steady",
        &["--executors", "process"],
    );
    let sandbox = create_sandbox(&mut sandboxes, pb::SandboxSpec::default()).await;
    let id = sandbox.id.clone();
    wait_for_sandbox(&mut sandboxes, &id, SandboxStatus::Running).await;
    let gate = tempfile::tempdir().expect("gate dir");
    let (go, finished) = (gate.path().join("go"), gate.path().join("finished"));
    let script = format!(
        "for i in $(seq 1 200); do echo before-$i; done; echo half >&2; \
         while [ ! -e {go} ]; do sleep 0.05; done; \
         for i in $(seq 1 300); do echo during-$i; done; echo tail >&2; touch {finished}",
        go = go.display(),
        finished = finished.display()
    );
    let c = run_command(&mut sandboxes, &id, sh_in(&script)).await;
    eventually("the first half of the output is stored", || {
        let mut sandboxes = sandboxes.clone();
        let c = c.id.clone();
        async move { (get_command(&mut sandboxes, &c).await.stderr_bytes == 5).then_some(()) }
    })
    .await;
    server.kill().await;
    std::fs::write(&go, b"").expect("open the gate");
    eventually("the command finishes while the server is down", || async {
        finished.exists().then_some(())
    })
    .await;
    server.restart().await;
    let mut sandboxes = server.sandboxes().await;
    let done = wait_for_command(&mut sandboxes, &id, &c.id, CommandStatus::Succeeded).await;
    assert_eq!(done.exit_code, Some(0));
    let (out, err) = command_logs(&mut sandboxes, &c.id).await;
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
    // The final status is recorded once: one SUCCEEDED update in the sandbox's trail.
    let events = watch_sandbox_until(&mut sandboxes, &id, "the command's end", |e| {
        matches!(&e.kind, Some(pb::job_event::Kind::Command(u))
            if u.command_id == c.id && u.status == CommandStatus::Succeeded as i32)
    })
    .await;
    let mut stream = sandboxes
        .watch_sandbox(pb::WatchSandboxRequest {
            sandbox_id: id.clone(),
            after_sequence: events.last().map_or(0, |e| e.sequence),
            follow: false,
        })
        .await
        .expect("watch rest")
        .into_inner();
    let mut later = Vec::new();
    while let Some(e) = tokio_stream::StreamExt::next(&mut stream).await {
        later.push(e.expect("event"));
    }
    let ends = events
        .iter()
        .chain(&later)
        .filter(|e| {
            matches!(&e.kind, Some(pb::job_event::Kind::Command(u))
                if u.command_id == c.id && u.status == CommandStatus::Succeeded as i32)
        })
        .count();
    assert_eq!(ends, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_past_its_lifetime_is_deleted_with_its_container() {
    let server = TestServer::start(Db::Sqlite).await;
    let mut sandboxes = server.sandboxes().await;
    let _runner = RunnerProcess::start(&server, "lifetime", &["--executors", "docker"]);
    let spec = pb::SandboxSpec {
        max_lifetime_seconds: 2,
        cancel_grace_seconds: 1,
        ..docker_sandbox().await
    };
    let sandbox = create_sandbox(&mut sandboxes, spec).await;
    let id = sandbox.id.clone();
    wait_for_sandbox(&mut sandboxes, &id, SandboxStatus::Running).await;
    // A command still running when the lifetime ends is stopped with it.
    let long = run_command(&mut sandboxes, &id, sh_in("sleep 600")).await;
    wait_for_sandbox(&mut sandboxes, &id, SandboxStatus::Deleted).await;
    let ended = get_sandbox(&mut sandboxes, &id).await;
    assert_eq!(
        ended.failure_kind,
        pb::FailureKind::Timeout as i32,
        "{ended:?}"
    );
    assert!(ended.expires_at_unix_ms > 0);
    let long = get_command(&mut sandboxes, &long.id).await;
    assert_eq!(long.status, CommandStatus::Canceled as i32, "{long:?}");
    until_no_container(&sandbox_label(&id), "the container is removed").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_runner_lets_the_running_command_finish_then_deletes_the_sandbox() {
    let server = TestServer::start(Db::Sqlite).await;
    let mut sandboxes = server.sandboxes().await;
    let mut runner = RunnerProcess::start(&server, "drainer", &["--executors", "process"]);
    let sandbox = create_sandbox(&mut sandboxes, pb::SandboxSpec::default()).await;
    let id = sandbox.id.clone();
    wait_for_sandbox(&mut sandboxes, &id, SandboxStatus::Running).await;
    let workspace = get_sandbox(&mut sandboxes, &id).await.container_id;
    let gate = tempfile::tempdir().expect("gate dir");
    let go = gate.path().join("go");
    let c = run_command(
        &mut sandboxes,
        &id,
        sh_in(&format!(
            "echo ready; while [ ! -e {} ]; do sleep 0.05; done; echo finished",
            go.display()
        )),
    )
    .await;
    until_started(&sandboxes, &c.id).await;
    runner.signal(nix::sys::signal::Signal::SIGTERM);
    // Drain reached the runner: it is DRAINING on the server.
    let admin = server.admin().await;
    let runner_id = runner.id().await;
    eventually("the runner drains", || {
        let mut admin = admin.clone();
        let runner_id = runner_id.clone();
        async move {
            let r = admin
                .get_runner(pb::GetRunnerRequest { runner_id })
                .await
                .ok()?
                .into_inner();
            (r.state == pb::RunnerState::Draining as i32).then_some(())
        }
    })
    .await;
    std::fs::write(&go, b"").expect("open the gate");
    let done = wait_for_command(&mut sandboxes, &id, &c.id, CommandStatus::Succeeded).await;
    assert_eq!(done.exit_code, Some(0));
    assert_eq!(
        command_logs(&mut sandboxes, &c.id).await.0,
        b"ready\nfinished\n"
    );
    wait_for_sandbox(&mut sandboxes, &id, SandboxStatus::Deleted).await;
    assert_eq!(runner.wait().await, 0, "runner log:\n{}", runner.log());
    assert!(
        !std::path::Path::new(&workspace).exists(),
        "the workspace {workspace} is removed"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_docker_sandbox_runs_its_images_own_command_beside_the_idle_init() {
    // An image whose own command leaves a mark and keeps running, built locally on the test
    // image (the engine already has it: nothing is pulled).
    let base = busybox_image().await;
    let ctx = tempfile::tempdir().expect("build context");
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!("FROM {base}\nCMD [\"sh\", \"-c\", \"echo up > /own-ran; exec sleep 600\"]\n"),
    )
    .expect("Dockerfile");
    let image = "gantry-test/own-command:1";
    let out = tokio::process::Command::new("docker")
        .args(["build", "-q", "-t", image])
        .arg(ctx.path())
        .env("DOCKER_BUILDKIT", "0")
        .output()
        .await
        .expect("run docker build");
    assert!(
        out.status.success(),
        "docker build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let server = TestServer::start(Db::Sqlite).await;
    let mut sandboxes = server.sandboxes().await;
    let runner = RunnerProcess::start(&server, "own", &["--executors", "docker"]);
    let spec = pb::SandboxSpec {
        image: image.into(),
        ..docker_sandbox().await
    };
    let sandbox = create_sandbox(&mut sandboxes, spec).await;
    wait_for_sandbox(&mut sandboxes, &sandbox.id, SandboxStatus::Running).await;
    let (_, out) = run_to_end(
        &mut sandboxes,
        &sandbox.id,
        sh_in("while [ ! -e /own-ran ]; do sleep 0.05; done; cat /own-ran"),
        CommandStatus::Succeeded,
    )
    .await;
    assert_eq!(out, "up\n", "runner log:\n{}", runner.log());
    delete_sandbox(&mut sandboxes, &sandbox.id).await;
    wait_for_sandbox(&mut sandboxes, &sandbox.id, SandboxStatus::Deleted).await;
    until_no_container(&sandbox_label(&sandbox.id), "the container is removed").await;
    server.stop().await;
}
