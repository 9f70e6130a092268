//! `gantry.v1.SandboxService`.
use gantry_proto as pb;
use tonic::{Request, Response, Status};

use crate::{
    App,
    error::Error,
    jobs::{self, parse_id},
    sandboxes,
};

use super::streams::{Stream, stream};

/// SandboxService over the shared application state.
pub struct SandboxApi(pub App);

impl SandboxApi {
    async fn authenticate<T>(&self, request: &Request<T>) -> Result<(), Status> {
        super::client(&self.0, request, "SandboxService").await
    }
}

#[tonic::async_trait]
impl pb::sandbox_service_server::SandboxService for SandboxApi {
    async fn create_sandbox(
        &self,
        request: Request<pb::CreateSandboxRequest>,
    ) -> Result<Response<pb::CreateSandboxResponse>, Status> {
        self.authenticate(&request).await?;
        Ok(Response::new(
            sandboxes::create(&self.0.env, request.into_inner()).await?,
        ))
    }

    async fn get_sandbox(
        &self,
        request: Request<pb::GetSandboxRequest>,
    ) -> Result<Response<pb::Sandbox>, Status> {
        self.authenticate(&request).await?;
        let id = parse_id("sandbox_id", &request.get_ref().sandbox_id)?;
        Ok(Response::new(
            sandboxes::get(self.0.env.store.db(), id).await?,
        ))
    }

    async fn list_sandboxes(
        &self,
        request: Request<pb::ListSandboxesRequest>,
    ) -> Result<Response<pb::ListSandboxesResponse>, Status> {
        self.authenticate(&request).await?;
        Ok(Response::new(
            sandboxes::list(self.0.env.store.db(), request.into_inner()).await?,
        ))
    }

    async fn delete_sandbox(
        &self,
        request: Request<pb::DeleteSandboxRequest>,
    ) -> Result<Response<pb::DeleteSandboxResponse>, Status> {
        self.authenticate(&request).await?;
        let req = request.into_inner();
        let id = parse_id("sandbox_id", &req.sandbox_id)?;
        let sandbox = sandboxes::delete(&self.0.env, id, &req.reason).await?;
        Ok(Response::new(pb::DeleteSandboxResponse {
            sandbox: Some(sandbox),
        }))
    }

    type WatchSandboxStream = Stream<pb::JobEvent>;

    async fn watch_sandbox(
        &self,
        request: Request<pb::WatchSandboxRequest>,
    ) -> Result<Response<Self::WatchSandboxStream>, Status> {
        self.authenticate(&request).await?;
        let req = request.into_inner();
        let id = parse_id("sandbox_id", &req.sandbox_id)?;
        // Unknown sandboxes fail the call itself rather than the first message.
        sandboxes::get(self.0.env.store.db(), id).await?;
        let watch = pb::WatchJobRequest {
            job_id: req.sandbox_id,
            after_sequence: req.after_sequence,
            follow: req.follow,
        };
        Ok(Response::new(stream(jobs::watch::follow(
            self.0.follow(),
            watch,
            id,
        ))))
    }

    async fn run_command(
        &self,
        request: Request<pb::RunCommandRequest>,
    ) -> Result<Response<pb::RunCommandResponse>, Status> {
        self.authenticate(&request).await?;
        let app = &self.0;
        Ok(Response::new(
            sandboxes::run_command(&app.commands, app.env.store.db(), request.into_inner()).await?,
        ))
    }

    async fn get_command(
        &self,
        request: Request<pb::GetCommandRequest>,
    ) -> Result<Response<pb::SandboxCommand>, Status> {
        self.authenticate(&request).await?;
        let id = parse_id("command_id", &request.get_ref().command_id)?;
        Ok(Response::new(
            sandboxes::get_command(self.0.env.store.db(), id).await?,
        ))
    }

    async fn list_commands(
        &self,
        request: Request<pb::ListCommandsRequest>,
    ) -> Result<Response<pb::ListCommandsResponse>, Status> {
        self.authenticate(&request).await?;
        Ok(Response::new(
            sandboxes::list_commands(self.0.env.store.db(), request.into_inner()).await?,
        ))
    }

    async fn cancel_sandbox_command(
        &self,
        request: Request<pb::CancelSandboxCommandRequest>,
    ) -> Result<Response<pb::CancelSandboxCommandResponse>, Status> {
        self.authenticate(&request).await?;
        let req = request.into_inner();
        let id = parse_id("command_id", &req.command_id)?;
        let command = sandboxes::cancel_command(&self.0.env, id, &req.reason).await?;
        Ok(Response::new(pb::CancelSandboxCommandResponse {
            command: Some(command),
        }))
    }

    type GetCommandLogsStream = Stream<pb::LogChunk>;

    async fn get_command_logs(
        &self,
        request: Request<pb::GetCommandLogsRequest>,
    ) -> Result<Response<Self::GetCommandLogsStream>, Status> {
        self.authenticate(&request).await?;
        let req = request.into_inner();
        let id = parse_id("command_id", &req.command_id)?;
        if pb::LogStream::try_from(req.stream).is_err() {
            return Err(
                Error::invalid("stream", format!("unknown log stream {}", req.stream)).into(),
            );
        }
        sandboxes::get_command(self.0.env.store.db(), id).await?;
        let logs = pb::GetLogsRequest {
            job_id: req.command_id,
            attempt: 0,
            stream: req.stream,
            stdout_offset: req.stdout_offset,
            stderr_offset: req.stderr_offset,
            follow: req.follow,
        };
        Ok(Response::new(stream(jobs::output::follow(
            self.0.follow(),
            logs,
            id,
        ))))
    }
}
