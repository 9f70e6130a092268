//! The container images on the real Docker engine: a `gantry-server` container and two
//! `gantry-runner` containers on a private Docker network, driven from the host with the CLI.
//!
//! The images are built from this tree by `scripts/images.sh`, once per run, tagged
//! `VERSION-test` (so a developer's own `VERSION` images are left alone).
use std::{os::unix::fs::MetadataExt as _, process::Stdio};

use tokio::sync::OnceCell;

use gantry_proto as pb;
use gantry_tests::{
    Bearer, PATIENCE, get, logs,
    procs::{busybox_image, docker, eventually, gantry, wait_for_output},
    wait_for_status,
};
use pb::{
    JobStatus, admin_service_client::AdminServiceClient, job_service_client::JobServiceClient,
};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const API_TOKEN: &str = "containers-api-token";
const REGISTRATION_TOKEN: &str = "containers-registration-token";
const SOCKET: &str = "/var/run/docker.sock";
/// A static release build from nothing takes minutes on two cores.
const IMAGE_BUILD_PATIENCE: std::time::Duration = std::time::Duration::from_secs(1200);

/// `docker ARGS…`; its trimmed stdout, or a failure with its stderr.
async fn docker_cli(args: &[&str]) -> String {
    let out = tokio::time::timeout(
        PATIENCE,
        tokio::process::Command::new("docker")
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("docker {args:?} did not finish"))
    .expect("run the docker CLI");
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The images of this source tree, built once per run by `scripts/images.sh` (a static
/// release build and two `docker build`s; both are no-ops when nothing changed), so the test
/// never runs images older than the code. Returns the tag.
async fn gantry_images() -> String {
    static TAG: OnceCell<String> = OnceCell::const_new();
    TAG.get_or_init(|| async {
        docker().await;
        let tag = format!("{}-test", env!("CARGO_PKG_VERSION"));
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("the workspace root");
        let out = tokio::time::timeout(
            IMAGE_BUILD_PATIENCE,
            tokio::process::Command::new(root.join("scripts/images.sh"))
                .current_dir(root)
                .env("GANTRY_IMAGE_PREFIX", "")
                .env("GANTRY_IMAGE_TAG", &tag)
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .unwrap_or_else(|_| panic!("scripts/images.sh did not finish in {IMAGE_BUILD_PATIENCE:?}"))
        .expect("run scripts/images.sh");
        assert!(
            out.status.success(),
            "scripts/images.sh failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        tag
    })
    .await
    .clone()
}

/// A private Docker network with a server container and runner containers on it. Everything
/// it started is removed when it is dropped, with the job containers its runners started.
struct Cluster {
    /// Names the network and prefixes every container; also their `gantry-test` label.
    id: String,
    /// The server's gRPC port, published on the host's loopback only.
    url: String,
    /// Runners whose job containers are removed at the end (a runner that is stopped
    /// mid-job, or a failing test, may leave one behind).
    runner_ids: Vec<String>,
    /// The runners' state directories, on the host: each is mounted into its runner at the
    /// same path (the chart's hostPath mode), because the host's engine bind-mounts the
    /// job's relay socket and the `gantry` binary from there by path.
    states: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Cluster {
        docker().await;
        let server_image = format!("gantry-server:{}", gantry_images().await);
        let id = format!(
            "gantry-t-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple().to_string().split_at(8).0
        );
        docker_cli(&[
            "network",
            "create",
            "--label",
            &format!("gantry-test={id}"),
            &id,
        ])
        .await;
        let mut cluster = Cluster {
            id: id.clone(),
            url: String::new(),
            runner_ids: Vec::new(),
            states: tempfile::Builder::new()
                .prefix("gantry-ct")
                .tempdir_in("/tmp")
                .expect("state directories"),
        };
        // Read-only root, the database on the image's volume directory (owned by 65532).
        docker_cli(&[
            "run",
            "-d",
            "--name",
            &format!("{id}-server"),
            "--label",
            &format!("gantry-test={id}"),
            "--network",
            &id,
            "--network-alias",
            "gantry-server",
            "--read-only",
            "--tmpfs",
            "/tmp",
            "-v",
            "/var/lib/gantry",
            "-p",
            "127.0.0.1:0:50051",
            "-e",
            &format!("GANTRY_API_TOKENS={API_TOKEN}"),
            "-e",
            &format!("GANTRY_REGISTRATION_TOKEN={REGISTRATION_TOKEN}"),
            "-e",
            "GANTRY_LEASE_SECONDS=5",
            &server_image,
        ])
        .await;
        let published = docker_cli(&["port", &format!("{id}-server"), "50051/tcp"]).await;
        let addr = published
            .lines()
            .find(|l| l.starts_with("127.0.0.1:"))
            .unwrap_or_else(|| {
                panic!("the server's port is not published on loopback: {published}")
            });
        cluster.url = format!("http://{addr}");
        let url = cluster.url.clone();
        eventually("the server container is SERVING", || {
            let url = url.clone();
            async move {
                let channel = Channel::from_shared(url).ok()?.connect().await.ok()?;
                let r = HealthClient::new(channel)
                    .check(HealthCheckRequest::default())
                    .await
                    .ok()?;
                (r.into_inner().status == ServingStatus::Serving as i32).then_some(())
            }
        })
        .await;
        cluster
    }

    /// Starts a runner container `name` using the host's Docker engine through its socket
    /// (the chart's hostPath mode), as the image's non-root user with the socket's group.
    async fn runner(&self, name: &str) -> String {
        let image = format!("gantry-runner:{}", gantry_images().await);
        let gid = std::fs::metadata(SOCKET)
            .unwrap_or_else(|e| panic!("the runner containers mount {SOCKET}: {e}"))
            .gid()
            .to_string();
        let container = format!("{}-{name}", self.id);
        let state = self.states.path().join(name);
        std::fs::create_dir_all(&state).expect("runner state dir");
        // The image's user (65532) owns it, as an operator prepares it on a node.
        std::os::unix::fs::chown(&state, Some(65532), Some(65532)).expect("chown state dir");
        let state = state.display().to_string();
        docker_cli(&[
            "run",
            "-d",
            "--name",
            &container,
            "--label",
            &format!("gantry-test={}", self.id),
            "--network",
            &self.id,
            "--read-only",
            "--tmpfs",
            "/tmp",
            "-v",
            &format!("{state}:{state}"),
            "-e",
            &format!("GANTRY_RUNNER_STATE_DIR={state}"),
            "-v",
            &format!("{SOCKET}:/var/run/docker.sock"),
            "--group-add",
            &gid,
            "-e",
            "GANTRY_SERVER=http://gantry-server:50051",
            "-e",
            &format!("GANTRY_REGISTRATION_TOKEN={REGISTRATION_TOKEN}"),
            "-e",
            &format!("GANTRY_RUNNER_NAME={container}"),
            "-e",
            "GANTRY_RUNNER_CAPACITY=1",
            "-e",
            "GANTRY_RUNNER_DRAIN_GRACE_SECONDS=1",
            &image,
        ])
        .await;
        container
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(self.url.clone())
            .expect("url")
            .connect()
            .await
            .expect("connect to the server container")
    }

    async fn logs_of(&self, container: &str) -> String {
        let out = tokio::process::Command::new("docker")
            .args(["logs", container])
            .output()
            .await
            .expect("docker logs");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let mut filters = vec![format!("label=gantry-test={}", self.id)];
        filters.extend(
            self.runner_ids
                .iter()
                .map(|r| format!("label=gantry.runner-id={r}")),
        );
        for filter in filters {
            let ids = std::process::Command::new("docker")
                .args(["ps", "-aq", "--filter", &filter])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let _ = std::process::Command::new("docker")
                    .args(["rm", "-f", "-v"])
                    .args(&ids)
                    .output();
            }
        }
        let _ = std::process::Command::new("docker")
            .args(["network", "rm", &self.id])
            .output();
    }
}

/// Server and two runners as containers: a job submitted from the host with the CLI runs to
/// completion; a runner container stopped mid-job hands the job back and the other runner
/// finishes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_and_two_runner_containers_finish_a_job_whose_runner_is_stopped() {
    let mut cluster = Cluster::start().await;
    let channel = cluster.channel().await;
    let mut jobs = JobServiceClient::with_interceptor(channel.clone(), Bearer::new(API_TOKEN));
    let admin = AdminServiceClient::with_interceptor(channel, Bearer::new(API_TOKEN));
    let image = busybox_image().await;
    let first = cluster.runner("runner-a").await;
    let second = cluster.runner("runner-b").await;
    cluster.runner_ids = eventually("both runner containers are ONLINE", || {
        let mut admin = admin.clone();
        let names = [first.clone(), second.clone()];
        async move {
            let runners = admin
                .list_runners(pb::ListRunnersRequest::default())
                .await
                .ok()?
                .into_inner()
                .runners;
            names
                .iter()
                .map(|n| {
                    runners
                        .iter()
                        .find(|r| &r.name == n && r.state == pb::RunnerState::Online as i32)
                        .map(|r| r.id.clone())
                })
                .collect::<Option<Vec<String>>>()
        }
    })
    .await;

    // A job from the host's CLI, waited for: its output and exit code come back.
    let done = gantry(
        &cluster.url,
        API_TOKEN,
        &[
            "submit",
            "--image",
            &image,
            "--pull",
            "never",
            "--wait",
            "--",
            "sh",
            "-c",
            "echo hello from a runner container",
        ],
    )
    .await;
    assert_eq!(
        done.code,
        0,
        "stdout: {}\nstderr: {}\nrunner logs:\n{}\n{}",
        done.stdout,
        done.stderr,
        cluster.logs_of(&first).await,
        cluster.logs_of(&second).await
    );
    assert_eq!(done.stdout, "hello from a runner container\n");

    // A job that sleeps on its first attempt; its runner container is stopped mid-job.
    let submitted = gantry(
        &cluster.url,
        API_TOKEN,
        &[
            "submit",
            "-o",
            "json",
            "--image",
            &image,
            "--pull",
            "never",
            "--retries",
            "1",
            "--grace",
            "1s",
            "--",
            "sh",
            "-c",
            "if [ \"$GANTRY_ATTEMPT\" = 1 ]; then echo attempt-one; sleep 300; fi; echo attempt-two-done",
        ],
    )
    .await;
    assert_eq!(submitted.code, 0, "{}", submitted.stderr);
    let job: serde_json::Value =
        serde_json::from_str(&submitted.stdout).expect("submit -o json prints the job");
    let id = job["id"].as_str().expect("the job's id").to_string();
    wait_for_output(&mut jobs, &id, "attempt-one").await;
    let holder_id = get(&mut jobs, &id).await.attempts[0].runner_id.clone();
    let holder = admin
        .clone()
        .get_runner(pb::GetRunnerRequest {
            runner_id: holder_id.clone(),
        })
        .await
        .expect("get the runner holding the job")
        .into_inner()
        .name;
    let other = if holder == first { &second } else { &first };
    assert!(holder == first || holder == second, "held by {holder}");

    // `docker stop`: SIGTERM, the runner drains (grace 1 s), stops the work, reports it and
    // exits 0 well inside docker's own 30 s before SIGKILL.
    docker_cli(&["stop", "-t", "30", &holder]).await;
    assert_eq!(
        docker_cli(&["inspect", "-f", "{{.State.ExitCode}}", &holder]).await,
        "0",
        "the stopped runner exits 0; its log:\n{}",
        cluster.logs_of(&holder).await
    );
    wait_for_status(&mut jobs, &id, JobStatus::Succeeded).await;
    let job = get(&mut jobs, &id).await;
    assert_eq!(job.attempts.len(), 2, "{job:#?}");
    assert_eq!(
        job.attempts[0].failure_kind,
        pb::FailureKind::RunnerLost as i32
    );
    let finisher = admin
        .clone()
        .get_runner(pb::GetRunnerRequest {
            runner_id: job.attempts[1].runner_id.clone(),
        })
        .await
        .expect("get the runner that finished the job")
        .into_inner()
        .name;
    assert_eq!(&finisher, other);
    assert_eq!(logs(&mut jobs, &id).await.0, b"attempt-two-done\n");
    // The stopped runner removed its job's container before it left.
    let left = docker_cli(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=gantry.runner-id={holder_id}"),
    ])
    .await;
    assert_eq!(left, "", "containers the stopped runner left behind");
}
