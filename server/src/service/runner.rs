//! `gantry.v1.RunnerService`.
use std::time::Duration;

use gantry_proto as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use uuid::Uuid;

use super::{authorization, session, status};
use crate::{
    App,
    auth::Auth,
    commands, dispatch,
    error::Error,
    leases,
    reports::{Batch, Rejection},
    runners,
    runners::heartbeats::Beat,
};

/// Most reports one ReportEvents call may carry.
pub const MAX_REPORTS_PER_CALL: usize = 100_000;
/// Reports handed to the ingester at a time within one call…
const REPORT_CHUNK: usize = 512;
/// …or fewer, once they carry this many log bytes (bounds the memory one call holds).
const REPORT_CHUNK_BYTES: usize = 4 * 1024 * 1024;
/// Longest long-poll, seconds.
const MAX_WAIT_SECONDS: u32 = 60;

/// RunnerService over the shared application state.
pub struct RunnerApi(pub App);

fn wait(field: &str, seconds: u32) -> Result<Duration, Error> {
    if seconds > MAX_WAIT_SECONDS {
        return Err(Error::invalid(
            field,
            format!("must be within 0..={MAX_WAIT_SECONDS}"),
        ));
    }
    Ok(Duration::from_secs(u64::from(seconds)))
}

/// A refused report as the status that ends a unary call.
pub fn rejection_status(r: Rejection) -> Status {
    let code = status::code(&r.error);
    Status::new(
        code,
        format!(
            "report {} of job {} lease {}: {}",
            r.sequence, r.job_id, r.lease_id, r.error
        ),
    )
}

impl RunnerApi {
    /// The calling runner.
    async fn runner<T>(&self, request: &Request<T>) -> Result<Uuid, Status> {
        let app = &self.0;
        Ok(app
            .auth
            .runner(&app.env.store, authorization(request.metadata()))
            .await?)
    }

    /// A domain answer for `runner`; a runner found revoked or gone is forgotten by the
    /// credential cache, so its next call is refused at once.
    fn answer<T>(&self, runner: Uuid, result: Result<T, Error>) -> Result<T, Status> {
        if let Err(Error::Unauthenticated(_)) = &result {
            self.0.auth.forget(runner);
        }
        result.map_err(Status::from)
    }
}

#[tonic::async_trait]
impl pb::runner_service_server::RunnerService for RunnerApi {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let app = &self.0;
        app.auth
            .registration(&app.env.store, authorization(request.metadata()))
            .await?;
        let id = Uuid::now_v7();
        let (credential, credential_hash) = Auth::issue_credential(id);
        runners::register(
            &app.env.store,
            app.env.clock.now_ms(),
            id,
            credential_hash,
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(pb::RegisterResponse {
            runner_id: id.to_string(),
            credential,
            lease_seconds: app.config.lease_seconds,
            heartbeat_interval_seconds: app.heartbeat_seconds(),
            heartbeat_interval_ms: app.heartbeat_ms(),
            lease_ms: app.lease_ms_u32(),
            limits: Some(app.limits()),
        }))
    }

    async fn claim(
        &self,
        request: Request<pb::ClaimRequest>,
    ) -> Result<Response<pb::ClaimResponse>, Status> {
        let runner = self.runner(&request).await?;
        let req = request.into_inner();
        let max = match req.max_jobs {
            0 => 1,
            n @ 1..=256 => n as usize,
            _ => return Err(Error::invalid("max_jobs", "must be within 0..=256").into()),
        };
        let wait = wait("wait_seconds", req.wait_seconds)?;
        let app = &self.0;
        let assignments = dispatch::claim_wait(
            &app.claimer,
            &app.env.hub,
            app.shutdown.clone(),
            runner,
            max,
            wait,
        )
        .await;
        let assignments = self.answer(runner, assignments)?;
        Ok(Response::new(pb::ClaimResponse { assignments }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let runner = self.runner(&request).await?;
        let held = leases::parse_held("held", &request.get_ref().held)?;
        let app = &self.0;
        let beaten = self.answer(runner, app.heartbeats.call(Beat { runner, held }).await)?;
        let commands =
            commands::pending(app.env.store.db(), runner, beaten.acked_command_seq).await?;
        Ok(Response::new(pb::HeartbeatResponse {
            lease_expires_at_unix_ms: beaten.until,
            commands,
            revoked: beaten.revoked,
            state: beaten.state,
        }))
    }

    async fn report_events(
        &self,
        request: Request<Streaming<pb::Report>>,
    ) -> Result<Response<pb::ReportEventsResponse>, Status> {
        let runner = self.runner(&request).await?;
        let mut stream = request.into_inner();
        let mut acks = std::collections::BTreeMap::new();
        let mut pending = Vec::new();
        let mut pending_bytes = 0usize;
        let mut total = 0usize;
        loop {
            let next = match stream.message().await {
                Ok(next) => next,
                Err(broken) => return Err(status::inbound(&broken).unwrap_or(broken)),
            };
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
                let batch = Batch {
                    runner,
                    reports: std::mem::take(&mut pending),
                    stop_at_first: true,
                };
                let outcome = self.answer(runner, self.0.ingester.call(batch).await)?;
                for ack in outcome.acks {
                    acks.insert((ack.job_id.clone(), ack.lease_id.clone()), ack);
                }
                if let Some(r) = outcome.rejected.into_iter().next() {
                    return Err(rejection_status(r));
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
        let runner = self.runner(&request).await?;
        let req = request.into_inner();
        let wait = wait("wait_seconds", req.wait_seconds)?;
        let app = &self.0;
        let commands = commands::poll(
            app.env.store.db(),
            &app.env.hub,
            app.shutdown.clone(),
            runner,
            req.after_sequence,
            wait,
        )
        .await;
        Ok(Response::new(pb::PollCommandsResponse {
            commands: self.answer(runner, commands)?,
        }))
    }

    async fn ack_command(
        &self,
        request: Request<pb::AckCommandRequest>,
    ) -> Result<Response<pb::AckCommandResponse>, Status> {
        let runner = self.runner(&request).await?;
        let acked = commands::ack(&self.0.env.store, runner, request.get_ref().sequence).await;
        self.answer(runner, acked)?;
        Ok(Response::new(pb::AckCommandResponse {}))
    }

    async fn deregister(
        &self,
        request: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        let runner = self.runner(&request).await?;
        let released = runners::deregister(&self.0.env, runner, &request.get_ref().reason).await;
        // Its credential is revoked from now on: forget it, whatever the answer.
        self.0.auth.forget(runner);
        Ok(Response::new(pb::DeregisterResponse {
            released_attempts: released?,
        }))
    }

    type SessionStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::SessionResponse, Status>> + Send>,
    >;

    async fn session(
        &self,
        request: Request<Streaming<pb::SessionRequest>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let runner = self.runner(&request).await?;
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
