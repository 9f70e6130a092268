//! `gantry-bench`: how many jobs Gantry moves, how fast a job starts and a cancel lands, how
//! many runner sessions one server holds, how fast logs go in and out, and what the docker
//! executor costs — each next to the raw limit of the same machine, measured in the same run.
//!
//! The server is the real `gantry-server` binary (a SQLite file in WAL mode, or PostgreSQL),
//! driven over real gRPC by simulated runners that speak the real `Session` protocol and
//! complete jobs at once. The docker scenario uses a real `gantry-runner` and the real engine.
//! References: the server's own `grpc.health.v1` unary RPC (raw tonic: rate and round trip)
//! and raw SQLite commits with the server's pragmas.
//!
//! `--quick` runs everything small (well under a minute) so CI can check that the tool works;
//! CI never checks the figures.
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Parser;
use gantry_proto as pb;
use gantry_tests::{
    Bearer, Db, TestDatabase,
    procs::{RunnerProcess, ServerProcess, busybox_image, docker},
};
use pb::{
    job_service_client::JobServiceClient, runner_service_client::RunnerServiceClient,
    session_request::Kind as Out, session_response::Kind as In,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::{StreamExt as _, wrappers::ReceiverStream};
use tonic::{service::interceptor::InterceptedService, transport::Channel};

type Authed = InterceptedService<Channel, Bearer>;

#[derive(Parser, Debug)]
#[command(name = "gantry-bench")]
struct Args {
    /// Everything small: checks that the tool works (CI), not what the figures are.
    #[arg(long)]
    quick: bool,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
    /// No-op jobs in the throughput scenario.
    #[arg(long)]
    jobs: Option<usize>,
    /// Simulated runners in the throughput scenario.
    #[arg(long, default_value_t = 8)]
    runners: usize,
    /// Idle sessions in the sessions scenario.
    #[arg(long)]
    sessions: Option<usize>,
    /// MiB of log output in the log scenario.
    #[arg(long)]
    log_mib: Option<usize>,
    /// PostgreSQL admin URL for the PostgreSQL run (default: GANTRY_TEST_POSTGRES_URL).
    #[arg(long, env = "GANTRY_TEST_POSTGRES_URL")]
    postgres_url: Option<String>,
    /// Skip the docker scenario (and the docker sandbox figures).
    #[arg(long)]
    no_docker: bool,
    /// Skip the sandbox scenario.
    #[arg(long)]
    no_sandboxes: bool,
    /// Run the sandbox scenario only.
    #[arg(long, conflicts_with = "no_sandboxes")]
    sandboxes_only: bool,
    /// How the server's SQLite commits: `full` (the server's default: every acknowledged
    /// commit survives a power loss) or `normal`. The raw SQLite reference commits the same way.
    #[arg(long, value_parser = ["full", "normal"], default_value = "full")]
    sqlite_synchronous: String,
}

/// One measured figure.
struct Figure {
    scenario: &'static str,
    name: String,
    value: f64,
    unit: &'static str,
    reference: Option<(String, f64)>,
    target: &'static str,
}

#[derive(Default)]
struct Report(Vec<Figure>);

impl Report {
    fn add(
        &mut self,
        scenario: &'static str,
        name: impl Into<String>,
        value: f64,
        unit: &'static str,
        target: &'static str,
    ) {
        self.0.push(Figure {
            scenario,
            name: name.into(),
            value,
            unit,
            reference: None,
            target,
        });
    }

    fn add_vs(
        &mut self,
        scenario: &'static str,
        name: impl Into<String>,
        value: f64,
        unit: &'static str,
        reference: (&str, f64),
        target: &'static str,
    ) {
        self.0.push(Figure {
            scenario,
            name: name.into(),
            value,
            unit,
            reference: Some((reference.0.to_string(), reference.1)),
            target,
        });
    }

    fn print(&self) {
        println!(
            "{:<10} {:<34} {:>12} {:<6} {:>8}  {:<34} TARGET",
            "SCENARIO", "FIGURE", "VALUE", "UNIT", "RATIO", "REFERENCE"
        );
        for f in &self.0 {
            let (ratio, reference) = match &f.reference {
                Some((name, v)) if *v > 0.0 => (
                    format!("{:.3}", f.value / v),
                    format!("{name} = {}", fmt(*v)),
                ),
                _ => (String::new(), String::new()),
            };
            println!(
                "{:<10} {:<34} {:>12} {:<6} {:>8}  {:<34} {}",
                f.scenario,
                f.name,
                fmt(f.value),
                f.unit,
                ratio,
                reference,
                f.target
            );
        }
    }

    /// Prints the report as the arguments ask.
    fn finish(&self, args: &Args) {
        if args.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&self.json(machine())).unwrap_or_default()
            );
        } else {
            println!();
            println!("machine: {}", machine());
            self.print();
        }
    }

    fn json(&self, machine: Value) -> Value {
        json!({
            "machine": machine,
            "figures": self.0.iter().map(|f| json!({
                "scenario": f.scenario,
                "name": f.name,
                "value": f.value,
                "unit": f.unit,
                "reference": f.reference.as_ref().map(|(n, v)| json!({"name": n, "value": v})),
                "ratio": f.reference.as_ref().filter(|(_, v)| *v > 0.0).map(|(_, v)| f.value / v),
                "target": f.target,
            })).collect::<Vec<_>>(),
        })
    }
}

fn fmt(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

/// Percentile (0..=100) of sorted samples, in milliseconds.
fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

async fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_string())
        .expect("url")
        .tcp_nodelay(true)
        .connect()
        .await
        .expect("connect to the server")
}

/// What simulated runners saw, keyed by job id.
#[derive(Default)]
struct Seen {
    assigned: Mutex<HashMap<String, (Instant, String)>>,
    canceled: Mutex<HashMap<String, Instant>>,
    finished: AtomicU64,
    notify: tokio::sync::Notify,
}

/// How a simulated runner treats its assignments.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Reports RUNNING and SUCCEEDED at once.
    Complete,
    /// Holds them (until canceled, which it confirms).
    Hold,
}

/// A simulated runner on the real Session protocol (its session lasts as long as this does).
struct SimRunner {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for SimRunner {
    fn drop(&mut self) {
        // Its tasks hold the stream's sender: ending them closes the session.
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn register(
    channel: &Channel,
    reg_token: &str,
    name: &str,
    capacity: u32,
) -> (String, RunnerServiceClient<Authed>) {
    let mut reg = RunnerServiceClient::with_interceptor(channel.clone(), Bearer::new(reg_token));
    let r = reg
        .register(pb::RegisterRequest {
            name: name.into(),
            capacity,
            executors: vec![
                pb::ExecutorKind::Process as i32,
                pb::ExecutorKind::Docker as i32,
            ],
            ..Default::default()
        })
        .await
        .expect("register")
        .into_inner();
    let client = RunnerServiceClient::with_interceptor(channel.clone(), Bearer::new(&r.credential));
    (r.runner_id, client)
}

impl SimRunner {
    async fn start(
        channel: &Channel,
        reg_token: &str,
        name: &str,
        capacity: u32,
        mode: Mode,
        seen: Arc<Seen>,
    ) -> SimRunner {
        let (_, mut client) = register(channel, reg_token, name, capacity).await;
        let (tx, mut inbound) = open_session(&mut client, capacity, 1024).await;
        let out = tx.clone();
        // What it holds (lease -> job), for its heartbeats: a heartbeat's `held` is the
        // runner's whole account, and what it leaves out is given up.
        let held: Arc<Mutex<HashMap<String, String>>> = Arc::default();
        let holding = held.clone();
        let reader = tokio::spawn(async move {
            while let Some(Ok(msg)) = inbound.next().await {
                let now = Instant::now();
                match msg.kind {
                    Some(In::Assignment(a)) => {
                        seen.assigned
                            .lock()
                            .expect("lock")
                            .insert(a.job_id.clone(), (now, a.lease_id.clone()));
                        holding
                            .lock()
                            .expect("lock")
                            .insert(a.lease_id.clone(), a.job_id.clone());
                        if mode == Mode::Complete {
                            let reports = vec![
                                report(&a.job_id, &a.lease_id, 1, pb::JobStatus::Running),
                                report(&a.job_id, &a.lease_id, 2, pb::JobStatus::Succeeded),
                            ];
                            let _ = out
                                .send(pb::SessionRequest {
                                    kind: Some(Out::Reports(pb::ReportBatch { reports })),
                                })
                                .await;
                        }
                    }
                    Some(In::Acks(acks)) => {
                        let done = acks.acks.iter().filter(|a| a.acked_sequence >= 2).count();
                        {
                            let mut holding = holding.lock().expect("lock");
                            for a in acks.acks.iter().filter(|a| a.acked_sequence >= 2) {
                                holding.remove(&a.lease_id);
                            }
                        }
                        if done > 0 {
                            seen.finished.fetch_add(done as u64, Ordering::Relaxed);
                            seen.notify.notify_waiters();
                            let _ = out
                                .send(pb::SessionRequest {
                                    kind: Some(Out::Credits(pb::Credits { slots: done as u32 })),
                                })
                                .await;
                        }
                    }
                    Some(In::Command(c)) => {
                        if let Some(pb::command::Kind::Cancel(cancel)) = c.kind {
                            seen.canceled
                                .lock()
                                .expect("lock")
                                .insert(cancel.job_id.clone(), now);
                            seen.notify.notify_waiters();
                            let _ = out
                                .send(pb::SessionRequest {
                                    kind: Some(Out::CommandAck(pb::AckCommandRequest {
                                        sequence: c.sequence,
                                    })),
                                })
                                .await;
                            let _ = out
                                .send(pb::SessionRequest {
                                    kind: Some(Out::Reports(pb::ReportBatch {
                                        reports: vec![report(
                                            &cancel.job_id,
                                            &cancel.lease_id,
                                            2,
                                            pb::JobStatus::Canceled,
                                        )],
                                    })),
                                })
                                .await;
                        }
                    }
                    _ => {}
                }
            }
        });
        // Heartbeats keep the session (and the leases) alive.
        let beat = tx;
        let beater = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let held = held
                    .lock()
                    .expect("lock")
                    .iter()
                    .map(|(lease_id, job_id)| pb::LeaseRef {
                        job_id: job_id.clone(),
                        lease_id: lease_id.clone(),
                    })
                    .collect();
                if beat
                    .send(pb::SessionRequest {
                        kind: Some(Out::Heartbeat(pb::HeartbeatRequest { held })),
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        SimRunner {
            tasks: vec![reader, beater],
        }
    }
}

/// Opens a session with `free_slots` credits; `buffer` messages may wait toward the server.
async fn open_session(
    client: &mut RunnerServiceClient<Authed>,
    free_slots: u32,
    buffer: usize,
) -> (
    mpsc::Sender<pb::SessionRequest>,
    tonic::Streaming<pb::SessionResponse>,
) {
    let (tx, rx) = mpsc::channel(buffer);
    tx.send(pb::SessionRequest {
        kind: Some(Out::Hello(pb::Hello {
            free_slots,
            ..Default::default()
        })),
    })
    .await
    .expect("hello");
    let inbound = client
        .session(ReceiverStream::new(rx))
        .await
        .expect("session")
        .into_inner();
    (tx, inbound)
}

fn report(job: &str, lease: &str, sequence: u64, status: pb::JobStatus) -> pb::Report {
    pb::Report {
        job_id: job.into(),
        lease_id: lease.into(),
        sequence,
        body: Some(pb::report::Body::Status(pb::StatusReport {
            status: status as i32,
            exit_code: (status == pb::JobStatus::Succeeded).then_some(0),
            ..Default::default()
        })),
    }
}

fn noop() -> pb::JobSpec {
    pb::JobSpec {
        command: vec!["true".into()],
        ..Default::default()
    }
}

async fn submit(jobs: &mut JobServiceClient<Authed>) -> String {
    jobs.submit_job(pb::SubmitJobRequest { spec: Some(noop()) })
        .await
        .expect("submit")
        .into_inner()
        .job
        .expect("job")
        .id
}

/// Submits `n` no-op jobs from `concurrency` clients; returns when all are submitted.
async fn submit_many(url: &str, token: &str, n: usize, concurrency: usize) {
    let left = Arc::new(AtomicU64::new(n as u64));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let left = left.clone();
        let mut jobs = JobServiceClient::with_interceptor(channel(url).await, Bearer::new(token));
        tasks.push(tokio::spawn(async move {
            while left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1))
                .is_ok()
            {
                submit(&mut jobs).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("submitter");
    }
}

async fn wait_finished(seen: &Seen, n: u64) {
    loop {
        let notified = seen.notify.notified();
        if seen.finished.load(Ordering::Relaxed) >= n {
            return;
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
    }
}

/// The pipeline in two halves: N submits with no runner connected (submits/s), then M
/// runners draining those N queued jobs (dispatch and completion, jobs/s).
async fn halves(server: &ServerProcess, n: usize, runners: usize) -> (f64, f64) {
    let start = Instant::now();
    submit_many(&server.url, &server.api_token, n, 32).await;
    let submit_rate = n as f64 / start.elapsed().as_secs_f64();
    let seen = Arc::new(Seen::default());
    let ch = channel(&server.url).await;
    let start = Instant::now();
    let mut sims = Vec::new();
    for i in 0..runners {
        sims.push(
            SimRunner::start(
                &ch,
                &server.registration_token,
                &format!("drain-{i}"),
                256,
                Mode::Complete,
                seen.clone(),
            )
            .await,
        );
    }
    wait_finished(&seen, n as u64).await;
    let drain_rate = n as f64 / start.elapsed().as_secs_f64();
    drop(sims);
    (submit_rate, drain_rate)
}

/// Waits until `look` finds what the simulated runners saw.
async fn seen_by<T>(seen: &Seen, look: impl Fn(&Seen) -> Option<T>) -> T {
    loop {
        let notified = seen.notify.notified();
        if let Some(v) = look(seen) {
            return v;
        }
        let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
    }
}

/// Throughput: N no-op jobs, submit to final status, through M simulated runners.
async fn throughput(server: &ServerProcess, n: usize, runners: usize) -> f64 {
    let seen = Arc::new(Seen::default());
    let ch = channel(&server.url).await;
    let mut sims = Vec::new();
    for i in 0..runners {
        sims.push(
            SimRunner::start(
                &ch,
                &server.registration_token,
                &format!("tp-{i}"),
                256,
                Mode::Complete,
                seen.clone(),
            )
            .await,
        );
    }
    let start = Instant::now();
    let submitting = submit_many(&server.url, &server.api_token, n, 32);
    let (_, ()) = tokio::join!(submitting, wait_finished(&seen, n as u64));
    let elapsed = start.elapsed();
    drop(sims);
    n as f64 / elapsed.as_secs_f64()
}

/// Start latency: submit → the runner holds the assignment.
async fn start_latency(
    server: &ServerProcess,
    samples: usize,
    background_rate: f64,
) -> Vec<Duration> {
    let seen = Arc::new(Seen::default());
    let ch = channel(&server.url).await;
    let _sim = SimRunner::start(
        &ch,
        &server.registration_token,
        "latency",
        1024,
        Mode::Complete,
        seen.clone(),
    )
    .await;
    // Background load at a fixed rate, if asked.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut background = Vec::new();
    if background_rate > 0.0 {
        let workers = 16;
        let per = Duration::from_secs_f64(workers as f64 / background_rate);
        for _ in 0..workers {
            let stop = stop.clone();
            let mut jobs = JobServiceClient::with_interceptor(
                channel(&server.url).await,
                Bearer::new(&server.api_token),
            );
            background.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(per);
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    submit(&mut jobs).await;
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut jobs = JobServiceClient::with_interceptor(ch.clone(), Bearer::new(&server.api_token));
    let mut out = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t0 = Instant::now();
        let id = submit(&mut jobs).await;
        let at = seen_by(&seen, |s| {
            s.assigned.lock().expect("lock").get(&id).map(|(at, _)| *at)
        })
        .await;
        out.push(at.saturating_duration_since(t0));
    }
    stop.store(true, Ordering::Relaxed);
    for b in background {
        let _ = b.await;
    }
    out.sort();
    out
}

/// Cancel latency: CancelJob sent → the runner holds the cancel command.
async fn cancel_latency(server: &ServerProcess, samples: usize) -> (Vec<Duration>, Vec<Duration>) {
    let seen = Arc::new(Seen::default());
    let ch = channel(&server.url).await;
    let _sim = SimRunner::start(
        &ch,
        &server.registration_token,
        "holder",
        64,
        Mode::Hold,
        seen.clone(),
    )
    .await;
    let mut jobs = JobServiceClient::with_interceptor(ch.clone(), Bearer::new(&server.api_token));
    let (mut to_command, mut to_return) = (Vec::new(), Vec::new());
    for _ in 0..samples {
        let id = submit(&mut jobs).await;
        seen_by(&seen, |s| {
            s.assigned
                .lock()
                .expect("lock")
                .contains_key(&id)
                .then_some(())
        })
        .await;
        let t0 = Instant::now();
        jobs.cancel_job(pb::CancelJobRequest {
            job_id: id.clone(),
            reason: String::new(),
        })
        .await
        .expect("cancel");
        to_return.push(t0.elapsed());
        let at = seen_by(&seen, |s| {
            s.canceled.lock().expect("lock").get(&id).copied()
        })
        .await;
        to_command.push(at.saturating_duration_since(t0));
    }
    to_command.sort();
    to_return.sort();
    (to_command, to_return)
}

fn rss_kib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(f64::NAN)
}

/// Idle sessions: K runners registered, K sessions open; the server's RSS per session.
async fn sessions(k: usize) -> (f64, f64, f64, f64) {
    raise_fd_limit();
    let server = ServerProcess::start(&[]).await;
    let pid = server.pid().expect("server pid");
    let per_connection = 200;
    let mut channels = Vec::new();
    for _ in 0..k.div_ceil(per_connection).max(1) {
        channels.push(channel(&server.url).await);
    }
    // Registration is not what is measured: done first, 64 at a time.
    let mut clients = Vec::with_capacity(k);
    let mut pending = futures::stream::FuturesUnordered::new();
    for i in 0..k {
        let ch = channels[i / per_connection].clone();
        let reg = server.registration_token.clone();
        pending.push(async move { register(&ch, &reg, &format!("idle-{i}"), 1).await.1 });
        if pending.len() >= 64
            && let Some(c) = pending.next().await
        {
            clients.push(c);
        }
    }
    while let Some(c) = pending.next().await {
        clients.push(c);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pid);
    let start = Instant::now();
    let mut open = Vec::with_capacity(k);
    let mut opening = futures::stream::FuturesUnordered::new();
    for mut client in clients {
        opening.push(async move {
            let (tx, mut inbound) = open_session(&mut client, 0, 4).await;
            let _welcome = inbound.next().await;
            (tx, inbound)
        });
        if opening.len() >= 256
            && let Some(s) = opening.next().await
        {
            open.push(s);
        }
    }
    while let Some(s) = opening.next().await {
        open.push(s);
    }
    let open_secs = start.elapsed().as_secs_f64();
    // Idle for a few seconds (within the server's silence limit, so no heartbeat is needed;
    // at the default 30 s lease a real runner would send one every 10 s).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = rss_kib(pid);
    // Then every runner heartbeats at the same moment (as after a server restart): the
    // time until every one is acknowledged, i.e. persisted.
    let start = Instant::now();
    let mut beating = futures::stream::FuturesUnordered::new();
    for (tx, mut inbound) in open {
        beating.push(async move {
            tx.send(pb::SessionRequest {
                kind: Some(Out::Heartbeat(pb::HeartbeatRequest::default())),
            })
            .await
            .expect("heartbeat");
            loop {
                match inbound.next().await {
                    Some(Ok(pb::SessionResponse {
                        kind: Some(In::HeartbeatAck(_)),
                    })) => break,
                    Some(Ok(_)) => {}
                    other => panic!("session ended before its heartbeat ack: {other:?}"),
                }
            }
            (tx, inbound)
        });
    }
    let mut open = Vec::with_capacity(k);
    while let Some(s) = beating.next().await {
        open.push(s);
    }
    let beat_rate = k as f64 / start.elapsed().as_secs_f64();
    drop(open);
    let per_session_kib = (after - before) / k as f64;
    (
        after / 1024.0,
        per_session_kib,
        k as f64 / open_secs,
        beat_rate,
    )
}

fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// Log ingest: one attempt's output in 256 KiB reports, pipelined; then read back.
async fn log_ingest(server: &ServerProcess, mib: usize) -> (f64, f64) {
    let ch = channel(&server.url).await;
    let (_, mut client) = register(&ch, &server.registration_token, "logger", 1).await;
    let mut jobs = JobServiceClient::with_interceptor(ch.clone(), Bearer::new(&server.api_token));
    let id = submit(&mut jobs).await;
    let (tx, mut inbound) = open_session(&mut client, 1, 64).await;
    let lease = loop {
        match inbound.next().await {
            Some(Ok(pb::SessionResponse {
                kind: Some(In::Assignment(a)),
            })) => break a.lease_id,
            Some(Ok(_)) => continue,
            other => panic!("no assignment: {other:?}"),
        }
    };
    let chunk = vec![b'x'; 256 * 1024];
    let chunks = mib * 4;
    let per_batch = 4;
    let in_flight_max = 8;
    let start = Instant::now();
    let mut sent = 0usize;
    let mut acked = 0u64;
    let mut seq = 0u64;
    let mut offset = 0u64;
    let mut in_flight = 0usize;
    while acked < chunks as u64 {
        while in_flight < in_flight_max && sent < chunks {
            let mut reports = Vec::new();
            for _ in 0..per_batch.min(chunks - sent) {
                seq += 1;
                reports.push(pb::Report {
                    job_id: id.clone(),
                    lease_id: lease.clone(),
                    sequence: seq,
                    body: Some(pb::report::Body::Log(pb::LogData {
                        stream: pb::LogStream::Stdout as i32,
                        offset,
                        data: chunk.clone(),
                    })),
                });
                offset += chunk.len() as u64;
                sent += 1;
            }
            tx.send(pb::SessionRequest {
                kind: Some(Out::Reports(pb::ReportBatch { reports })),
            })
            .await
            .expect("send");
            in_flight += 1;
        }
        match inbound.next().await {
            Some(Ok(pb::SessionResponse {
                kind: Some(In::Acks(a)),
            })) => {
                in_flight = in_flight.saturating_sub(1);
                acked = a
                    .acks
                    .iter()
                    .map(|a| a.acked_sequence)
                    .max()
                    .unwrap_or(acked);
            }
            Some(Ok(_)) => {}
            other => panic!("log ingest stream ended: {other:?}"),
        }
    }
    let write_secs = start.elapsed().as_secs_f64();
    let bytes = offset as f64;
    // Read it all back.
    let start = Instant::now();
    let mut stream = jobs
        .get_logs(pb::GetLogsRequest {
            job_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("get logs")
        .into_inner();
    let mut read = 0u64;
    while let Some(c) = stream.next().await {
        read += c.expect("chunk").data.len() as u64;
    }
    let read_secs = start.elapsed().as_secs_f64();
    assert_eq!(read, offset, "every byte reads back");
    (bytes / 1e6 / write_secs, bytes / 1e6 / read_secs)
}

/// The server's unary health check: the raw tonic rate (64 concurrent clients) and round trip.
async fn tonic_reference(url: &str, secs: f64, rtt_samples: usize) -> (f64, Vec<Duration>) {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let ch = channel(url).await;
    let mut client = HealthClient::new(ch.clone());
    let mut rtt = Vec::with_capacity(rtt_samples);
    for _ in 0..rtt_samples {
        let t0 = Instant::now();
        client
            .check(HealthCheckRequest::default())
            .await
            .expect("health");
        rtt.push(t0.elapsed());
    }
    rtt.sort();
    let count = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let mut client = HealthClient::new(ch.clone());
        let count = count.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                if client.check(HealthCheckRequest::default()).await.is_ok() {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let start = Instant::now();
    for t in tasks {
        let _ = t.await;
    }
    (
        count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64(),
        rtt,
    )
}

/// Raw SQLite commits per second with the server's pragmas (WAL, the `synchronous` the server
/// runs with), one row per transaction.
async fn sqlite_reference(secs: f64, full: bool) -> f64 {
    use sea_orm::{ConnectionTrait, Database, TransactionTrait};
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("raw.db").display());
    let mut opts = sea_orm::ConnectOptions::new(url);
    opts.sqlx_logging(false).max_connections(1);
    opts.map_sqlx_sqlite_opts(move |o| {
        use sea_orm::sqlx::sqlite::SqliteSynchronous;
        o.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
            .synchronous(if full {
                SqliteSynchronous::Full
            } else {
                SqliteSynchronous::Normal
            })
    });
    let db = Database::connect(opts).await.expect("sqlite");
    db.execute_unprepared("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        .await
        .expect("create");
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut n = 0u64;
    while Instant::now() < deadline {
        let txn = db.begin().await.expect("begin");
        txn.execute_unprepared("INSERT INTO t (v) VALUES ('x')")
            .await
            .expect("insert");
        txn.commit().await.expect("commit");
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// Docker: a real job through a real runner vs. a bare create+start+wait+remove.
async fn docker_overhead(samples: usize) -> (f64, f64) {
    use bollard::query_parameters::{
        CreateContainerOptions, RemoveContainerOptions, WaitContainerOptions,
    };
    let image = busybox_image().await;
    let engine = docker().await;
    let mut bare = Vec::new();
    for _ in 0..samples {
        let t0 = Instant::now();
        let c = engine
            .create_container(
                None::<CreateContainerOptions>,
                bollard::models::ContainerCreateBody {
                    image: Some(image.clone()),
                    cmd: Some(vec!["true".into()]),
                    ..Default::default()
                },
            )
            .await
            .expect("create");
        engine.start_container(&c.id, None).await.expect("start");
        let _ = engine
            .wait_container(
                &c.id,
                Some(WaitContainerOptions {
                    condition: "not-running".into(),
                }),
            )
            .next()
            .await;
        engine
            .remove_container(
                &c.id,
                Some(RemoveContainerOptions {
                    force: true,
                    ..Default::default()
                }),
            )
            .await
            .expect("remove");
        bare.push(t0.elapsed());
    }
    let server = ServerProcess::start(&[]).await;
    let _runner = RunnerProcess::start_for(
        &server.url,
        &server.registration_token,
        "bench-docker",
        &["--executors", "docker"],
    );
    let mut jobs = server.jobs().await;
    let mut full = Vec::new();
    // One job first so the runner is registered and warm.
    for i in 0..=samples {
        let t0 = Instant::now();
        let id = jobs
            .submit_job(pb::SubmitJobRequest {
                spec: Some(pb::JobSpec {
                    image: image.clone(),
                    pull_policy: pb::PullPolicy::Never as i32,
                    args: vec!["true".into()],
                    ..Default::default()
                }),
            })
            .await
            .expect("submit")
            .into_inner()
            .job
            .expect("job")
            .id;
        let mut events = jobs
            .watch_job(pb::WatchJobRequest {
                job_id: id,
                after_sequence: 0,
                follow: true,
            })
            .await
            .expect("watch")
            .into_inner();
        while let Some(e) = events.next().await {
            e.expect("event");
        }
        if i > 0 {
            full.push(t0.elapsed());
        }
    }
    bare.sort();
    full.sort();
    (pct(&full, 50.0), pct(&bare, 50.0))
}

type SandboxClient = pb::sandbox_service_client::SandboxServiceClient<Authed>;

/// Creates `n` sandboxes from `spec` and waits until every one runs; returns their ids and
/// each one's create -> running time (server clock: created_at to started_at).
async fn running_sandboxes(
    sandboxes: &mut SandboxClient,
    spec: &pb::SandboxSpec,
    n: usize,
) -> (Vec<String>, Vec<Duration>) {
    let mut ids = Vec::new();
    for _ in 0..n {
        let s = sandboxes
            .create_sandbox(pb::CreateSandboxRequest {
                spec: Some(spec.clone()),
                idempotency_key: String::new(),
            })
            .await
            .expect("create sandbox")
            .into_inner()
            .sandbox
            .expect("sandbox");
        ids.push(s.id);
    }
    let mut took = Vec::new();
    for id in &ids {
        let mut events = sandboxes
            .watch_sandbox(pb::WatchSandboxRequest {
                sandbox_id: id.clone(),
                after_sequence: 0,
                follow: true,
            })
            .await
            .expect("watch sandbox")
            .into_inner();
        while let Some(e) = events.next().await {
            let e = e.expect("event");
            match e.kind {
                Some(pb::job_event::Kind::Sandbox(c))
                    if c.to == pb::SandboxStatus::Running as i32 =>
                {
                    break;
                }
                Some(pb::job_event::Kind::Sandbox(c))
                    if c.to >= pb::SandboxStatus::Deleting as i32 =>
                {
                    panic!("sandbox {id} ended before it ran: {}", c.message)
                }
                _ => {}
            }
        }
        let s = sandboxes
            .get_sandbox(pb::GetSandboxRequest {
                sandbox_id: id.clone(),
            })
            .await
            .expect("get sandbox")
            .into_inner();
        let ms = (s.started_at_unix_ms - s.created_at_unix_ms).max(0) as u64;
        took.push(Duration::from_millis(ms));
    }
    (ids, took)
}

/// Runs `true` in sandbox `id` `samples` times, one after another; returns each command's
/// accepted -> running time (server clock: the command's created_at to started_at).
async fn exec_starts(mut sandboxes: SandboxClient, id: String, samples: usize) -> Vec<Duration> {
    let mut out = Vec::with_capacity(samples);
    for _ in 0..samples {
        let c = sandboxes
            .run_command(pb::RunCommandRequest {
                sandbox_id: id.clone(),
                command: Some(pb::CommandSpec {
                    argv: vec!["true".into()],
                    ..Default::default()
                }),
            })
            .await
            .expect("run command")
            .into_inner()
            .command
            .expect("command");
        // The logs stream closes when the command has ended.
        let mut logs = sandboxes
            .get_command_logs(pb::GetCommandLogsRequest {
                command_id: c.id.clone(),
                follow: true,
                ..Default::default()
            })
            .await
            .expect("logs")
            .into_inner();
        while logs.next().await.is_some() {}
        let c = sandboxes
            .get_command(pb::GetCommandRequest { command_id: c.id })
            .await
            .expect("get command")
            .into_inner();
        assert_eq!(
            c.status,
            pb::CommandStatus::Succeeded as i32,
            "bench command failed: {}",
            c.failure_message
        );
        out.push(Duration::from_micros(
            ((c.started_at_unix_ms - c.created_at_unix_ms).max(0) as u64) * 1000,
        ));
    }
    out
}

/// Sandbox figures on one executor: sandbox create -> running (`creates` times, one at a
/// time), command accepted -> running at light load (one sandbox) and with `load`
/// sandboxes running commands at once. Returns (light, loaded, create -> running), sorted.
async fn sandbox_figures(
    spec: pb::SandboxSpec,
    executor: &str,
    samples: usize,
    load: usize,
    creates: usize,
) -> (Vec<Duration>, Vec<Duration>, Vec<Duration>) {
    let server = ServerProcess::start(&[]).await;
    let capacity = (load + 1).to_string();
    let _runner = RunnerProcess::start_for(
        &server.url,
        &server.registration_token,
        "bench-sandboxes",
        &["--executors", executor, "--capacity", &capacity],
    );
    let mut sandboxes = pb::sandbox_service_client::SandboxServiceClient::with_interceptor(
        channel(&server.url).await,
        Bearer::new(&server.api_token),
    );
    // Create -> running, one sandbox at a time (each deleted before the next), so that it
    // compares with the engine's own create + start of one container.
    let mut created = Vec::new();
    for _ in 0..creates {
        let (ids, took) = running_sandboxes(&mut sandboxes, &spec, 1).await;
        created.extend(took);
        for id in ids {
            sandboxes
                .delete_sandbox(pb::DeleteSandboxRequest {
                    sandbox_id: id,
                    reason: String::new(),
                })
                .await
                .expect("delete sandbox");
        }
    }
    let (one, _) = running_sandboxes(&mut sandboxes, &spec, 1).await;
    let mut light = exec_starts(sandboxes.clone(), one[0].clone(), samples).await;
    let (many, _) = running_sandboxes(&mut sandboxes, &spec, load).await;
    let per = (samples / load.max(1)).max(3);
    let mut tasks = Vec::new();
    for id in many {
        tasks.push(tokio::spawn(exec_starts(sandboxes.clone(), id, per)));
    }
    let mut loaded = Vec::new();
    for t in tasks {
        loaded.extend(t.await.expect("load task"));
    }
    light.sort();
    loaded.sort();
    created.sort();
    (light, loaded, created)
}

/// The engine on its own, same image: a container created and started (p50 of `samples`),
/// and an exec of `true` in a running container, created and started until it ended.
async fn bare_docker(samples: usize) -> (Vec<Duration>, Vec<Duration>) {
    use bollard::{
        exec::{CreateExecOptions, StartExecResults},
        query_parameters::{CreateContainerOptions, RemoveContainerOptions},
    };
    let image = busybox_image().await;
    let engine = docker().await;
    let mut starts = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..samples {
        let t0 = Instant::now();
        let c = engine
            .create_container(
                None::<CreateContainerOptions>,
                bollard::models::ContainerCreateBody {
                    image: Some(image.clone()),
                    cmd: Some(vec!["sleep".into(), "600".into()]),
                    ..Default::default()
                },
            )
            .await
            .expect("create");
        engine.start_container(&c.id, None).await.expect("start");
        starts.push(t0.elapsed());
        ids.push(c.id);
    }
    let mut execs = Vec::new();
    if let Some(id) = ids.first() {
        for _ in 0..samples.max(10) {
            let t0 = Instant::now();
            let exec = engine
                .create_exec(
                    id,
                    CreateExecOptions {
                        cmd: Some(vec!["true".to_string()]),
                        attach_stdout: Some(true),
                        attach_stderr: Some(true),
                        ..Default::default()
                    },
                )
                .await
                .expect("create exec");
            if let StartExecResults::Attached { mut output, .. } =
                engine.start_exec(&exec.id, None).await.expect("start exec")
            {
                while output.next().await.is_some() {}
            }
            execs.push(t0.elapsed());
        }
    }
    for id in ids {
        let _ = engine
            .remove_container(
                &id,
                Some(RemoveContainerOptions {
                    force: true,
                    ..Default::default()
                }),
            )
            .await;
    }
    starts.sort();
    execs.sort();
    (starts, execs)
}

/// The sandbox figures (see BENCHMARKS.md).
async fn sandbox_scenario(args: &Args, report: &mut Report, progress: &impl Fn(&str)) {
    let quick = args.quick;
    let samples = if quick { 10 } else { 200 };
    let load = if quick { 5 } else { 100 };
    progress(&format!(
        "process sandboxes: {samples} commands, then {load} sandboxes at once"
    ));
    let (light, loaded, _) =
        sandbox_figures(pb::SandboxSpec::default(), "process", samples, load, 1).await;
    report.add(
        "sandbox",
        "process: command accepted -> running p50",
        pct(&light, 50.0),
        "ms",
        "<= 5 ms",
    );
    report.add(
        "sandbox",
        "process: command accepted -> running p99",
        pct(&light, 99.0),
        "ms",
        "",
    );
    report.add(
        "sandbox",
        format!("process, {load} busy: accepted -> running p50"),
        pct(&loaded, 50.0),
        "ms",
        "",
    );
    report.add(
        "sandbox",
        format!("process, {load} busy: accepted -> running p99"),
        pct(&loaded, 99.0),
        "ms",
        "",
    );
    if !args.no_docker {
        let docker_samples = if quick { 5 } else { 50 };
        let docker_load = if quick { 3 } else { 20 };
        progress(&format!(
            "docker sandboxes: {docker_samples} commands, then {docker_load} sandboxes at once"
        ));
        let (bare_start, bare_exec) = bare_docker(if quick { 3 } else { 15 }).await;
        let spec = pb::SandboxSpec {
            executor: pb::ExecutorKind::Docker as i32,
            image: busybox_image().await,
            pull_policy: pb::PullPolicy::Never as i32,
            ..Default::default()
        };
        let (light, loaded, created) = sandbox_figures(
            spec,
            "docker",
            docker_samples,
            docker_load,
            if quick { 2 } else { 10 },
        )
        .await;
        let exec_ref = pct(&bare_exec, 50.0);
        report.add_vs(
            "sandbox",
            "docker: command accepted -> running p50",
            pct(&light, 50.0),
            "ms",
            ("bare docker exec (create+start+end) p50", exec_ref),
            "<= bare + 30 ms",
        );
        report.add(
            "sandbox",
            "docker: command accepted -> running p99",
            pct(&light, 99.0),
            "ms",
            "",
        );
        report.add(
            "sandbox",
            format!("docker, {docker_load} busy: accepted -> running p50"),
            pct(&loaded, 50.0),
            "ms",
            "",
        );
        report.add(
            "sandbox",
            format!("docker, {docker_load} busy: accepted -> running p99"),
            pct(&loaded, 99.0),
            "ms",
            "",
        );
        report.add_vs(
            "sandbox",
            "docker: sandbox create -> running p50",
            pct(&created, 50.0),
            "ms",
            ("bare bollard create+start p50", pct(&bare_start, 50.0)),
            "",
        );
    }
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
        })
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    json!({
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu": cpu,
        "memory_gib": (mem * 10.0).round() / 10.0,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
    })
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let quick = args.quick;
    let n = args.jobs.unwrap_or(if quick { 500 } else { 20_000 });
    let k = args.sessions.unwrap_or(if quick { 300 } else { 10_000 });
    let mib = args.log_mib.unwrap_or(if quick { 8 } else { 256 });
    let samples = if quick { 30 } else { 300 };
    let ref_secs = if quick { 0.5 } else { 3.0 };
    let mut report = Report::default();
    let progress = |what: &str| {
        if !args.json {
            eprintln!("… {what}");
        }
    };

    if args.sandboxes_only {
        sandbox_scenario(&args, &mut report, &progress).await;
        report.finish(&args);
        return;
    }

    progress("references: raw tonic unary, raw SQLite commits");
    let sync = ["--sqlite-synchronous", args.sqlite_synchronous.as_str()];
    let server = ServerProcess::start(&sync).await;
    let (tonic_rps, rtt) = tonic_reference(&server.url, ref_secs, samples * 3).await;
    let rtt_p50 = pct(&rtt, 50.0);
    report.add(
        "reference",
        "tonic unary (health) rate",
        tonic_rps,
        "rpc/s",
        "",
    );
    report.add("reference", "tonic unary round trip p50", rtt_p50, "ms", "");
    let full = args.sqlite_synchronous == "full";
    let sqlite_cps = sqlite_reference(ref_secs, full).await;
    report.add(
        "reference",
        if full {
            "sqlite commits (WAL, FULL)"
        } else {
            "sqlite commits (WAL, NORMAL)"
        },
        sqlite_cps,
        "txn/s",
        "",
    );

    progress(&format!(
        "throughput: {n} no-op jobs, {} runners, SQLite",
        args.runners
    ));
    let tp = throughput(&server, n, args.runners).await;
    report.add_vs(
        "throughput",
        "jobs/s end to end (sqlite)",
        tp,
        "jobs/s",
        ("tonic unary rate", tonic_rps),
        ">= 10000 and >= 0.3 x tonic",
    );

    progress("throughput in halves: submit only, then dispatch and completion only");
    let (submit_rate, drain_rate) = halves(&server, n, args.runners).await;
    report.add_vs(
        "throughput",
        "submits/s, no runner (sqlite)",
        submit_rate,
        "jobs/s",
        ("sqlite commits", sqlite_cps),
        "",
    );
    report.add_vs(
        "throughput",
        "dispatch+complete/s of queued jobs",
        drain_rate,
        "jobs/s",
        ("sqlite commits", sqlite_cps),
        "",
    );

    progress("start latency at light load");
    let light = start_latency(&server, samples, 0.0).await;
    report.add_vs(
        "start",
        "submit -> assigned p50 (light)",
        pct(&light, 50.0),
        "ms",
        ("tonic rtt p50", rtt_p50),
        "<= 1 ms",
    );
    report.add(
        "start",
        "submit -> assigned p90 (light)",
        pct(&light, 90.0),
        "ms",
        "",
    );
    report.add(
        "start",
        "submit -> assigned p99 (light)",
        pct(&light, 99.0),
        "ms",
        "<= 5 ms",
    );
    progress("start latency at half the measured maximum");
    let half = start_latency(&server, samples, tp / 2.0).await;
    report.add(
        "start",
        "submit -> assigned p50 (half load)",
        pct(&half, 50.0),
        "ms",
        "",
    );
    report.add(
        "start",
        "submit -> assigned p99 (half load)",
        pct(&half, 99.0),
        "ms",
        "",
    );

    progress("cancel latency");
    let (to_cmd, to_ret) = cancel_latency(&server, samples).await;
    report.add_vs(
        "cancel",
        "cancel -> runner has command p50",
        pct(&to_cmd, 50.0),
        "ms",
        ("tonic rtt p50", rtt_p50),
        "",
    );
    report.add(
        "cancel",
        "cancel -> runner has command p99",
        pct(&to_cmd, 99.0),
        "ms",
        "<= 5 ms",
    );
    report.add(
        "cancel",
        "CancelJob round trip p50",
        pct(&to_ret, 50.0),
        "ms",
        "",
    );

    progress(&format!("log ingest: {mib} MiB"));
    let (write_mbs, read_mbs) = log_ingest(&server, mib).await;
    report.add(
        "logs",
        "ingest (persisted, acked)",
        write_mbs,
        "MB/s",
        ">= 50 MB/s",
    );
    report.add("logs", "read back (GetLogs)", read_mbs, "MB/s", "");
    drop(server);

    if let Some(admin) = &args.postgres_url {
        progress(&format!("throughput on PostgreSQL: {n} jobs"));
        let db = TestDatabase::new(&Db::Postgres(admin.clone())).await;
        let pg = ServerProcess::start_on(Some(db.url().to_string()), &[]).await;
        let tp_pg = throughput(&pg, n, args.runners).await;
        report.add_vs(
            "throughput",
            "jobs/s end to end (postgres)",
            tp_pg,
            "jobs/s",
            ("tonic unary rate", tonic_rps),
            ">= 5000",
        );
        drop(pg);
        db.remove().await;
    } else {
        eprintln!(
            "!!! no PostgreSQL URL (--postgres-url or GANTRY_TEST_POSTGRES_URL): the PostgreSQL run is left out"
        );
    }

    progress(&format!("sessions: {k} idle runner sessions"));
    let (rss_mib, per_session_kib, open_rate, beat_rate) = sessions(k).await;
    report.add(
        "sessions",
        format!("server RSS with {k} sessions"),
        rss_mib,
        "MiB",
        "<= 200 MiB at 10000",
    );
    report.add("sessions", "RSS per session", per_session_kib, "KiB", "");
    report.add(
        "sessions",
        "sessions opened per second",
        open_rate,
        "1/s",
        "",
    );
    report.add(
        "sessions",
        format!("heartbeats/s, all {k} at once"),
        beat_rate,
        "1/s",
        "",
    );

    if !args.no_docker {
        progress("docker executor overhead");
        let (full, bare) = docker_overhead(if quick { 3 } else { 15 }).await;
        report.add_vs(
            "docker",
            "job submit -> succeeded p50",
            full,
            "ms",
            ("bare create+start+wait+rm p50", bare),
            "",
        );
        report.add(
            "docker",
            "executor overhead (p50 difference)",
            full - bare,
            "ms",
            "<= 50 ms",
        );
    }

    if !args.no_sandboxes {
        sandbox_scenario(&args, &mut report, &progress).await;
    }

    report.finish(&args);
}
