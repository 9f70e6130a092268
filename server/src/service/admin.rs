//! `gantry.v1.AdminService`.
use gantry_proto as pb;
use tonic::{Request, Response, Status};

use crate::{App, jobs::parse_id, runners};

/// AdminService over the shared application state.
pub struct AdminApi(pub App);

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminApi {
    async fn list_runners(
        &self,
        request: Request<pb::ListRunnersRequest>,
    ) -> Result<Response<pb::ListRunnersResponse>, Status> {
        self.0.auth.client(request.metadata())?;
        Ok(Response::new(
            runners::list(&self.0, request.into_inner()).await?,
        ))
    }

    async fn get_runner(
        &self,
        request: Request<pb::GetRunnerRequest>,
    ) -> Result<Response<pb::Runner>, Status> {
        self.0.auth.client(request.metadata())?;
        let id = parse_id("runner_id", &request.get_ref().runner_id)?;
        Ok(Response::new(runners::get(&self.0, id).await?))
    }

    async fn drain_runner(
        &self,
        request: Request<pb::DrainRunnerRequest>,
    ) -> Result<Response<pb::Runner>, Status> {
        self.0.auth.client(request.metadata())?;
        let req = request.into_inner();
        let id = parse_id("runner_id", &req.runner_id)?;
        Ok(Response::new(
            runners::drain(&self.0, id, &req.reason).await?,
        ))
    }

    async fn get_stats(
        &self,
        request: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::GetStatsResponse>, Status> {
        self.0.auth.client(request.metadata())?;
        Ok(Response::new(runners::stats(&self.0).await?))
    }
}
