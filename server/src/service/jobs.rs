//! `gantry.v1.JobService`.
use gantry_proto as pb;
use tonic::{Request, Response, Status};

use super::streams::{self, Stream, stream};
use crate::{
    App,
    error::Error,
    jobs::{self, parse_id},
    work::artifacts,
};

/// JobService over the shared application state.
pub struct JobApi(pub App);

impl JobApi {
    async fn authenticate<T>(&self, request: &Request<T>) -> Result<(), Status> {
        super::client(&self.0, request, "JobService").await
    }
}

#[tonic::async_trait]
impl pb::job_service_server::JobService for JobApi {
    async fn submit_job(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        self.authenticate(&request).await?;
        let app = &self.0;
        let spec = request.into_inner().spec;
        Ok(Response::new(
            jobs::submit(
                app.env.store.db(),
                &app.submitter,
                app.config.default_timeout_seconds,
                spec,
            )
            .await?,
        ))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        self.authenticate(&request).await?;
        let id = parse_id("job_id", &request.get_ref().job_id)?;
        Ok(Response::new(jobs::get(self.0.env.store.db(), id).await?))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        self.authenticate(&request).await?;
        Ok(Response::new(
            jobs::list(self.0.env.store.db(), request.into_inner()).await?,
        ))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        self.authenticate(&request).await?;
        let req = request.into_inner();
        let id = parse_id("job_id", &req.job_id)?;
        let job = jobs::cancel(&self.0.env, id, &req.reason).await?;
        Ok(Response::new(pb::CancelJobResponse { job: Some(job) }))
    }

    async fn retry_job(
        &self,
        request: Request<pb::RetryJobRequest>,
    ) -> Result<Response<pb::RetryJobResponse>, Status> {
        self.authenticate(&request).await?;
        let app = &self.0;
        let id = parse_id("job_id", &request.get_ref().job_id)?;
        let job = jobs::retry(
            app.env.store.db(),
            &app.submitter,
            app.config.default_timeout_seconds,
            id,
        )
        .await?;
        Ok(Response::new(pb::RetryJobResponse { job: Some(job) }))
    }

    type WatchJobStream = Stream<pb::JobEvent>;

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        self.authenticate(&request).await?;
        let req = request.into_inner();
        let id = parse_id("job_id", &req.job_id)?;
        // Unknown jobs fail the call itself rather than the first message.
        jobs::get(self.0.env.store.db(), id).await?;
        Ok(Response::new(stream(jobs::watch::follow(
            self.0.follow(),
            req,
            id,
        ))))
    }

    type GetLogsStream = Stream<pb::LogChunk>;

    async fn get_logs(
        &self,
        request: Request<pb::GetLogsRequest>,
    ) -> Result<Response<Self::GetLogsStream>, Status> {
        self.authenticate(&request).await?;
        let req = request.into_inner();
        let id = parse_id("job_id", &req.job_id)?;
        if pb::LogStream::try_from(req.stream).is_err() {
            return Err(
                Error::invalid("stream", format!("unknown log stream {}", req.stream)).into(),
            );
        }
        let job = jobs::get(self.0.env.store.db(), id).await?;
        if req.attempt > job.attempt_count {
            return Err(Error::invalid(
                "attempt",
                format!("job {id} has {} attempt(s)", job.attempt_count),
            )
            .into());
        }
        Ok(Response::new(stream(jobs::output::follow(
            self.0.follow(),
            req,
            id,
        ))))
    }

    async fn list_artifacts(
        &self,
        request: Request<pb::ListArtifactsRequest>,
    ) -> Result<Response<pb::ListArtifactsResponse>, Status> {
        self.authenticate(&request).await?;
        Ok(Response::new(
            artifacts::list(self.0.env.store.db(), &request.get_ref().job_id).await?,
        ))
    }

    type DownloadArtifactStream = Stream<pb::BlobChunk>;

    async fn download_artifact(
        &self,
        request: Request<pb::DownloadArtifactRequest>,
    ) -> Result<Response<Self::DownloadArtifactStream>, Status> {
        self.authenticate(&request).await?;
        let app = &self.0;
        let s = artifacts::download(app.env.store.db(), &app.blobs, request.into_inner()).await?;
        Ok(Response::new(streams::chunks(s)))
    }

    async fn upload_blob(
        &self,
        request: Request<tonic::Streaming<pb::UploadBlobRequest>>,
    ) -> Result<Response<pb::UploadBlobResponse>, Status> {
        self.authenticate(&request).await?;
        let app = &self.0;
        let (header, data) = streams::header_then_data(request.into_inner(), blob_part).await?;
        let blob =
            artifacts::upload_blob(&app.env, &app.blobs, app.config.data_limits(), header, data)
                .await?;
        Ok(Response::new(pb::UploadBlobResponse { blob: Some(blob) }))
    }

    type DownloadBlobStream = Stream<pb::BlobChunk>;

    async fn download_blob(
        &self,
        request: Request<pb::DownloadBlobRequest>,
    ) -> Result<Response<Self::DownloadBlobStream>, Status> {
        self.authenticate(&request).await?;
        let app = &self.0;
        let s = artifacts::download_blob(app.env.store.db(), &app.blobs, &request.get_ref().digest)
            .await?;
        Ok(Response::new(streams::chunks(s)))
    }
}

fn blob_part(m: pb::UploadBlobRequest) -> streams::Part<pb::BlobHeader> {
    match m.part {
        Some(pb::upload_blob_request::Part::Header(h)) => streams::Part::Header(h),
        Some(pb::upload_blob_request::Part::Data(d)) => streams::Part::Data(d),
        None => streams::Part::Empty,
    }
}
