//! `gantry.v1.RunnerService`.
use std::time::Duration;

use gantry_proto as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::{App, dispatch, error::Error, leases, runners, session};

/// Most reports one ReportEvents call may carry.
const MAX_REPORTS_PER_CALL: usize = 100_000;
/// Reports handed to the ingester at a time within one call…
const REPORT_CHUNK: usize = 512;
/// …or fewer, once they carry this many log bytes (bounds the memory one call holds).
const REPORT_CHUNK_BYTES: usize = 4 * 1024 * 1024;

/// RunnerService over the shared application state.
pub struct RunnerApi(pub App);

fn wait(field: &str, seconds: u32) -> Result<Duration, Error> {
    if seconds > 60 {
        return Err(Error::invalid(field, "must be within 0..=60"));
    }
    Ok(Duration::from_secs(u64::from(seconds)))
}

#[tonic::async_trait]
impl pb::runner_service_server::RunnerService for RunnerApi {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        self.0.auth.registration(request.metadata())?;
        Ok(Response::new(
            runners::register(&self.0, request.into_inner()).await?,
        ))
    }

    async fn claim(
        &self,
        request: Request<pb::ClaimRequest>,
    ) -> Result<Response<pb::ClaimResponse>, Status> {
        let runner = self
            .0
            .auth
            .runner(&self.0.store, request.metadata())
            .await?;
        let req = request.into_inner();
        let max = match req.max_jobs {
            0 => 1,
            n @ 1..=256 => n as usize,
            _ => return Err(Error::invalid("max_jobs", "must be within 0..=256").into()),
        };
        let wait = wait("wait_seconds", req.wait_seconds)?;
        let assignments = dispatch::claim_wait(&self.0, runner, max, wait).await?;
        Ok(Response::new(pb::ClaimResponse { assignments }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let runner = self
            .0
            .auth
            .runner(&self.0.store, request.metadata())
            .await?;
        let req = request.into_inner();
        Ok(Response::new(
            leases::heartbeat(&self.0, runner, &req.held, leases::Commands::Pending).await?,
        ))
    }

    async fn report_events(
        &self,
        request: Request<Streaming<pb::Report>>,
    ) -> Result<Response<pb::ReportEventsResponse>, Status> {
        let runner = self
            .0
            .auth
            .runner(&self.0.store, request.metadata())
            .await?;
        let mut stream = request.into_inner();
        let mut acks = std::collections::BTreeMap::new();
        let mut pending = Vec::new();
        let mut pending_bytes = 0usize;
        let mut total = 0usize;
        loop {
            let next = stream.message().await?;
            let done = next.is_none();
            if let Some(report) = next {
                total += 1;
                if total > MAX_REPORTS_PER_CALL {
                    return Err(Error::invalid(
                        "reports",
                        format!("at most {MAX_REPORTS_PER_CALL} per call"),
                    )
                    .into());
                }
                if let Some(pb::report::Body::Log(l)) = &report.body {
                    pending_bytes += l.data.len();
                }
                pending.push(report);
            }
            if !pending.is_empty()
                && (done || pending.len() >= REPORT_CHUNK || pending_bytes >= REPORT_CHUNK_BYTES)
            {
                pending_bytes = 0;
                let outcome = self
                    .0
                    .ingester
                    .call((runner, std::mem::take(&mut pending)))
                    .await?;
                for ack in outcome.acks {
                    acks.insert((ack.job_id.clone(), ack.lease_id.clone()), ack);
                }
                if let Some(r) = outcome.rejected.into_iter().next() {
                    return Err(Status::new(
                        r.code,
                        format!(
                            "report on job {} lease {}: {}",
                            r.job_id, r.lease_id, r.message
                        ),
                    ));
                }
            }
            if done {
                break;
            }
        }
        Ok(Response::new(pb::ReportEventsResponse {
            acks: acks.into_values().collect(),
        }))
    }

    async fn poll_commands(
        &self,
        request: Request<pb::PollCommandsRequest>,
    ) -> Result<Response<pb::PollCommandsResponse>, Status> {
        let runner = self
            .0
            .auth
            .runner(&self.0.store, request.metadata())
            .await?;
        let req = request.into_inner();
        let wait = wait("wait_seconds", req.wait_seconds)?;
        let commands = runners::poll_commands(&self.0, runner, req.after_sequence, wait).await?;
        Ok(Response::new(pb::PollCommandsResponse { commands }))
    }

    async fn ack_command(
        &self,
        request: Request<pb::AckCommandRequest>,
    ) -> Result<Response<pb::AckCommandResponse>, Status> {
        let runner = self
            .0
            .auth
            .runner(&self.0.store, request.metadata())
            .await?;
        runners::ack_commands(&self.0, runner, request.get_ref().sequence).await?;
        Ok(Response::new(pb::AckCommandResponse {}))
    }

    async fn deregister(
        &self,
        request: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        let runner = self
            .0
            .auth
            .runner(&self.0.store, request.metadata())
            .await?;
        Ok(Response::new(
            runners::deregister(&self.0, runner, &request.get_ref().reason).await?,
        ))
    }

    type SessionStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::SessionResponse, Status>> + Send>,
    >;

    async fn session(
        &self,
        request: Request<Streaming<pb::SessionRequest>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let runner = self
            .0
            .auth
            .runner(&self.0.store, request.metadata())
            .await?;
        let (tx, rx) = mpsc::channel(session::OUTBOUND_BUFFER);
        tokio::spawn(session::run(
            self.0.clone(),
            runner,
            request.into_inner(),
            tx,
        ));
        let stream = tokio_stream::StreamExt::map(ReceiverStream::new(rx), |r| r.map(|b| *b));
        Ok(Response::new(Box::pin(stream)))
    }
}
