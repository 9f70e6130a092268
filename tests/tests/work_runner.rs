//! Data in and out of work end to end: the real `gantry-runner` serving each job its relay
//! socket, the real `gantry` binary called by the code inside the work (the debug build for
//! process jobs, the static build the runner mounts into containers for docker jobs), the
//! real Docker engine with the locally built busybox image, and real servers (a separate
//! `gantry-server` process where its memory or log is examined). Faults are real: SIGKILL of
//! the runner in the middle of an upload.

use gantry_proto as pb;
use gantry_tests::{
    data::*,
    procs::{RunnerProcess, ServerProcess, binary, docker_sh, eventually, static_gantry},
    *,
};
use pb::{FailureKind, JobStatus};
use tonic::Code;

type JobClient = pb::job_service_client::JobServiceClient<Authed>;

/// The debug `gantry` binary, for process jobs (they run on this host).
fn cli() -> String {
    binary("gantry", "GANTRY_CLI_BIN").display().to_string()
}

/// A process job running `sh -c script` with `CLI` set to the gantry binary.
fn process_job(script: &str) -> pb::JobSpec {
    let mut spec = sh(script);
    spec.env.insert("CLI".into(), cli());
    spec
}

async fn submit_to(jobs: &mut JobClient, spec: pb::JobSpec) -> String {
    submit(jobs, spec).await
}

fn names(artifacts: &[pb::Artifact]) -> Vec<&str> {
    artifacts.iter().map(|a| a.name.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_inside_a_process_job_reports_sets_a_result_and_publishes_through_gantry() {
    let server = ServerProcess::start(&[]).await;
    let runner = RunnerProcess::start_for(
        &server.url,
        &server.registration_token,
        "work",
        &["--executors", "process"],
    );
    let mut jobs = server.jobs().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let token_file = dir.path().join("token");
    let mut spec = process_job(
        r#"set -e
        "$CLI" job progress 40 loading
        "$CLI" job event checkpoint "epoch 1" --field loss=0.5
        echo '{"ok":true}' > out.json
        "$CLI" job result --file out.json
        mkdir -p out && echo data > out/a.txt
        "$CLI" job artifact put out/a.txt
        printf %s "$GANTRY_WORK_TOKEN" > "$TOKEN_FILE"
        echo "endpoint $GANTRY_ENDPOINT job $GANTRY_JOB_ID attempt $GANTRY_ATTEMPT""#,
    );
    spec.env
        .insert("TOKEN_FILE".into(), token_file.display().to_string());
    spec.artifacts = vec!["out.json".into()];
    let id = submit_to(&mut jobs, spec).await;
    let job = finished(&mut jobs, &id).await;
    let (stdout, stderr) = logs(&mut jobs, &id).await;
    assert_eq!(
        job.status,
        JobStatus::Succeeded as i32,
        "{job:?}\n{}",
        String::from_utf8_lossy(&stderr)
    );
    let stdout = String::from_utf8_lossy(&stdout);
    assert!(stdout.contains(&format!("job {id} attempt 1")), "{stdout}");
    assert!(stdout.contains("endpoint unix:///"), "{stdout}");
    assert_eq!(job.progress.as_ref().map(|p| p.percent), Some(40));
    let result = job.result.clone().expect("result");
    assert_eq!(result.data, b"{\"ok\":true}\n");
    assert_eq!(result.content_type, "application/json");
    let listed = artifacts(&mut jobs, &id).await;
    assert_eq!(names(&listed), vec!["out.json", "out/a.txt"]);
    assert_eq!(
        download_artifact(&mut jobs, &id, "out/a.txt")
            .await
            .expect("download"),
        b"data\n"
    );
    let events = gantry_tests::events(&mut jobs, &id).await;
    assert!(events.iter().any(|e| matches!(&e.kind,
        Some(pb::job_event::Kind::Work(w)) if w.kind == "checkpoint" && w.fields.get("loss").map(String::as_str) == Some("0.5"))));

    // The token: in no answer, in no log; refused once the attempt has ended, and on
    // another job.
    let token = std::fs::read_to_string(&token_file).expect("the job wrote its token");
    assert!(token.starts_with("gwt_"));
    let listed_jobs = jobs
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect("list")
        .into_inner();
    for (what, text) in [
        ("GetJob", format!("{job:?}")),
        ("ListJobs", format!("{listed_jobs:?}")),
        ("WatchJob", format!("{events:?}")),
        ("the job's output", format!("{stdout}")),
        ("the server's log", server.log()),
        ("the runner's log", runner.log()),
    ] {
        assert!(!text.contains(&token), "{what} shows the work token");
    }
    let mut work = pb::work_service_client::WorkServiceClient::with_interceptor(
        channel(&server.url).await,
        Bearer::new(&token),
    );
    let progress = |job: &str| pb::ReportProgressRequest {
        job_id: job.into(),
        progress: Some(pb::Progress {
            percent: 99,
            ..Default::default()
        }),
    };
    let stale = work.report_progress(progress(&id)).await;
    assert_eq!(
        stale.err().map(|s| s.code()),
        Some(Code::FailedPrecondition)
    );
    let other = submit_to(&mut jobs, process_job("true")).await;
    let foreign = work.report_progress(progress(&other)).await;
    assert_eq!(
        foreign.err().map(|s| s.code()),
        Some(Code::PermissionDenied)
    );
    drop(runner);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_inside_a_docker_job_uses_the_mounted_gantry_binary_and_gets_its_inputs() {
    let server = TestServer::start(Db::Sqlite).await;
    let gantry = static_gantry().display().to_string();
    let _runner = RunnerProcess::start(
        &server,
        "docker-work",
        &["--executors", "docker", "--gantry-binary", &gantry],
    );
    let mut jobs = server.jobs().await;
    let blob = upload_blob(&mut jobs, b"hello input\n")
        .await
        .expect("blob");
    let mut spec = docker_sh(
        r#"set -e
        test "$(cat in/hello.txt)" = "hello input"
        if touch /run/gantry/probe 2>/dev/null; then echo "the relay directory is writable"; exit 9; fi
        /usr/local/bin/gantry job progress 40 loading
        /usr/local/bin/gantry job result --data hello --content-type text/plain
        echo made > made.txt
        /usr/local/bin/gantry job artifact put made.txt
        mkdir -p out && echo collected > out/c.txt"#,
    )
    .await;
    spec.working_dir = "/work".into();
    spec.inputs = vec![pb::Input {
        path: "in/hello.txt".into(),
        source: Some(pb::input::Source::BlobDigest(blob.digest.clone())),
    }];
    spec.artifacts = vec!["out".into()];
    let id = submit_to(&mut jobs, spec).await;
    let job = finished(&mut jobs, &id).await;
    let (_, stderr) = logs(&mut jobs, &id).await;
    assert_eq!(
        job.status,
        JobStatus::Succeeded as i32,
        "{job:?}\n{}",
        String::from_utf8_lossy(&stderr)
    );
    assert_eq!(job.progress.as_ref().map(|p| p.percent), Some(40));
    assert_eq!(
        job.result.as_ref().map(|r| r.data.clone()),
        Some(b"hello".to_vec())
    );
    let listed = artifacts(&mut jobs, &id).await;
    assert_eq!(names(&listed), vec!["made.txt", "out/c.txt"]);
    assert_eq!(
        download_artifact(&mut jobs, &id, "out/c.txt")
            .await
            .expect("download"),
        b"collected\n"
    );
    server.stop().await;
}

/// VmRSS or VmHWM of a process, in KiB.
fn memory_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mib_artifact_feeds_a_second_job_in_bounded_server_memory() {
    let server = ServerProcess::start(&[]).await;
    let pid = server.pid().expect("server pid");
    let _runner = RunnerProcess::start_for(
        &server.url,
        &server.registration_token,
        "big",
        &["--executors", "process"],
    );
    let mut jobs = server.jobs().await;
    // Warm up: the first job's work (a connection, the statements) before measuring.
    let warm = submit_to(&mut jobs, process_job("true")).await;
    finished(&mut jobs, &warm).await;
    let before = memory_kib(pid, "VmRSS:");
    // Resets the peak (VmHWM) to the current RSS.
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset the peak RSS");

    let mut producer = process_job("head -c 104857600 /dev/urandom > big.bin");
    producer.artifacts = vec!["big.bin".into()];
    let produced = submit_to(&mut jobs, producer).await;
    assert_eq!(
        finished(&mut jobs, &produced).await.status,
        JobStatus::Succeeded as i32
    );
    let listed = artifacts(&mut jobs, &produced).await;
    let blob = listed[0].blob.clone().expect("blob");
    assert_eq!(blob.size, 100 << 20);
    let mut consumer = process_job(
        r#"test "sha256:$(sha256sum data/big.bin | cut -c1-64)" = "$EXPECTED" && echo verified"#,
    );
    consumer.env.insert("EXPECTED".into(), blob.digest.clone());
    consumer.inputs = vec![pb::Input {
        path: "data/big.bin".into(),
        source: Some(pb::input::Source::Artifact(pb::ArtifactRef {
            job_id: produced.clone(),
            name: "big.bin".into(),
        })),
    }];
    let consumed = submit_to(&mut jobs, consumer).await;
    let job = finished(&mut jobs, &consumed).await;
    let (stdout, stderr) = logs(&mut jobs, &consumed).await;
    assert_eq!(
        job.status,
        JobStatus::Succeeded as i32,
        "{job:?} {}",
        String::from_utf8_lossy(&stderr)
    );
    assert_eq!(stdout, b"verified\n");
    let peak = memory_kib(pid, "VmHWM:");
    let grew_mib = peak.saturating_sub(before) / 1024;
    eprintln!(
        "server RSS before {} MiB, peak {} MiB",
        before / 1024,
        peak / 1024
    );
    assert!(
        grew_mib < 64,
        "the server's RSS grew by {grew_mib} MiB moving 100 MiB twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_input_fails_the_attempt_before_the_command_runs() {
    let server = TestServer::start(Db::Sqlite).await;
    let _runner = RunnerProcess::start(&server, "inputs", &["--executors", "process"]);
    let mut jobs = server.jobs().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let marker = dir.path().join("ran");
    let mut spec = process_job(&format!("touch {}", marker.display()));
    spec.inputs = vec![pb::Input {
        path: "in/model.bin".into(),
        source: Some(pb::input::Source::Artifact(pb::ArtifactRef {
            job_id: uuid::Uuid::now_v7().to_string(),
            name: "model.bin".into(),
        })),
    }];
    spec.retry = Some(pb::RetryPolicy {
        max_attempts: 3,
        ..Default::default()
    });
    let id = submit_to(&mut jobs, spec).await;
    let job = finished(&mut jobs, &id).await;
    assert_eq!(job.status, JobStatus::Failed as i32, "{job:?}");
    assert_eq!(job.failure_kind, FailureKind::InputUnavailable as i32);
    assert!(
        job.failure_message.contains("in/model.bin"),
        "{}",
        job.failure_message
    );
    assert_eq!(job.attempt_count, 1, "an unavailable input is not retried");
    assert!(!marker.exists(), "the command ran");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_are_collected_when_the_work_fails() {
    let server = TestServer::start(Db::Sqlite).await;
    let _runner = RunnerProcess::start(&server, "failing", &[]);
    let mut jobs = server.jobs().await;
    let mut process = process_job("echo partial > out.txt; echo notes > notes.md; exit 3");
    process.artifacts = vec!["*.txt".into(), "nothing/here".into()];
    let mut docker = docker_sh("mkdir -p /w && cd /w && echo partial > out.txt; exit 4").await;
    docker.working_dir = "/w".into();
    docker.artifacts = vec!["out.txt".into()];
    for (spec, code) in [(process, 3), (docker, 4)] {
        let id = submit_to(&mut jobs, spec).await;
        let job = finished(&mut jobs, &id).await;
        assert_eq!(job.status, JobStatus::Failed as i32, "{job:?}");
        assert_eq!(job.exit_code, Some(code));
        let listed = artifacts(&mut jobs, &id).await;
        assert_eq!(names(&listed), vec!["out.txt"]);
        assert_eq!(
            download_artifact(&mut jobs, &id, "out.txt")
                .await
                .expect("download"),
            b"partial\n"
        );
        if code == 3 {
            let (_, stderr) = logs(&mut jobs, &id).await;
            let stderr = String::from_utf8_lossy(&stderr);
            assert!(
                stderr.contains("nothing/here"),
                "an unmatched path is said: {stderr}"
            );
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_submitted_from_inside_records_its_parent_and_is_canceled_with_it() {
    let server = TestServer::start(Db::Sqlite).await;
    let _runner = RunnerProcess::start(
        &server,
        "parent",
        &["--executors", "process", "--capacity", "2"],
    );
    let mut jobs = server.jobs().await;
    let parent = submit_to(
        &mut jobs,
        process_job(r#""$CLI" job submit -- sleep 300 && sleep 300"#),
    )
    .await;
    let child = eventually("the parent's work submits a child", || {
        let mut jobs = jobs.clone();
        let parent = parent.clone();
        async move {
            jobs.list_jobs(pb::ListJobsRequest {
                parent_job_id: parent,
                ..Default::default()
            })
            .await
            .ok()?
            .into_inner()
            .jobs
            .into_iter()
            .next()
        }
    })
    .await;
    assert_eq!(child.parent_job_id, parent);
    wait_for_status(&mut jobs, &child.id, JobStatus::Running).await;
    jobs.cancel_job(pb::CancelJobRequest {
        job_id: parent.clone(),
        reason: "done with it".into(),
    })
    .await
    .expect("cancel");
    assert_eq!(
        finished(&mut jobs, &parent).await.status,
        JobStatus::Canceled as i32
    );
    assert_eq!(
        finished(&mut jobs, &child.id).await.status,
        JobStatus::Canceled as i32
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_killed_mid_upload_leaves_no_half_artifact() {
    let server = ServerProcess::start(&["--lease-seconds", "3", "--reap-interval-ms", "100"]).await;
    let blobs = server.blob_dir().expect("a local blob store");
    let mut runner = RunnerProcess::start_for(
        &server.url,
        &server.registration_token,
        "killed",
        &["--executors", "process"],
    );
    let mut jobs = server.jobs().await;
    let mut spec = process_job("head -c 419430400 /dev/zero > big.bin");
    spec.artifacts = vec!["big.bin".into()];
    let id = submit_to(&mut jobs, spec).await;
    let tmp = blobs.join("tmp");
    eventually("the upload has begun", || {
        let started = !files_under(&tmp).is_empty();
        async move { started.then_some(()) }
    })
    .await;
    runner.kill().await;
    assert!(
        artifacts(&mut jobs, &id).await.is_empty(),
        "nothing is listed while the upload is unfinished"
    );
    let job = finished(&mut jobs, &id).await;
    assert_eq!(job.failure_kind, FailureKind::RunnerLost as i32, "{job:?}");
    assert!(
        artifacts(&mut jobs, &id).await.is_empty(),
        "a half artifact is listed"
    );
    eventually("the half upload's bytes are removed", || {
        let left = files_under(&tmp);
        async move { left.is_empty().then_some(()) }
    })
    .await;
    assert!(
        files_under(&blobs.join("blobs")).is_empty(),
        "no blob was addressed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_gets_its_inputs_its_commands_act_as_it_and_its_artifacts_are_kept() {
    let server = TestServer::start(Db::Sqlite).await;
    let _runner = RunnerProcess::start(&server, "sandbox-work", &["--executors", "process"]);
    let mut jobs = server.jobs().await;
    let mut sandboxes = server.sandboxes().await;
    let blob = upload_blob(&mut jobs, b"seed\n").await.expect("blob");
    let spec = pb::SandboxSpec {
        env: [("CLI".to_string(), cli())].into(),
        inputs: vec![pb::Input {
            path: "seed.txt".into(),
            source: Some(pb::input::Source::BlobDigest(blob.digest.clone())),
        }],
        artifacts: vec!["report.txt".into()],
        ..Default::default()
    };
    let sandbox = create_sandbox(&mut sandboxes, spec).await;
    wait_for_sandbox(&mut sandboxes, &sandbox.id, pb::SandboxStatus::Running).await;
    let command = run_in(
        &mut sandboxes,
        &sandbox.id,
        &[
            "sh",
            "-c",
            r#"set -e; cat seed.txt > report.txt; "$CLI" job progress 50 halfway; test "$GANTRY_JOB_ID" = "$GANTRY_SANDBOX_ID""#,
        ],
    )
    .await;
    let done = wait_for_command(
        &mut sandboxes,
        &sandbox.id,
        &command.id,
        pb::CommandStatus::Succeeded,
    )
    .await;
    assert_eq!(done.exit_code, Some(0), "{done:?}");
    delete_sandbox(&mut sandboxes, &sandbox.id).await;
    let events = wait_for_sandbox(&mut sandboxes, &sandbox.id, pb::SandboxStatus::Deleted).await;
    let listed = artifacts(&mut jobs, &sandbox.id).await;
    assert_eq!(names(&listed), vec!["report.txt"]);
    assert_eq!(
        download_artifact(&mut jobs, &sandbox.id, "report.txt")
            .await
            .expect("download"),
        b"seed\n"
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(&e.kind, Some(pb::job_event::Kind::Progress(p)) if p.percent == 50)),
        "the command's progress is the sandbox's"
    );
    server.stop().await;
}
