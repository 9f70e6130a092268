//! Scenarios of a work's files on a whole attempt ([`crate::job::run`]): a process job (and,
//! with the Docker engine and a static busybox, a container) whose server is the fake
//! WorkService of [`crate::testing`]; what it reported and what reached the server are
//! checked.
use std::{sync::Arc, time::Duration};

use gantry_proto as pb;
use tokio::sync::watch;

use crate::{
    executor::process::ProcessExecutor,
    job::{Context, run},
    outbox::{Budget, Outbox},
    relay::Relays,
    testing::{FakeInput, FakeServer, REFUSED, TOKEN},
};

struct Ran {
    status: pb::StatusReport,
    stderr: String,
}

async fn run_job(
    server: &FakeServer,
    job_id: &str,
    spec: pb::JobSpec,
    max_message_bytes: u32,
) -> Ran {
    let root = tempfile::tempdir().expect("tempdir");
    let executors: crate::executor::Executors =
        vec![Arc::new(ProcessExecutor::new(root.path().join("work")))];
    run_on(
        server,
        job_id,
        spec,
        max_message_bytes,
        executors,
        root.path(),
    )
    .await
}

async fn run_on(
    server: &FakeServer,
    job_id: &str,
    spec: pb::JobSpec,
    max_message_bytes: u32,
    executors: crate::executor::Executors,
    root: &std::path::Path,
) -> Ran {
    let outbox = Arc::new(Outbox::new(1 << 26));
    let relays = Relays::new(server.channel.clone(), root.join("relay"));
    relays.set_limits(Some(&pb::Limits {
        max_message_bytes,
        ..Default::default()
    }));
    let ctx = Arc::new(Context {
        outbox: outbox.clone(),
        executors,
        runner_id: "runner-1".into(),
        relays,
    });
    let lease = uuid::Uuid::new_v4().to_string();
    assert!(outbox.open(job_id, &lease));
    let assignment = pb::Assignment {
        job_id: job_id.to_string(),
        lease_id: lease,
        attempt: 1,
        spec: Some(spec),
        work_token: TOKEN.to_string(),
        ..Default::default()
    };
    let (stop, _) = watch::channel(None);
    run(ctx, assignment, stop).await.expect("reported");
    let mut ran = Ran {
        status: pb::StatusReport::default(),
        stderr: String::new(),
    };
    for r in outbox.take_unsent(Budget::UNLIMITED) {
        match r.body {
            Some(pb::report::Body::Status(s)) => ran.status = s,
            Some(pb::report::Body::Log(l)) if l.stream == pb::LogStream::Stderr as i32 => {
                ran.stderr.push_str(&String::from_utf8_lossy(&l.data))
            }
            _ => {}
        }
    }
    ran
}

fn input(path: &str) -> pb::Input {
    pb::Input {
        path: path.to_string(),
        source: Some(pb::input::Source::BlobDigest(
            crate::testing::blob_of(b"x").digest,
        )),
    }
}

fn process(script: &str) -> pb::JobSpec {
    pb::JobSpec {
        executor: pb::ExecutorKind::Process as i32,
        command: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

#[tokio::test]
async fn inputs_are_in_place_and_artifacts_stored_before_the_end_is_reported() {
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let server = FakeServer::start("job-1", vec![FakeInput::Bytes(data.clone())]).await;
    let mut spec = process(
        "mkdir -p out/deep && cp data/in.bin out/copy.bin \
         && printf %s \"$GANTRY_WORK_TOKEN\" > out/token.txt \
         && printf %s \"$GANTRY_ENDPOINT\" > endpoint.txt \
         && head -c 3000000 /dev/zero > out/deep/big.bin \
         && echo no > refused.txt && printf 'no newline' >&2",
    );
    spec.inputs = vec![input("data/in.bin")];
    spec.artifacts = vec![
        "out".into(),
        "endpoint.txt".into(),
        REFUSED.into(),
        "nothing/*.x".into(),
    ];
    let max_message = 600 * 1024;
    let ran = run_job(&server, "job-1", spec, max_message).await;
    assert_eq!(
        ran.status.status,
        pb::JobStatus::Succeeded as i32,
        "{:?}",
        ran.status
    );
    let seen = server.seen();
    assert_eq!(seen.artifacts.get("out/copy.bin"), Some(&data));
    assert_eq!(
        seen.artifacts.get("out/token.txt").map(Vec::as_slice),
        Some(TOKEN.as_bytes())
    );
    assert_eq!(
        seen.artifacts.get("out/deep/big.bin").map(Vec::len),
        Some(3_000_000)
    );
    assert!(seen.largest_chunk <= crate::relay::chunk_bytes(max_message as usize));
    let endpoint = String::from_utf8_lossy(&seen.artifacts["endpoint.txt"]).to_string();
    let socket = endpoint.strip_prefix("unix://").expect("a unix endpoint");
    assert!(socket.ends_with("/gantry.sock"), "{socket}");
    assert!(
        !std::path::Path::new(socket).exists(),
        "the endpoint goes with the work"
    );
    assert_eq!(
        ran.stderr,
        "no newline\n\
         gantry: artifact path \"nothing/*.x\" matched nothing\n\
         gantry: artifact \"refused.txt\" not stored: the job's artifacts are past --max-artifact-bytes\n"
    );
}

/// Needs the Docker engine and a static busybox (GANTRY_TEST_BUSYBOX).
#[tokio::test]
async fn a_containers_inputs_go_in_before_it_starts_and_its_artifacts_come_out() {
    use std::os::unix::fs::PermissionsExt as _;

    use crate::executor::docker::DockerExecutor;
    let image = crate::testing::busybox_image().await;
    let root = tempfile::tempdir().expect("tempdir");
    let gantry = root.path().join("gantry");
    std::fs::write(&gantry, "echo gantry inside\n").expect("gantry");
    std::fs::set_permissions(&gantry, std::fs::Permissions::from_mode(0o755)).expect("mode");
    let docker = || async {
        let d = DockerExecutor::connect(Duration::from_secs(60))
            .await
            .expect("a Docker engine")
            .with_files(Some(gantry.clone()), root.path().join("transit"));
        let executors: crate::executor::Executors = vec![Arc::new(d)];
        executors
    };
    let data: Vec<u8> = (0..2_500_000u32).map(|i| (i % 253) as u8).collect();
    let server = FakeServer::start("job-d", vec![FakeInput::Bytes(data.clone())]).await;
    let spec = pb::JobSpec {
        executor: pb::ExecutorKind::Docker as i32,
        image: image.clone(),
        pull_policy: pb::PullPolicy::Never as i32,
        working_dir: "/work".into(),
        command: vec![
            "sh".into(),
            "-c".into(),
            "mkdir -p out/deep && cp data/in.bin out/deep/copy.bin \
             && test -S /run/gantry/gantry.sock \
             && echo \"$GANTRY_ENDPOINT $GANTRY_WORK_TOKEN\" > out/env.txt \
             && sh /usr/local/bin/gantry > out/gantry.txt"
                .into(),
        ],
        inputs: vec![input("data/in.bin")],
        artifacts: vec!["out/**".into(), "missing.txt".into()],
        ..Default::default()
    };
    let ran = run_on(&server, "job-d", spec, 0, docker().await, root.path()).await;
    assert_eq!(
        ran.status.status,
        pb::JobStatus::Succeeded as i32,
        "{:?} {}",
        ran.status,
        ran.stderr
    );
    {
        let seen = server.seen();
        assert_eq!(seen.artifacts.get("out/deep/copy.bin"), Some(&data));
        assert_eq!(
            String::from_utf8_lossy(&seen.artifacts["out/env.txt"]),
            format!("unix:///run/gantry/gantry.sock {TOKEN}\n")
        );
        assert_eq!(
            String::from_utf8_lossy(&seen.artifacts["out/gantry.txt"]),
            "gantry inside\n"
        );
    }
    assert_eq!(
        ran.stderr,
        "gantry: artifact path \"missing.txt\" matched nothing\n"
    );

    // The image's working directory (`/` here), and a file at its root.
    let server = FakeServer::start("job-e", vec![FakeInput::Bytes(b"root".to_vec())]).await;
    let spec = pb::JobSpec {
        executor: pb::ExecutorKind::Docker as i32,
        image,
        pull_policy: pb::PullPolicy::Never as i32,
        command: vec!["sh".into(), "-c".into(), "cp in.txt result.txt".into()],
        inputs: vec![input("in.txt")],
        artifacts: vec!["result.txt".into()],
        ..Default::default()
    };
    let ran = run_on(&server, "job-e", spec, 0, docker().await, root.path()).await;
    assert_eq!(
        ran.status.status,
        pb::JobStatus::Succeeded as i32,
        "{:?}",
        ran.status
    );
    assert_eq!(
        server.seen().artifacts.get("result.txt").map(Vec::as_slice),
        Some(&b"root"[..])
    );
    assert_eq!(ran.stderr, "");
    let transit = root.path().join("transit");
    let left = std::fs::read_dir(&transit).map_or(0, |d| d.count());
    assert_eq!(left, 0, "nothing left in transit");
}

/// Needs the Docker engine and a static busybox (GANTRY_TEST_BUSYBOX).
#[tokio::test]
async fn a_containers_links_are_named_and_what_comes_out_of_it_is_capped() {
    use crate::executor::docker::DockerExecutor;
    let image = crate::testing::busybox_image().await;
    let root = tempfile::tempdir().expect("tempdir");
    let d = DockerExecutor::connect(Duration::from_secs(60))
        .await
        .expect("a Docker engine")
        .with_files(None, root.path().join("transit"))
        .with_max_transit_bytes(250_000);
    let executors: crate::executor::Executors = vec![Arc::new(d)];
    let server = FakeServer::start("job-c", Vec::new()).await;
    let spec = pb::JobSpec {
        executor: pb::ExecutorKind::Docker as i32,
        image,
        pull_policy: pb::PullPolicy::Never as i32,
        working_dir: "/work".into(),
        command: vec![
            "sh".into(),
            "-c".into(),
            "mkdir -p out && head -c 100000 /dev/zero > out/a.bin \
             && busybox ln out/a.bin out/b.bin && busybox ln -s /etc/passwd out/c.bin \
             && echo not wanted > other.txt \
             && head -c 100000 /dev/zero > z1.dat && head -c 100000 /dev/zero > z2.dat"
                .into(),
        ],
        artifacts: vec!["out/**".into(), "**/*.dat".into()],
        ..Default::default()
    };
    let ran = run_on(&server, "job-c", spec, 0, executors, root.path()).await;
    assert_eq!(
        ran.status.status,
        pb::JobStatus::Succeeded as i32,
        "{:?} {}",
        ran.status,
        ran.stderr
    );
    let sizes: Vec<(String, usize)> = server
        .seen()
        .artifacts
        .iter()
        .map(|(k, v)| (k.clone(), v.len()))
        .collect();
    assert_eq!(
        sizes,
        [
            ("out/a.bin".to_string(), 100_000),
            ("out/b.bin".to_string(), 100_000),
            ("z1.dat".to_string(), 100_000),
        ]
    );
    assert_eq!(
        ran.stderr,
        "gantry: artifact \"out/c.bin\" is a symbolic link; not stored\n\
         gantry: the artifacts read out of the container reached 250000 bytes (the runner's --max-artifact-transit-bytes); the rest were not read\n"
    );
    let left = std::fs::read_dir(root.path().join("transit")).map_or(0, |d| d.count());
    assert_eq!(left, 0, "nothing left in transit");
}

#[tokio::test]
async fn an_input_that_cannot_be_had_fails_the_attempt_before_anything_runs() {
    let server = FakeServer::start(
        "job-2",
        vec![
            FakeInput::Bytes(b"fine".to_vec()),
            FakeInput::Corrupt(b"corrupt".to_vec()),
        ],
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut spec = process("touch ran");
    spec.working_dir = dir.path().display().to_string();
    spec.inputs = vec![input("a.txt"), input("data/in.bin")];
    spec.artifacts = vec!["*".into()];
    let ran = run_job(&server, "job-2", spec, 0).await;
    assert_eq!(
        (ran.status.status, ran.status.failure_kind),
        (
            pb::JobStatus::Failed as i32,
            pb::FailureKind::InputUnavailable as i32
        )
    );
    assert!(
        ran.status
            .message
            .starts_with("input 1 (data/in.bin): its bytes have digest"),
        "{}",
        ran.status.message
    );
    assert!(!dir.path().join("ran").exists());
    assert!(!dir.path().join("data/in.bin").exists(), "no partial input");
    assert!(server.seen().artifacts.is_empty());

    let server = FakeServer::start(
        "job-3",
        vec![FakeInput::Unavailable(
            "job J has no artifact named N".into(),
        )],
    )
    .await;
    let mut spec = process("true");
    spec.inputs = vec![input("in.txt")];
    let ran = run_job(&server, "job-3", spec, 0).await;
    assert_eq!(
        ran.status.message,
        "input 0 (in.txt): job J has no artifact named N"
    );
    assert!(server.seen().reads.is_empty());
}

/// A process job on a server with this one input `in.bin`, in a working directory of its
/// own; the directory is checked to hold nothing after a failed placement.
async fn placing(job_id: &str, fake: FakeInput) -> (pb::StatusReport, Vec<String>) {
    let server = FakeServer::start(job_id, vec![fake]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut spec = process("touch ran");
    spec.working_dir = dir.path().display().to_string();
    spec.inputs = vec![input("in.bin")];
    let ran = run_job(&server, job_id, spec, 0).await;
    let left = std::fs::read_dir(dir.path())
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    (ran.status, left)
}

#[tokio::test]
async fn only_an_input_that_cannot_be_had_is_unavailable_other_faults_are_retried() {
    use pb::FailureKind::{ExecutorError, InputUnavailable};
    use tonic::Code;
    let data = vec![5u8; 200_000];
    let cases = [
        (
            FakeInput::Refused(data.clone(), Code::NotFound),
            InputUnavailable,
            "input 0 (in.bin): cannot be read: refused with NotFound",
        ),
        (
            FakeInput::Refused(data.clone(), Code::InvalidArgument),
            InputUnavailable,
            "input 0 (in.bin): cannot be read: refused with InvalidArgument",
        ),
        (
            FakeInput::Refused(data.clone(), Code::Internal),
            ExecutorError,
            "input 0 (in.bin): cannot be read: refused with Internal",
        ),
        (
            FakeInput::Refused(data.clone(), Code::PermissionDenied),
            ExecutorError,
            "input 0 (in.bin): cannot be read: refused with PermissionDenied",
        ),
        (
            FakeInput::BreaksOff(data.clone()),
            ExecutorError,
            "input 0 (in.bin): reading it broke off: the disk went away",
        ),
        (
            FakeInput::Corrupt(data),
            InputUnavailable,
            "input 0 (in.bin): its bytes have digest",
        ),
    ];
    for (i, (fake, kind, message)) in cases.into_iter().enumerate() {
        let (status, left) = placing(&format!("job-p{i}"), fake).await;
        assert_eq!(
            (status.status, status.failure_kind),
            (pb::JobStatus::Failed as i32, kind as i32),
            "{message}: {status:?}"
        );
        assert!(status.message.starts_with(message), "{}", status.message);
        assert!(
            left.is_empty(),
            "{message}: nothing ran, nothing left: {left:?}"
        );
    }
}

#[tokio::test]
async fn an_unreachable_server_or_an_unwritable_workspace_is_an_executor_error() {
    let server = FakeServer::start("job-u", vec![FakeInput::Bytes(b"x".to_vec())]).await;
    server.stop();
    let mut spec = process("true");
    spec.inputs = vec![input("a.txt"), input("b.txt")];
    let ran = run_job(&server, "job-u", spec, 0).await;
    assert_eq!(
        ran.status.failure_kind,
        pb::FailureKind::ExecutorError as i32,
        "{:?}",
        ran.status
    );
    assert!(
        ran.status
            .message
            .starts_with("input 0 (a.txt) and 1 more: the inputs could not be listed: "),
        "{}",
        ran.status.message
    );

    // A file where the input's directory goes.
    let server = FakeServer::start("job-w", vec![FakeInput::Bytes(b"x".to_vec())]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("data"), "a file").expect("file");
    let mut spec = process("touch ran");
    spec.working_dir = dir.path().display().to_string();
    spec.inputs = vec![input("data/in.bin")];
    let ran = run_job(&server, "job-w", spec, 0).await;
    assert_eq!(
        (ran.status.failure_kind, ran.status.message.as_str()),
        (
            pb::FailureKind::ExecutorError as i32,
            "input 0 (data/in.bin): cannot be placed: data: not a directory"
        )
    );
    assert!(!dir.path().join("ran").exists());
}

#[tokio::test]
async fn links_an_earlier_job_left_in_a_workspace_are_not_followed() {
    let outside = tempfile::tempdir().expect("tempdir");
    std::fs::write(outside.path().join("id_rsa"), "the runner's key").expect("key");
    let dir = tempfile::tempdir().expect("tempdir");
    let link = |name: &str, to: &std::path::Path| {
        std::os::unix::fs::symlink(to, dir.path().join(name)).expect("link")
    };
    link("secrets", outside.path());
    link("out", outside.path());
    link("report.txt", &outside.path().join("id_rsa"));
    std::fs::create_dir(dir.path().join("logs")).expect("logs");
    std::os::unix::fs::symlink(outside.path().join("id_rsa"), dir.path().join("logs/a.log"))
        .expect("link");

    // An input through a link is not placed.
    let server = FakeServer::start("job-l", vec![FakeInput::Bytes(b"x".to_vec())]).await;
    let mut spec = process("touch ran");
    spec.working_dir = dir.path().display().to_string();
    spec.inputs = vec![input("secrets/key.pem")];
    let ran = run_job(&server, "job-l", spec, 0).await;
    assert_eq!(
        (ran.status.failure_kind, ran.status.message.as_str()),
        (
            pb::FailureKind::ExecutorError as i32,
            "input 0 (secrets/key.pem): cannot be placed: secrets in the workspace is a symbolic link (links are not followed)"
        )
    );
    assert_eq!(std::fs::read_dir(outside.path()).expect("dir").count(), 1);

    // Artifacts through or at a link are not stored.
    let server = FakeServer::start("job-m", Vec::new()).await;
    let mut spec = process("echo mine > logs/b.log");
    spec.working_dir = dir.path().display().to_string();
    spec.artifacts = vec![
        "out/*".into(),
        "out/id_rsa".into(),
        "report.txt".into(),
        "logs/*.log".into(),
    ];
    let ran = run_job(&server, "job-m", spec, 0).await;
    assert_eq!(
        ran.status.status,
        pb::JobStatus::Succeeded as i32,
        "{:?}",
        ran.status
    );
    assert_eq!(
        server.seen().artifacts.keys().collect::<Vec<_>>(),
        ["logs/b.log"]
    );
    assert_eq!(
        ran.stderr,
        "gantry: artifact \"out\" is a symbolic link; not stored\n\
         gantry: artifact \"report.txt\" is a symbolic link; not stored\n\
         gantry: artifact \"logs/a.log\" is a symbolic link; not stored\n"
    );
}
