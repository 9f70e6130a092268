//! Data in and out of work, at the protocol: uploading and downloading artifacts and blobs,
//! digests, and the S3-compatible store the storage tests also run against.
use gantry_proto as pb;
use pb::{job_service_client::JobServiceClient, work_service_client::WorkServiceClient};
use sha2::{Digest, Sha256};
use tokio_stream::StreamExt;
use tonic::Status;

use crate::Authed;

/// `sha256:<hex>` of `data`.
pub fn digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// An S3-compatible server the test script started (moto's server mode) and a bucket on it.
#[derive(Clone, Debug)]
pub struct S3 {
    pub endpoint: String,
    pub bucket: String,
}

impl S3 {
    /// The test script's S3 server, or `None` after saying loudly why the test does not run
    /// on it (a failure when the full suite runs).
    pub fn from_env() -> Option<S3> {
        match (
            std::env::var("GANTRY_TEST_S3_ENDPOINT"),
            std::env::var("GANTRY_TEST_S3_BUCKET"),
        ) {
            (Ok(endpoint), Ok(bucket)) if !endpoint.is_empty() && !bucket.is_empty() => {
                Some(S3 { endpoint, bucket })
            }
            _ => {
                let msg = "no S3-compatible server: GANTRY_TEST_S3_ENDPOINT/GANTRY_TEST_S3_BUCKET \
                           are unset. Run scripts/test.sh, which starts moto's server and sets them.";
                if std::env::var("GANTRY_TEST_REQUIRE_ALL").as_deref() == Ok("1") {
                    panic!("{msg}");
                }
                eprintln!("\n!!!!!!!!!! NOT RUN ON S3 !!!!!!!!!!\n{msg}\n");
                None
            }
        }
    }

    /// Points a server configuration at this bucket.
    pub fn configure(&self, config: &mut gantry_server::Config) {
        config.s3_bucket = Some(self.bucket.clone());
        config.s3_endpoint = self.endpoint.clone();
        config.s3_region = "us-east-1".into();
        config.s3_access_key_id = "testing".into();
        config.s3_secret_access_key = "testing".into();
    }

    /// The same as server flags.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--s3-bucket".into(),
            self.bucket.clone(),
            "--s3-endpoint".into(),
            self.endpoint.clone(),
            "--s3-access-key-id".into(),
            "testing".into(),
            "--s3-secret-access-key".into(),
            "testing".into(),
        ]
    }
}

/// The messages of an artifact upload: the header (with the size), then `data` in pieces.
pub fn artifact_messages(
    job_id: &str,
    name: &str,
    data: &[u8],
    piece: usize,
) -> Vec<pb::UploadArtifactRequest> {
    let mut messages = vec![pb::UploadArtifactRequest {
        part: Some(pb::upload_artifact_request::Part::Header(
            pb::ArtifactHeader {
                job_id: job_id.into(),
                name: name.into(),
                size: Some(data.len() as u64),
                digest: String::new(),
            },
        )),
    }];
    messages.extend(
        data.chunks(piece.max(1))
            .map(|c| pb::UploadArtifactRequest {
                part: Some(pb::upload_artifact_request::Part::Data(c.to_vec())),
            }),
    );
    messages
}

/// Uploads `data` as artifact `name` of `job_id` through WorkService.
pub async fn upload_artifact(
    work: &mut WorkServiceClient<Authed>,
    job_id: &str,
    name: &str,
    data: &[u8],
) -> Result<pb::Artifact, Status> {
    let messages = artifact_messages(job_id, name, data, 256 * 1024);
    work.upload_artifact(tokio_stream::iter(messages))
        .await
        .map(|r| r.into_inner().artifact.expect("artifact"))
}

/// Uploads `data` as a blob through JobService.
pub async fn upload_blob(
    jobs: &mut JobServiceClient<Authed>,
    data: &[u8],
) -> Result<pb::Blob, Status> {
    let mut messages = vec![pb::UploadBlobRequest {
        part: Some(pb::upload_blob_request::Part::Header(pb::BlobHeader {
            size: Some(data.len() as u64),
            digest: String::new(),
        })),
    }];
    messages.extend(data.chunks(256 * 1024).map(|c| pb::UploadBlobRequest {
        part: Some(pb::upload_blob_request::Part::Data(c.to_vec())),
    }));
    jobs.upload_blob(tokio_stream::iter(messages))
        .await
        .map(|r| r.into_inner().blob.expect("blob"))
}

/// Reads a stream of blob chunks whole, checking that the offsets are contiguous.
pub async fn collect(mut chunks: tonic::Streaming<pb::BlobChunk>) -> Result<Vec<u8>, Status> {
    let mut out = Vec::new();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        assert_eq!(chunk.offset, out.len() as u64, "chunks are contiguous");
        assert!(chunk.data.len() <= 1 << 20, "a chunk is at most 1 MiB");
        out.extend_from_slice(&chunk.data);
    }
    Ok(out)
}

/// The bytes of artifact `name` of `job_id`.
pub async fn download_artifact(
    jobs: &mut JobServiceClient<Authed>,
    job_id: &str,
    name: &str,
) -> Result<Vec<u8>, Status> {
    let chunks = jobs
        .download_artifact(pb::DownloadArtifactRequest {
            job_id: job_id.into(),
            name: name.into(),
        })
        .await?
        .into_inner();
    collect(chunks).await
}

/// The artifacts of `job_id`, by name.
pub async fn artifacts(jobs: &mut JobServiceClient<Authed>, job_id: &str) -> Vec<pb::Artifact> {
    jobs.list_artifacts(pb::ListArtifactsRequest {
        job_id: job_id.into(),
    })
    .await
    .expect("list artifacts")
    .into_inner()
    .artifacts
}
