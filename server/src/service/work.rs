//! `gantry.v1.WorkService`: called by the code inside a job or sandbox (through its runner's
//! relay, or directly) with its work token. See `work.proto`.
use gantry_proto as pb;
use tonic::{Request, Response, Status, Streaming};

use super::streams::{Part, Stream, chunks, header_then_data};
use crate::{App, work};

/// WorkService over the shared application state.
pub struct WorkApi(pub App);

/// The work token of a call (UNAUTHENTICATED when there is none).
fn token<T>(request: &Request<T>) -> Result<String, Status> {
    Ok(crate::auth::token(super::authorization(request.metadata()))?.to_string())
}

fn artifact_part(m: pb::UploadArtifactRequest) -> Part<pb::ArtifactHeader> {
    match m.part {
        Some(pb::upload_artifact_request::Part::Header(h)) => Part::Header(h),
        Some(pb::upload_artifact_request::Part::Data(d)) => Part::Data(d),
        None => Part::Empty,
    }
}

#[tonic::async_trait]
impl pb::work_service_server::WorkService for WorkApi {
    async fn report_progress(
        &self,
        request: Request<pb::ReportProgressRequest>,
    ) -> Result<Response<pb::ReportProgressResponse>, Status> {
        let token = token(&request)?;
        work::report_progress(&self.0.env, &token, request.into_inner()).await?;
        Ok(Response::new(pb::ReportProgressResponse {}))
    }

    async fn append_event(
        &self,
        request: Request<pb::AppendEventRequest>,
    ) -> Result<Response<pb::AppendEventResponse>, Status> {
        let token = token(&request)?;
        let sequence = work::append_event(&self.0.env, &token, request.into_inner()).await?;
        Ok(Response::new(pb::AppendEventResponse { sequence }))
    }

    async fn set_result(
        &self,
        request: Request<pb::SetResultRequest>,
    ) -> Result<Response<pb::SetResultResponse>, Status> {
        let token = token(&request)?;
        let app = &self.0;
        work::set_result(
            &app.env,
            app.config.max_result_bytes,
            &token,
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(pb::SetResultResponse {}))
    }

    async fn upload_artifact(
        &self,
        request: Request<Streaming<pb::UploadArtifactRequest>>,
    ) -> Result<Response<pb::UploadArtifactResponse>, Status> {
        let token = token(&request)?;
        let app = &self.0;
        let (header, data) = header_then_data(request.into_inner(), artifact_part).await?;
        let artifact = work::artifacts::upload_artifact(
            &app.env,
            &app.blobs,
            app.config.data_limits(),
            &token,
            header,
            data,
        )
        .await?;
        Ok(Response::new(pb::UploadArtifactResponse {
            artifact: Some(artifact),
        }))
    }

    async fn list_inputs(
        &self,
        request: Request<pb::ListInputsRequest>,
    ) -> Result<Response<pb::ListInputsResponse>, Status> {
        let token = token(&request)?;
        let job_id = request.into_inner().job_id;
        Ok(Response::new(
            work::artifacts::list_inputs(&self.0.env, &token, &job_id).await?,
        ))
    }

    type ReadInputStream = Stream<pb::BlobChunk>;

    async fn read_input(
        &self,
        request: Request<pb::ReadInputRequest>,
    ) -> Result<Response<Self::ReadInputStream>, Status> {
        let token = token(&request)?;
        let app = &self.0;
        let s =
            work::artifacts::read_input(&app.env, &app.blobs, &token, request.into_inner()).await?;
        Ok(Response::new(chunks(s)))
    }

    async fn submit_child(
        &self,
        request: Request<pb::SubmitChildRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let token = token(&request)?;
        let app = &self.0;
        Ok(Response::new(
            work::submit_child(
                &app.env,
                &app.submitter,
                app.config.default_timeout_seconds,
                &token,
                request.into_inner(),
            )
            .await?,
        ))
    }
}
