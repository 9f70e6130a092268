//! Data in and out of work at the protocol: a real server on a loopback port, a runner driven
//! by the test through the real RunnerService, and the code inside the work played by the
//! test calling the real WorkService with the attempt's work token — so that every rule of
//! the identity (scope, staleness, secrecy), results, artifacts, inputs and child jobs is
//! checked on its own, on SQLite and PostgreSQL, with the local blob store and an
//! S3-compatible one. `work_runner.rs` runs the same capability end to end with the real
//! runner, the `gantry` binary inside the work, processes and the Docker engine.
use gantry_proto as pb;
use gantry_tests::{data::*, procs::eventually, *};
use pb::JobStatus;
use tonic::Code;

on_both_databases!(
    a_work_token_acts_only_for_its_own_current_attempt,
    artifacts_are_stored_by_digest_listed_and_downloaded,
    uploads_cut_short_or_refused_leave_nothing_listed,
    inputs_resolve_to_uploaded_blobs_and_other_jobs_artifacts,
    children_record_their_parent_and_are_canceled_with_it,
    bad_input_is_refused_naming_the_field_and_changes_nothing,
    retention_removes_blobs_nothing_names_and_keeps_the_rest,
);

type JobClient = pb::job_service_client::JobServiceClient<Authed>;

/// Submits `spec`, has `runner` claim it and report RUNNING; returns the assignment.
async fn running(
    jobs: &mut JobClient,
    runner: &mut TestRunner,
    spec: pb::JobSpec,
) -> pb::Assignment {
    let id = submit(jobs, spec).await;
    let a = runner.claim_one().await;
    assert_eq!(a.job_id, id, "the runner claims the job just submitted");
    runner
        .report(&a, status(JobStatus::Running))
        .await
        .expect("running");
    a
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> (Code, String) {
    match r {
        Ok(v) => panic!("expected a refusal, got {v:?}"),
        Err(s) => (s.code(), s.message().to_string()),
    }
}

fn progress(job_id: &str, percent: u32) -> pb::ReportProgressRequest {
    pb::ReportProgressRequest {
        job_id: job_id.into(),
        progress: Some(pb::Progress {
            percent,
            stage: "loading".into(),
            message: String::new(),
        }),
    }
}

async fn a_work_token_acts_only_for_its_own_current_attempt(db: Db) {
    let server = TestServer::start(db).await;
    let mut jobs = server.jobs().await;
    let mut runner = server.runner("r", &[], 1).await;
    let a = running(&mut jobs, &mut runner, sh("true")).await;
    let token = a.work_token.clone();
    assert!(token.starts_with("gwt_"), "a work token: {token:.8}…");
    let mut work = server.work(&token).await;

    // What the identity may do to its own job.
    work.report_progress(progress(&a.job_id, 40))
        .await
        .expect("progress");
    work.set_result(pb::SetResultRequest {
        job_id: a.job_id.clone(),
        result: Some(pb::JobResult {
            data: br#"{"answer":42}"#.to_vec(),
            content_type: "application/json".into(),
            ..Default::default()
        }),
    })
    .await
    .expect("result");
    let sequence = work
        .append_event(pb::AppendEventRequest {
            job_id: a.job_id.clone(),
            event: Some(pb::WorkEvent {
                kind: "checkpoint".into(),
                message: "epoch 1".into(),
                fields: [("loss".to_string(), "0.25".to_string())].into(),
            }),
        })
        .await
        .expect("event")
        .into_inner()
        .sequence;
    assert!(sequence > 0);
    let job = get(&mut jobs, &a.job_id).await;
    assert_eq!(job.progress.as_ref().map(|p| p.percent), Some(40));
    let result = job.result.clone().expect("GetJob shows the result");
    assert_eq!(result.data, br#"{"answer":42}"#);
    assert_eq!(result.content_type, "application/json");
    assert_eq!(result.attempt, 1);
    let trail = gantry_tests::events(&mut jobs, &a.job_id).await;
    assert!(trail.iter().any(|e| matches!(&e.kind,
        Some(pb::job_event::Kind::Work(w)) if w.kind == "checkpoint" && e.sequence == sequence)));
    assert!(trail.iter().any(|e| matches!(&e.kind,
        Some(pb::job_event::Kind::Result(r)) if r.size == 13)));

    // The token is in no answer of any API, nor in the server's records shown to users.
    let listed = jobs
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect("list")
        .into_inner();
    let secret = token.rsplit('_').next().expect("secret part").to_string();
    for (what, text) in [
        ("GetJob", format!("{job:?}")),
        ("ListJobs", format!("{listed:?}")),
        ("WatchJob", format!("{trail:?}")),
    ] {
        assert!(!text.contains(&secret), "{what} shows the work token");
    }

    // Another job's work: PERMISSION_DENIED, and nothing changes there.
    let other = submit(&mut jobs, sh("true")).await;
    let (c, m) = code(work.report_progress(progress(&other, 10)).await);
    assert_eq!(c, Code::PermissionDenied, "{m}");
    assert!(m.contains(&other), "{m}");
    assert!(get(&mut jobs, &other).await.progress.is_none());

    // No token, a made-up one, an API token: UNAUTHENTICATED.
    for bad in ["", "gwt_0000", "test-api-token"] {
        let mut client = server.work(bad).await;
        let (c, m) = code(client.report_progress(progress(&a.job_id, 1)).await);
        assert_eq!(c, Code::Unauthenticated, "{bad:?}: {m}");
    }
    let (forged, _) = gantry_server::work::token::issue(a.lease_id.parse().expect("uuid"));
    let (c, _) = code(
        server
            .work(&forged)
            .await
            .report_progress(progress(&a.job_id, 1))
            .await,
    );
    assert_eq!(c, Code::Unauthenticated, "a token the server never issued");

    // Once the attempt has ended: FAILED_PRECONDITION, for every call.
    runner
        .report(&a, status(JobStatus::Succeeded))
        .await
        .expect("succeeded");
    let (c, m) = code(work.report_progress(progress(&a.job_id, 90)).await);
    assert_eq!(c, Code::FailedPrecondition, "{m}");
    let (c, _) = code(
        work.submit_child(pb::SubmitChildRequest {
            job_id: a.job_id.clone(),
            spec: Some(sh("true")),
        })
        .await,
    );
    assert_eq!(c, Code::FailedPrecondition);
    let (c, _) = code(upload_artifact(&mut work, &a.job_id, "late.txt", b"late").await);
    assert_eq!(c, Code::FailedPrecondition);
    assert_eq!(
        get(&mut jobs, &a.job_id).await.progress.map(|p| p.percent),
        Some(40)
    );
    server.stop().await;
}

async fn artifacts_are_stored_by_digest_listed_and_downloaded(db: Db) {
    artifacts_scenario(TestServer::start(db).await).await;
}

/// Two jobs publish the same bytes under different names, one replaces an artifact; every
/// artifact lists with its size and digest and downloads intact.
async fn artifacts_scenario(server: TestServer) {
    let mut jobs = server.jobs().await;
    let mut runner = server.runner("r", &[], 2).await;
    let same: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let first = running(&mut jobs, &mut runner, sh("true")).await;
    let second = running(&mut jobs, &mut runner, sh("true")).await;
    let mut work1 = server.work(&first.work_token).await;
    let mut work2 = server.work(&second.work_token).await;
    let stored = upload_artifact(&mut work1, &first.job_id, "out/model.bin", &same)
        .await
        .expect("upload");
    let blob = stored.blob.clone().expect("blob");
    assert_eq!(blob.digest, digest(&same));
    assert_eq!(blob.size, same.len() as u64);
    let again = upload_artifact(&mut work2, &second.job_id, "copy.bin", &same)
        .await
        .expect("upload the same bytes");
    assert_eq!(again.blob, stored.blob, "the same bytes, the same blob");
    upload_artifact(&mut work1, &first.job_id, "notes.txt", b"first")
        .await
        .expect("notes");
    upload_artifact(&mut work1, &first.job_id, "notes.txt", b"second version")
        .await
        .expect("a name uploaded again replaces the artifact");

    let listed = artifacts(&mut jobs, &first.job_id).await;
    let names: Vec<(&str, u64)> = listed
        .iter()
        .map(|a| (a.name.as_str(), a.blob.as_ref().map_or(0, |b| b.size)))
        .collect();
    assert_eq!(
        names,
        vec![("notes.txt", 14), ("out/model.bin", same.len() as u64)]
    );
    assert_eq!(
        download_artifact(&mut jobs, &first.job_id, "out/model.bin")
            .await
            .expect("download"),
        same
    );
    assert_eq!(
        download_artifact(&mut jobs, &first.job_id, "notes.txt")
            .await
            .expect("download"),
        b"second version"
    );
    if let Some(dir) = server.blob_dir() {
        // Deduplicated: three distinct contents, three files.
        let stored: Vec<_> = files_under(&dir.join("blobs"));
        assert_eq!(stored.len(), 3, "{stored:?}");
    }
    let trail = gantry_tests::events(&mut jobs, &first.job_id).await;
    let stored_events = trail
        .iter()
        .filter(|e| matches!(&e.kind, Some(pb::job_event::Kind::Artifact(a)) if a.error.is_empty()))
        .count();
    assert_eq!(stored_events, 3, "each stored artifact is an event");
    let (c, _) = code(download_artifact(&mut jobs, &first.job_id, "absent").await);
    assert_eq!(c, Code::NotFound);
    let (c, _) = code(
        jobs.list_artifacts(pb::ListArtifactsRequest {
            job_id: uuid::Uuid::now_v7().to_string(),
        })
        .await,
    );
    assert_eq!(c, Code::NotFound);
    server.stop().await;
}

async fn uploads_cut_short_or_refused_leave_nothing_listed(db: Db) {
    let server = TestServer::start_with(db, |c| {
        c.max_artifact_bytes = 1 << 20;
        c.max_artifacts_per_job = 2;
    })
    .await;
    let mut jobs = server.jobs().await;
    let mut runner = server.runner("r", &[], 1).await;
    let a = running(&mut jobs, &mut runner, sh("true")).await;
    let mut work = server.work(&a.work_token).await;

    // Fewer bytes than announced.
    let mut messages = artifact_messages(&a.job_id, "short.bin", &[1u8; 1000], 100);
    messages.truncate(5);
    let (c, m) = code(work.upload_artifact(tokio_stream::iter(messages)).await);
    assert_eq!(c, Code::InvalidArgument, "{m}");
    assert!(m.contains("header.size"), "{m}");

    // The uploader goes away in the middle: its connection is cut.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut cut = server.work(&a.work_token).await;
    let call = tokio::spawn(async move {
        cut.upload_artifact(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    for m in artifact_messages(&a.job_id, "half.bin", &[7u8; 600_000], 100_000)
        .into_iter()
        .take(3)
    {
        tx.send(m).await.expect("send");
    }
    call.abort();
    drop(tx);

    // Past the size limit (announced, and not announced).
    let big = vec![0u8; (1 << 20) + 1];
    let (c, m) = code(upload_artifact(&mut work, &a.job_id, "big.bin", &big).await);
    assert_eq!(c, Code::ResourceExhausted, "{m}");
    assert!(m.contains("--max-artifact-bytes"), "{m}");
    // An upload that does not say its size is refused before a byte is stored (a canceled
    // call ends its stream as a finished one does).
    let mut unannounced = artifact_messages(&a.job_id, "big2.bin", b"some", 256 * 1024);
    if let Some(pb::upload_artifact_request::Part::Header(h)) = &mut unannounced[0].part {
        h.size = None;
    }
    let (c, m) = code(work.upload_artifact(tokio_stream::iter(unannounced)).await);
    assert_eq!(c, Code::InvalidArgument, "{m}");
    assert!(m.contains("header.size"), "{m}");

    // Past the count limit; a replacement is not one more.
    upload_artifact(&mut work, &a.job_id, "one", b"1")
        .await
        .expect("one");
    upload_artifact(&mut work, &a.job_id, "two", b"2")
        .await
        .expect("two");
    upload_artifact(&mut work, &a.job_id, "two", b"2b")
        .await
        .expect("replacing two");
    let (c, m) = code(upload_artifact(&mut work, &a.job_id, "three", b"3").await);
    assert_eq!(c, Code::ResourceExhausted, "{m}");
    assert!(m.contains("--max-artifacts-per-job"), "{m}");

    // Only what was stored whole is listed, and no temporary upload is left behind.
    let names: Vec<String> = artifacts(&mut jobs, &a.job_id)
        .await
        .into_iter()
        .map(|a| a.name)
        .collect();
    assert_eq!(names, vec!["one", "two"]);
    if let Some(dir) = server.blob_dir() {
        eventually("the cut upload's temporary bytes are removed", || {
            let left = files_under(&dir.join("tmp"));
            async move { left.is_empty().then_some(()) }
        })
        .await;
    }
    // The job says what was refused.
    let refused: Vec<String> = gantry_tests::events(&mut jobs, &a.job_id)
        .await
        .into_iter()
        .filter_map(|e| match e.kind {
            Some(pb::job_event::Kind::Artifact(a)) if !a.error.is_empty() => Some(a.name),
            _ => None,
        })
        .collect();
    assert_eq!(refused, vec!["big.bin", "three"]);
    server.stop().await;
}

async fn inputs_resolve_to_uploaded_blobs_and_other_jobs_artifacts(db: Db) {
    let server = TestServer::start(db).await;
    let mut jobs = server.jobs().await;
    let mut runner = server.runner("r", &[], 1).await;
    let dataset: Vec<u8> = (0..2_500_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let blob = upload_blob(&mut jobs, &dataset).await.expect("upload blob");
    assert_eq!(blob.digest, digest(&dataset));
    let again = upload_blob(&mut jobs, &dataset).await.expect("again");
    assert_eq!(again, blob);
    let downloaded = collect(
        jobs.download_blob(pb::DownloadBlobRequest {
            digest: blob.digest.clone(),
        })
        .await
        .expect("download blob")
        .into_inner(),
    )
    .await
    .expect("blob bytes");
    assert_eq!(downloaded, dataset);

    // A producer publishes an artifact.
    let producer = running(&mut jobs, &mut runner, sh("true")).await;
    let mut work = server.work(&producer.work_token).await;
    upload_artifact(&mut work, &producer.job_id, "out/data.bin", b"produced")
        .await
        .expect("artifact");
    runner
        .report(&producer, status(JobStatus::Succeeded))
        .await
        .expect("done");

    // A consumer names both, and one that does not exist.
    let input = |path: &str, source: pb::input::Source| pb::Input {
        path: path.into(),
        source: Some(source),
    };
    let spec = pb::JobSpec {
        inputs: vec![
            input(
                "in/dataset",
                pb::input::Source::BlobDigest(blob.digest.clone()),
            ),
            input(
                "in/produced",
                pb::input::Source::Artifact(pb::ArtifactRef {
                    job_id: producer.job_id.clone(),
                    name: "out/data.bin".into(),
                }),
            ),
            input(
                "in/missing",
                pb::input::Source::Artifact(pb::ArtifactRef {
                    job_id: producer.job_id.clone(),
                    name: "out/nope".into(),
                }),
            ),
            // Upper-case hex names the same blob.
            input(
                "in/upper",
                pb::input::Source::BlobDigest(format!(
                    "sha256:{}",
                    blob.digest.trim_start_matches("sha256:").to_uppercase()
                )),
            ),
        ],
        ..sh("true")
    };
    let consumer = running(&mut jobs, &mut runner, spec).await;
    assert_eq!(
        consumer.spec.as_ref().map(|s| s.inputs.len()),
        Some(4),
        "the runner gets the inputs in the spec"
    );
    let mut work = server.work(&consumer.work_token).await;
    let listed = work
        .list_inputs(pb::ListInputsRequest {
            job_id: consumer.job_id.clone(),
        })
        .await
        .expect("list inputs")
        .into_inner()
        .inputs;
    assert_eq!(listed.len(), 4);
    assert_eq!(listed[3].blob, Some(blob.clone()));
    assert_eq!(listed[0].blob, Some(blob.clone()));
    assert_eq!(
        listed[1].blob.as_ref().map(|b| b.digest.clone()),
        Some(digest(b"produced"))
    );
    assert!(listed[2].blob.is_none());
    assert!(
        listed[2].unavailable.contains("out/nope"),
        "{:?}",
        listed[2]
    );
    let read = |index: u32| pb::ReadInputRequest {
        job_id: consumer.job_id.clone(),
        index,
    };
    let got = collect(work.read_input(read(0)).await.expect("read").into_inner())
        .await
        .expect("bytes");
    assert_eq!(digest(&got), blob.digest);
    let got = collect(work.read_input(read(1)).await.expect("read").into_inner())
        .await
        .expect("bytes");
    assert_eq!(got, b"produced");
    let (c, _) = code(work.read_input(read(2)).await);
    assert_eq!(c, Code::NotFound);
    let got = collect(work.read_input(read(3)).await.expect("read").into_inner())
        .await
        .expect("bytes");
    assert_eq!(digest(&got), blob.digest);
    let (c, m) = code(work.read_input(read(4)).await);
    assert_eq!(c, Code::InvalidArgument, "{m}");
    // Another job's token cannot read this job's inputs.
    let mut producer_work = server.work(&producer.work_token).await;
    let (c, _) = code(producer_work.read_input(read(0)).await);
    assert_ne!(c, Code::Ok);
    server.stop().await;
}

async fn children_record_their_parent_and_are_canceled_with_it(db: Db) {
    let server = TestServer::start(db).await;
    let mut jobs = server.jobs().await;
    let mut runner = server.runner("r", &[], 2).await;
    let parent = running(&mut jobs, &mut runner, sh("sleep 60")).await;
    let mut work = server.work(&parent.work_token).await;
    let child = |script: &str| pb::SubmitChildRequest {
        job_id: parent.job_id.clone(),
        spec: Some(sh(script)),
    };
    let first = work
        .submit_child(child("sleep 60"))
        .await
        .expect("child")
        .into_inner()
        .job
        .expect("job");
    assert_eq!(first.parent_job_id, parent.job_id);
    let held = runner.claim_one().await;
    assert_eq!(held.job_id, first.id, "the first child runs");
    runner
        .report(&held, status(JobStatus::Running))
        .await
        .expect("running");
    let second = work
        .submit_child(child("true"))
        .await
        .expect("child")
        .into_inner()
        .job
        .expect("job");
    // A grandchild, submitted by the first child's work.
    let grandchild = server
        .work(&held.work_token)
        .await
        .submit_child(pb::SubmitChildRequest {
            job_id: first.id.clone(),
            spec: Some(sh("true")),
        })
        .await
        .expect("grandchild")
        .into_inner()
        .job
        .expect("job");
    let children: Vec<String> = jobs
        .list_jobs(pb::ListJobsRequest {
            parent_job_id: parent.job_id.clone(),
            ..Default::default()
        })
        .await
        .expect("list children")
        .into_inner()
        .jobs
        .into_iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(children, vec![second.id.clone(), first.id.clone()]);

    jobs.cancel_job(pb::CancelJobRequest {
        job_id: parent.job_id.clone(),
        reason: "no longer needed".into(),
    })
    .await
    .expect("cancel parent");
    assert_eq!(
        get(&mut jobs, &parent.job_id).await.status,
        JobStatus::Canceling as i32
    );
    assert_eq!(
        get(&mut jobs, &first.id).await.status,
        JobStatus::Canceling as i32
    );
    let second_now = get(&mut jobs, &second.id).await;
    assert_eq!(second_now.status, JobStatus::Canceled as i32);
    assert!(
        second_now.failure_message.contains(&parent.job_id),
        "{}",
        second_now.failure_message
    );
    assert_eq!(
        get(&mut jobs, &grandchild.id).await.status,
        JobStatus::Canceled as i32
    );
    // The runner is told to stop both attempts it holds.
    let cancels = runner
        .client
        .poll_commands(pb::PollCommandsRequest {
            after_sequence: 0,
            wait_seconds: 0,
        })
        .await
        .expect("poll")
        .into_inner()
        .commands;
    let mut canceled: Vec<String> = cancels
        .into_iter()
        .filter_map(|c| match c.kind {
            Some(pb::command::Kind::Cancel(c)) => Some(c.job_id),
            _ => None,
        })
        .collect();
    canceled.sort();
    let mut expected = vec![parent.job_id.clone(), first.id.clone()];
    expected.sort();
    assert_eq!(canceled, expected);
    server.stop().await;
}

async fn bad_input_is_refused_naming_the_field_and_changes_nothing(db: Db) {
    let server = TestServer::start(db).await;
    let mut jobs = server.jobs().await;
    let mut runner = server.runner("r", &[], 1).await;
    let a = running(&mut jobs, &mut runner, sh("true")).await;
    let mut work = server.work(&a.work_token).await;
    let before = jobs
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .jobs
        .len();
    let unknown = digest(b"never uploaded");
    let with_input = |path: &str, source: pb::input::Source| pb::JobSpec {
        inputs: vec![pb::Input {
            path: path.into(),
            source: Some(source),
        }],
        ..sh("true")
    };
    let cases = [
        (
            with_input("in/x", pb::input::Source::BlobDigest(unknown.clone())),
            "spec.inputs[0].blob_digest",
        ),
        (
            with_input("in/x", pb::input::Source::BlobDigest("md5:abc".into())),
            "spec.inputs[0].blob_digest",
        ),
        (
            with_input("../x", pb::input::Source::BlobDigest(unknown.clone())),
            "spec.inputs[0].path",
        ),
        (
            with_input("/etc/x", pb::input::Source::BlobDigest(unknown.clone())),
            "spec.inputs[0].path",
        ),
        (
            pb::JobSpec {
                artifacts: vec!["out".into(), "a/../../x".into()],
                ..sh("true")
            },
            "spec.artifacts[1]",
        ),
        (
            pb::JobSpec {
                artifacts: vec!["/abs".into()],
                ..sh("true")
            },
            "spec.artifacts[0]",
        ),
    ];
    for (spec, field) in cases {
        let (c, m) = code(
            jobs.submit_job(pb::SubmitJobRequest {
                spec: Some(spec.clone()),
            })
            .await,
        );
        assert_eq!(c, Code::InvalidArgument, "{field}: {m}");
        assert!(m.contains(field), "{field}: {m}");
        let (c, m) = code(
            work.submit_child(pb::SubmitChildRequest {
                job_id: a.job_id.clone(),
                spec: Some(spec),
            })
            .await,
        );
        assert_eq!(c, Code::InvalidArgument, "child {field}: {m}");
    }
    for name in ["../x", "/abs", "a/./b", ""] {
        let (c, m) = code(upload_artifact(&mut work, &a.job_id, name, b"x").await);
        assert_eq!(c, Code::InvalidArgument, "{name:?}: {m}");
        assert!(m.contains("header.name"), "{m}");
    }
    let (c, m) = code(
        work.set_result(pb::SetResultRequest {
            job_id: a.job_id.clone(),
            result: Some(pb::JobResult {
                data: vec![0; (1 << 20) + 1],
                ..Default::default()
            }),
        })
        .await,
    );
    assert_eq!(c, Code::InvalidArgument, "{m}");
    assert!(
        m.contains("result.data") && m.contains("--max-result-bytes"),
        "{m}"
    );
    let (c, m) = code(
        work.report_progress(pb::ReportProgressRequest {
            job_id: a.job_id.clone(),
            progress: Some(pb::Progress {
                percent: 101,
                ..Default::default()
            }),
        })
        .await,
    );
    assert_eq!(c, Code::InvalidArgument, "{m}");
    assert!(m.contains("progress.percent"), "{m}");
    let (c, m) = code(
        work.append_event(pb::AppendEventRequest {
            job_id: a.job_id.clone(),
            event: Some(pb::WorkEvent {
                kind: "has space".into(),
                ..Default::default()
            }),
        })
        .await,
    );
    assert_eq!(c, Code::InvalidArgument, "{m}");
    assert!(m.contains("event.kind"), "{m}");
    let (c, _) = code(
        jobs.download_blob(pb::DownloadBlobRequest {
            digest: unknown.clone(),
        })
        .await,
    );
    assert_eq!(c, Code::NotFound);

    // Nothing changed.
    let job = get(&mut jobs, &a.job_id).await;
    assert!(job.result.is_none());
    assert!(job.progress.is_none());
    assert!(artifacts(&mut jobs, &a.job_id).await.is_empty());
    let after = jobs
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .jobs
        .len();
    assert_eq!(after, before);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_in_an_s3_compatible_store() {
    let Some(s3) = S3::from_env() else { return };
    let server = TestServer::start_with(Db::Sqlite, |c| s3.configure(c)).await;
    artifacts_scenario(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_stored_through_one_replica_downloads_through_another() {
    let (Some(db), Some(s3)) = (Db::postgres(), S3::from_env()) else {
        return;
    };
    let server = TestServer::start_with(db, |c| s3.configure(c)).await;
    let replica = server.replica().await;
    let mut jobs = server.jobs().await;
    let mut runner = server.runner("r", &[], 1).await;
    let a = running(&mut jobs, &mut runner, sh("true")).await;
    let data: Vec<u8> = (0..6_000_000u32).map(|i| (i % 253) as u8).collect();
    upload_artifact(
        &mut server.work(&a.work_token).await,
        &a.job_id,
        "model.bin",
        &data,
    )
    .await
    .expect("upload through the first replica");
    let mut other = pb::job_service_client::JobServiceClient::with_interceptor(
        channel(&format!("http://{}", replica.addr)).await,
        Bearer::new(&server.api_token),
    );
    let got = download_artifact(&mut other, &a.job_id, "model.bin")
        .await
        .expect("download through the second replica");
    assert_eq!(digest(&got), digest(&data));
    replica.shutdown().await.expect("replica stops");
    server.stop().await;
}

/// Retention's blob rule: an upload nothing names goes `--blob-grace-seconds` after it was
/// last used; an artifact's blob stays while its job does, and goes once retention deleted
/// the job (the reaper runs every 50 ms in the tests).
async fn retention_removes_blobs_nothing_names_and_keeps_the_rest(db: Db) {
    let server = TestServer::start_with(db, |c| {
        c.blob_grace_seconds = 1;
        c.retention_seconds = 0;
    })
    .await;
    let mut jobs = server.jobs().await;
    let mut runner = server.runner("r", &[], 1).await;
    let unused = upload_blob(&mut jobs, b"uploaded, never used")
        .await
        .expect("blob");
    let named = upload_blob(&mut jobs, b"named by a waiting job's input")
        .await
        .expect("blob");
    // Named at once (the grace is 1 s): a queued job keeps it.
    let waiting = submit(
        &mut jobs,
        pb::JobSpec {
            inputs: vec![pb::Input {
                path: "in".into(),
                source: Some(pb::input::Source::BlobDigest(named.digest.clone())),
            }],
            // No runner here carries it: the job waits.
            labels: [("pool".to_string(), "elsewhere".to_string())].into(),
            ..sh("true")
        },
    )
    .await;

    let a = running(&mut jobs, &mut runner, sh("true")).await;
    let kept = upload_artifact(
        &mut server.work(&a.work_token).await,
        &a.job_id,
        "kept.txt",
        b"an artifact's bytes",
    )
    .await
    .expect("artifact")
    .blob
    .expect("blob");
    runner
        .report(&a, status(JobStatus::Succeeded))
        .await
        .expect("done");
    let reader = jobs.clone();
    let download = move |digest: String| {
        let mut jobs = reader.clone();
        async move {
            match jobs.download_blob(pb::DownloadBlobRequest { digest }).await {
                Ok(s) => collect(s.into_inner()).await.map(|_| ()),
                Err(e) => Err(e),
            }
        }
    };
    eventually("the unused blob is removed", || {
        let d = download(unused.digest.clone());
        async move { matches!(d.await, Err(s) if s.code() == Code::NotFound).then_some(()) }
    })
    .await;
    if let Some(dir) = server.blob_dir() {
        let hex = unused.digest.trim_start_matches("sha256:");
        assert!(
            !files_under(&dir.join("blobs"))
                .iter()
                .any(|p| p.ends_with(hex)),
            "its bytes are gone too"
        );
    }
    // A blob a job's input names outlives the grace while that job exists.
    assert!(!waiting.is_empty());
    download(named.digest.clone())
        .await
        .expect("a blob a job's input names stays");
    // The artifact's blob outlived the grace: its job still names it.
    download(kept.digest.clone())
        .await
        .expect("an artifact's blob stays while its job does");
    assert_eq!(
        download_artifact(&mut jobs, &a.job_id, "kept.txt")
            .await
            .expect("download"),
        b"an artifact's bytes"
    );
    // Retention deletes the job (now past a 1 s retention), its artifact, then the blob.
    let mut server = server;
    server.config.retention_seconds = 1;
    server.restart().await;
    let mut jobs = server.jobs().await;
    eventually("retention deletes the job and then its blob", || {
        let mut jobs = jobs.clone();
        let d = download(kept.digest.clone());
        let id = a.job_id.clone();
        async move {
            let job_gone = matches!(
                jobs.get_job(pb::GetJobRequest { job_id: id }).await,
                Err(s) if s.code() == Code::NotFound
            );
            let blob_gone = matches!(d.await, Err(s) if s.code() == Code::NotFound);
            (job_gone && blob_gone).then_some(())
        }
    })
    .await;
    let (c, _) = code(
        jobs.list_artifacts(pb::ListArtifactsRequest {
            job_id: a.job_id.clone(),
        })
        .await,
    );
    assert_eq!(c, Code::NotFound);
    server.stop().await;
}
