//! The `gantry-server` binary as an operator runs it: flags, a listening port, health, and a
//! graceful stop on SIGTERM with exit code 0.
use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_and_stops_gracefully_on_sigterm() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Find a free loopback port, then hand it to the binary.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_gantry-server"))
        .args([
            "--listen",
            &listen,
            "--database-url",
            &format!("sqlite://{}?mode=rwc", dir.path().join("g.db").display()),
            "--api-token",
            "t",
            "--registration-token",
            "r",
        ])
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn gantry-server");
    // Wait for the "listening" line rather than for time to pass.
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("gantry-server logs that it listens");
        if line.contains("gantry-server listening") {
            break;
        }
    }
    let channel = tonic::transport::Channel::from_shared(format!("http://{listen}"))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut health = HealthClient::new(channel);
    let status = health
        .check(HealthCheckRequest {
            service: "gantry.v1.JobService".into(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);
    drop(health);

    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(exit.success(), "exit status after SIGTERM: {exit:?}");
    // The reader ends at EOF, once the process has exited.
    let rest: Vec<String> = rx.iter().collect();
    assert!(
        rest.iter().any(|l| l.contains("SIGTERM")),
        "logs say why it stopped: {rest:?}"
    );
}
