//! `gantry.v1.AdminService`.
use gantry_proto as pb;
use tonic::{Request, Response, Status};

use crate::{App, jobs::parse_id, runners, stats};

/// AdminService over the shared application state.
pub struct AdminApi(pub App);

impl AdminApi {
    async fn authenticate<T>(&self, request: &Request<T>) -> Result<(), Status> {
        super::client(&self.0, request, "AdminService").await
    }
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminApi {
    async fn list_runners(
        &self,
        request: Request<pb::ListRunnersRequest>,
    ) -> Result<Response<pb::ListRunnersResponse>, Status> {
        self.authenticate(&request).await?;
        Ok(Response::new(
            runners::list(self.0.env.store.db(), request.into_inner()).await?,
        ))
    }

    async fn get_runner(
        &self,
        request: Request<pb::GetRunnerRequest>,
    ) -> Result<Response<pb::Runner>, Status> {
        self.authenticate(&request).await?;
        let id = parse_id("runner_id", &request.get_ref().runner_id)?;
        Ok(Response::new(
            runners::get(self.0.env.store.db(), id).await?,
        ))
    }

    async fn drain_runner(
        &self,
        request: Request<pb::DrainRunnerRequest>,
    ) -> Result<Response<pb::Runner>, Status> {
        self.authenticate(&request).await?;
        let req = request.into_inner();
        let id = parse_id("runner_id", &req.runner_id)?;
        Ok(Response::new(
            runners::drain(&self.0.env, id, &req.reason).await?,
        ))
    }

    async fn get_stats(
        &self,
        request: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::GetStatsResponse>, Status> {
        self.authenticate(&request).await?;
        Ok(Response::new(stats::stats(self.0.env.store.db()).await?))
    }
}
