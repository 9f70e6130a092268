//! `gantry.v1.JobService`.
use gantry_proto as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::STREAM_BUFFER;
use crate::{
    App,
    jobs::{self, parse_id},
};

/// JobService over the shared application state.
pub struct JobApi(pub App);

#[tonic::async_trait]
impl pb::job_service_server::JobService for JobApi {
    async fn submit_job(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        self.0.auth.client(request.metadata())?;
        let req = request.into_inner();
        Ok(Response::new(jobs::submit(&self.0, req.spec).await?))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        self.0.auth.client(request.metadata())?;
        let id = parse_id("job_id", &request.get_ref().job_id)?;
        Ok(Response::new(jobs::get(&self.0, id).await?))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        self.0.auth.client(request.metadata())?;
        Ok(Response::new(
            jobs::list(&self.0, request.into_inner()).await?,
        ))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        self.0.auth.client(request.metadata())?;
        let req = request.into_inner();
        let id = parse_id("job_id", &req.job_id)?;
        let job = jobs::cancel(&self.0, id, &req.reason).await?;
        Ok(Response::new(pb::CancelJobResponse { job: Some(job) }))
    }

    async fn retry_job(
        &self,
        request: Request<pb::RetryJobRequest>,
    ) -> Result<Response<pb::RetryJobResponse>, Status> {
        self.0.auth.client(request.metadata())?;
        let id = parse_id("job_id", &request.get_ref().job_id)?;
        let job = jobs::retry(&self.0, id).await?;
        Ok(Response::new(pb::RetryJobResponse { job: Some(job) }))
    }

    type WatchJobStream = ReceiverStream<Result<pb::JobEvent, Status>>;

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        self.0.auth.client(request.metadata())?;
        let req = request.into_inner();
        let id = parse_id("job_id", &req.job_id)?;
        // Unknown jobs fail the call itself rather than the first message.
        jobs::get(&self.0, id).await?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(jobs::watch(self.0.clone(), req, id, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type GetLogsStream = ReceiverStream<Result<pb::LogChunk, Status>>;

    async fn get_logs(
        &self,
        request: Request<pb::GetLogsRequest>,
    ) -> Result<Response<Self::GetLogsStream>, Status> {
        self.0.auth.client(request.metadata())?;
        let req = request.into_inner();
        let id = parse_id("job_id", &req.job_id)?;
        if pb::LogStream::try_from(req.stream).is_err() {
            return Err(crate::error::Error::invalid(
                "stream",
                format!("unknown log stream {}", req.stream),
            )
            .into());
        }
        let job = jobs::get(&self.0, id).await?;
        if req.attempt > job.attempt_count {
            return Err(crate::error::Error::invalid(
                "attempt",
                format!("job {id} has {} attempt(s)", job.attempt_count),
            )
            .into());
        }
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(jobs::logs(self.0.clone(), req, id, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
