//! `gantry.v1.JobService`.
use gantry_proto as pb;
use tokio_stream::{StreamExt as _, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};

use crate::{
    App,
    error::Error,
    jobs::{self, parse_id},
};

/// JobService over the shared application state.
pub struct JobApi(pub App);

/// A domain stream as the protocol sends it.
pub(super) type Stream<T> =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

pub(super) fn stream<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<Result<T, Error>>,
) -> Stream<T> {
    Box::pin(ReceiverStream::new(rx).map(|r| r.map_err(Status::from)))
}

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
            jobs::submit(&app.submitter, app.config.default_timeout_seconds, spec).await?,
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
}
