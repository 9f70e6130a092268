//! Following a job: `watch` (a live view), `logs`, and waiting for the end; the pieces
//! sandboxes reuse (event lines, the progress bar, output chunks, exit statuses).
use std::io::{IsTerminal as _, Write as _};

use gantry_proto as pb;
use indicatif::{ProgressBar, ProgressStyle};
use tokio_stream::StreamExt as _;

use crate::{
    args::{Global, LogsArgs, Output, Stream},
    client::{CliError, Clients, Result, exit},
    render,
};

/// How awaited work (a job, a sandbox's command) ended, as far as the exit status goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Exited 0.
    Succeeded,
    /// Canceled.
    Canceled,
    /// Ran past its timeout.
    TimedOut,
    /// Failed, with the work's exit code when it exited.
    Failed(Option<i32>),
}

impl Ended {
    /// The exit status that stands for it (see `gantry --help`).
    pub fn exit_code(self) -> u8 {
        match self {
            Ended::Succeeded => 0,
            Ended::Canceled => exit::CANCELED,
            Ended::TimedOut => exit::TIMED_OUT,
            // Exit statuses are 8 bits; a code that wraps to 0 must still be a failure.
            Ended::Failed(Some(c)) if c != 0 => match (c & 0xff) as u8 {
                0 => 1,
                n => n,
            },
            Ended::Failed(_) => exit::NO_EXIT_CODE,
        }
    }
}

/// The exit status that stands for how a finished job ended (see `gantry --help`).
pub fn job_exit_code(job: &pb::Job) -> u8 {
    match pb::JobStatus::try_from(job.status).unwrap_or_default() {
        pb::JobStatus::Succeeded => Ended::Succeeded,
        pb::JobStatus::Canceled => Ended::Canceled,
        pb::JobStatus::TimedOut => Ended::TimedOut,
        _ => Ended::Failed(job.exit_code),
    }
    .exit_code()
}

/// Waits (following its events) until the job is terminal.
pub async fn wait_for_end(c: &mut Clients, id: &str) -> Result<()> {
    let mut events = c
        .jobs
        .watch_job(pb::WatchJobRequest {
            job_id: id.to_string(),
            after_sequence: 0,
            follow: true,
        })
        .await
        .map_err(|s| c.error(&s))?
        .into_inner();
    while let Some(e) = events.next().await {
        e.map_err(|s| c.error(&s))?;
    }
    Ok(())
}

/// Reads the job, says how it ended (on stderr, unless it succeeded or JSON is asked for),
/// and returns its exit status.
pub async fn finish(c: &mut Clients, id: &str, output: Output) -> Result<u8> {
    let job = ended(c, id).await?;
    if output == Output::Json {
        // One line, like the NDJSON output before it.
        println!("{}", render::job_json(&job));
    } else if job.status != pb::JobStatus::Succeeded as i32 {
        eprintln!("job {}: {}", job.id, render::outcome_line(&job));
    }
    Ok(job_exit_code(&job))
}

/// The job, which must have ended: a stream that stopped before (the server went away) is
/// not an outcome.
async fn ended(c: &mut Clients, id: &str) -> Result<pb::Job> {
    let job = c.job(id.to_string()).await?;
    if job.status < pb::JobStatus::Succeeded as i32 {
        return Err(CliError::new(
            crate::client::exit::UNREACHABLE,
            format!(
                "the server ended the stream before job {id} finished (it is {}); run `gantry watch {id}` again",
                render::status_name(job.status)
            ),
        ));
    }
    Ok(job)
}

/// Writes bytes to stdout or stderr (a closed pipe ends the program by SIGPIPE, see main).
fn write_out(stream: i32, data: &[u8]) {
    let _ = if stream == pb::LogStream::Stderr as i32 {
        let mut err = std::io::stderr().lock();
        err.write_all(data).and_then(|_| err.flush())
    } else {
        let mut out = std::io::stdout().lock();
        out.write_all(data).and_then(|_| out.flush())
    };
}

/// Prints a job's output: stdout bytes to stdout, stderr bytes to stderr (or NDJSON chunks).
pub async fn stream_logs(
    c: &mut Clients,
    id: &str,
    attempt: u32,
    stream: Option<Stream>,
    follow: bool,
    output: Output,
) -> Result<()> {
    let mut chunks = c
        .jobs
        .get_logs(pb::GetLogsRequest {
            job_id: id.to_string(),
            attempt,
            stream: match stream {
                Some(Stream::Stdout) => pb::LogStream::Stdout as i32,
                Some(Stream::Stderr) => pb::LogStream::Stderr as i32,
                None => pb::LogStream::Unspecified as i32,
            },
            follow,
            ..Default::default()
        })
        .await
        .map_err(|s| c.error(&s))?
        .into_inner();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|s| c.error(&s))?;
        print_chunk(&chunk, output);
    }
    Ok(())
}

/// Prints one chunk of output: its bytes to stdout or stderr as they are, or an NDJSON line.
pub fn print_chunk(chunk: &pb::LogChunk, output: Output) {
    match output {
        Output::Table => write_out(chunk.stream, &chunk.data),
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "attempt": chunk.attempt,
                "stream": if chunk.stream == pb::LogStream::Stderr as i32 { "stderr" } else { "stdout" },
                "offset": chunk.offset,
                "data": String::from_utf8_lossy(&chunk.data),
            })
        ),
    }
}

/// `gantry logs`.
pub async fn logs(global: &Global, args: LogsArgs) -> Result<u8> {
    let mut c = Clients::connect(global).await?;
    stream_logs(
        &mut c,
        &args.id,
        args.attempt,
        args.stream,
        args.follow,
        global.output,
    )
    .await?;
    Ok(0)
}

/// One line for an event, as `watch` prints it without a terminal.
pub fn event_line(e: &pb::JobEvent) -> Option<String> {
    Some(match e.kind.as_ref()? {
        pb::job_event::Kind::Status(s) => {
            let mut line = if s.from == pb::JobStatus::Unspecified as i32 {
                format!("status {}", render::status_name(s.to))
            } else {
                format!(
                    "status {} -> {}",
                    render::status_name(s.from),
                    render::status_name(s.to)
                )
            };
            if let Some(code) = s.exit_code {
                line.push_str(&format!(" (exit code {code})"));
            }
            if !s.message.is_empty() {
                line.push_str(&format!(": {}", s.message));
            }
            line
        }
        pb::job_event::Kind::Phase(p) => {
            format!("phase {} {}", render::phase_name(p.phase), p.message)
                .trim_end()
                .to_string()
        }
        pb::job_event::Kind::Progress(p) => {
            format!("progress {}% {} {}", p.percent, p.stage, p.message)
                .trim_end()
                .to_string()
        }
        pb::job_event::Kind::Limit(l) => {
            format!(
                "limit {} reached: {}",
                render::limit_name(l.limit),
                l.message
            )
        }
        pb::job_event::Kind::Sandbox(s) => {
            let mut line = if s.from == pb::SandboxStatus::Unspecified as i32 {
                format!("sandbox {}", render::sandbox_status_name(s.to))
            } else {
                format!(
                    "sandbox {} -> {}",
                    render::sandbox_status_name(s.from),
                    render::sandbox_status_name(s.to)
                )
            };
            let mut detail = Vec::new();
            if let Some(k) = render::failure_name(s.failure_kind) {
                detail.push(k);
            }
            if !s.runner_id.is_empty() {
                detail.push(format!("runner {}", s.runner_id));
            }
            if !s.container_id.is_empty() {
                detail.push(format!("container {}", s.container_id));
            }
            if !detail.is_empty() {
                line.push_str(&format!(" ({})", detail.join(", ")));
            }
            if !s.message.is_empty() {
                line.push_str(&format!(": {}", s.message));
            }
            line
        }
        pb::job_event::Kind::Command(u) => match &u.progress {
            Some(p) => format!(
                "command {} progress {}% {} {}",
                u.number, p.percent, p.stage, p.message
            )
            .trim_end()
            .to_string(),
            None => format!(
                "command {} {}",
                u.number,
                render::outcome(
                    render::command_status_name(u.status),
                    u.failure_kind,
                    u.exit_code,
                    &u.message
                )
            ),
        },
        pb::job_event::Kind::Work(w) => {
            let mut line = format!("event {}", w.kind);
            if !w.message.is_empty() {
                line.push_str(&format!(": {}", w.message));
            }
            if !w.fields.is_empty() {
                let mut fields: Vec<_> = w.fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
                fields.sort();
                line.push_str(&format!(" ({})", fields.join(", ")));
            }
            line
        }
        pb::job_event::Kind::Artifact(a) => match &a.blob {
            Some(b) if a.error.is_empty() => {
                format!(
                    "artifact {} stored ({} bytes, {})",
                    a.name, b.size, b.digest
                )
            }
            _ => format!("artifact {} not stored: {}", a.name, a.error),
        },
        pb::job_event::Kind::Result(r) => format!(
            "result set ({} bytes{})",
            r.size,
            if r.content_type.is_empty() {
                String::new()
            } else {
                format!(", {}", r.content_type)
            }
        ),
    })
}

/// A progress bar on stderr, as `watch` draws it, starting with `prefix`.
pub fn live_bar(prefix: &str) -> ProgressBar {
    let bar = ProgressBar::new(100);
    let colour = render::colour_stderr();
    let template = if colour {
        "{spinner:.cyan} {prefix:.bold} [{bar:32.cyan/blue}] {pos:>3}% {wide_msg}"
    } else {
        "{spinner} {prefix} [{bar:32}] {pos:>3}% {wide_msg}"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(prefix.to_string());
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

/// Shows `p` on `bar`.
pub fn show_progress(bar: &ProgressBar, p: &pb::Progress) {
    bar.set_position(u64::from(p.percent.min(100)));
    bar.set_message(format!("{} {}", p.stage, p.message).trim().to_string());
}

/// `gantry watch`: status changes and phases as lines, progress as a bar (on a terminal),
/// until the job ends; exits with the job's status.
pub async fn watch(global: &Global, id: String) -> Result<u8> {
    let mut c = Clients::connect(global).await?;
    let mut events = c
        .jobs
        .watch_job(pb::WatchJobRequest {
            job_id: id.clone(),
            after_sequence: 0,
            follow: true,
        })
        .await
        .map_err(|s| c.error(&s))?
        .into_inner();
    // The bar draws on stderr: it is live when stderr is a terminal.
    let live = global.output == Output::Table && std::io::stderr().is_terminal();
    let bar = live.then(|| live_bar("queued"));
    while let Some(e) = events.next().await {
        let e = e.map_err(|s| c.error(&s))?;
        match (&bar, global.output) {
            (_, Output::Json) => println!("{}", render::event_json(&e)),
            (Some(bar), _) => match &e.kind {
                Some(pb::job_event::Kind::Progress(p)) => show_progress(bar, p),
                Some(pb::job_event::Kind::Status(s)) => {
                    bar.set_prefix(render::status_name(s.to));
                    if let Some(line) = event_line(&e) {
                        bar.println(line);
                    }
                }
                _ => {
                    if let Some(line) = event_line(&e) {
                        bar.println(line);
                    }
                }
            },
            (None, _) => {
                if let Some(line) = event_line(&e) {
                    println!("{line}");
                }
            }
        }
    }
    let job = match ended(&mut c, &id).await {
        Ok(job) => job,
        Err(e) => {
            if let Some(bar) = bar {
                bar.abandon();
            }
            return Err(e);
        }
    };
    if let Some(bar) = bar {
        bar.set_prefix(render::status_name(job.status));
        if job.status == pb::JobStatus::Succeeded as i32 {
            bar.set_position(100);
        }
        bar.finish();
    }
    if global.output == Output::Table {
        let status = pb::JobStatus::try_from(job.status).unwrap_or_default();
        println!(
            "job {} {}",
            job.id,
            render::paint_status(status, &render::outcome_line(&job), render::colour())
        );
    }
    Ok(job_exit_code(&job))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(status: pb::JobStatus, exit_code: Option<i32>) -> pb::Job {
        pb::Job {
            status: status as i32,
            exit_code,
            ..Default::default()
        }
    }

    fn event(kind: pb::job_event::Kind) -> pb::JobEvent {
        pb::JobEvent {
            job_id: "s1".into(),
            sequence: 4,
            at_unix_ms: 1000,
            attempt: 0,
            kind: Some(kind),
        }
    }

    #[test]
    fn sandbox_events_read_as_lines() {
        use pb::job_event::Kind;
        let line = |k| event_line(&event(k)).unwrap_or_default();
        assert_eq!(
            line(Kind::Sandbox(pb::SandboxChange {
                from: pb::SandboxStatus::Unspecified as i32,
                to: pb::SandboxStatus::Pending as i32,
                ..Default::default()
            })),
            "sandbox pending"
        );
        assert_eq!(
            line(Kind::Sandbox(pb::SandboxChange {
                from: pb::SandboxStatus::Starting as i32,
                to: pb::SandboxStatus::Running as i32,
                runner_id: "r1".into(),
                container_id: "abc".into(),
                ..Default::default()
            })),
            "sandbox starting -> running (runner r1, container abc)"
        );
        assert_eq!(
            line(Kind::Sandbox(pb::SandboxChange {
                from: pb::SandboxStatus::Running as i32,
                to: pb::SandboxStatus::Failed as i32,
                failure_kind: pb::FailureKind::RunnerLost as i32,
                message: "lease expired".into(),
                runner_id: "r1".into(),
                ..Default::default()
            })),
            "sandbox running -> failed (runner_lost, runner r1): lease expired"
        );
        assert_eq!(
            line(Kind::Command(pb::CommandUpdate {
                number: 2,
                status: pb::CommandStatus::Failed as i32,
                failure_kind: pb::FailureKind::ExitNonzero as i32,
                exit_code: Some(3),
                message: "exited with code 3".into(),
                ..Default::default()
            })),
            "command 2 failed (exit_nonzero, exit code 3): exited with code 3"
        );
        assert_eq!(
            line(Kind::Command(pb::CommandUpdate {
                number: 2,
                status: pb::CommandStatus::Running as i32,
                ..Default::default()
            })),
            "command 2 running"
        );
        assert_eq!(
            line(Kind::Command(pb::CommandUpdate {
                number: 2,
                status: pb::CommandStatus::Running as i32,
                progress: Some(pb::Progress {
                    percent: 40,
                    stage: "build".into(),
                    message: String::new(),
                }),
                ..Default::default()
            })),
            "command 2 progress 40% build"
        );
    }

    #[test]
    fn sandbox_events_as_json_name_the_sandbox() {
        use pb::job_event::Kind;
        let v = render::sandbox_event_json(&event(Kind::Command(pb::CommandUpdate {
            command_id: "c1".into(),
            number: 1,
            status: pb::CommandStatus::TimedOut as i32,
            failure_kind: pb::FailureKind::Timeout as i32,
            ..Default::default()
        })));
        assert_eq!(v["sandbox_id"], "s1");
        assert!(v.get("job_id").is_none(), "{v}");
        assert_eq!(v["type"], "command");
        assert_eq!(v["command_id"], "c1");
        assert_eq!(v["status"], "timed_out");
        assert_eq!(v["failure_kind"], "timeout");
        assert!(v["exit_code"].is_null() && v["progress"].is_null());
        let v = render::sandbox_event_json(&event(Kind::Sandbox(pb::SandboxChange {
            from: pb::SandboxStatus::Pending as i32,
            to: pb::SandboxStatus::Creating as i32,
            runner_id: "r1".into(),
            ..Default::default()
        })));
        assert_eq!(v["type"], "sandbox");
        assert_eq!(
            (v["from"].as_str(), v["to"].as_str()),
            (Some("pending"), Some("creating"))
        );
        assert_eq!(v["runner_id"], "r1");
        assert!(v["container_id"].is_null() && v["failure_kind"].is_null());
        assert_eq!(v["sequence"], 4);
    }

    #[test]
    fn the_works_own_events_read_as_lines_and_json() {
        use pb::job_event::Kind;
        let line = |k| event_line(&event(k)).unwrap_or_default();
        let work = Kind::Work(pb::WorkEvent {
            kind: "checkpoint".into(),
            message: "step 3".into(),
            fields: [("step", "3"), ("loss", "0.1")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .into(),
        });
        assert_eq!(
            line(work.clone()),
            "event checkpoint: step 3 (loss=0.1, step=3)"
        );
        let stored = Kind::Artifact(pb::ArtifactStored {
            name: "out/model.bin".into(),
            blob: Some(pb::Blob {
                digest: "sha256:ab".into(),
                size: 42,
            }),
            error: String::new(),
        });
        assert_eq!(
            line(stored.clone()),
            "artifact out/model.bin stored (42 bytes, sha256:ab)"
        );
        let missing = Kind::Artifact(pb::ArtifactStored {
            name: "out/*.bin".into(),
            blob: None,
            error: "matched nothing".into(),
        });
        assert_eq!(
            line(missing.clone()),
            "artifact out/*.bin not stored: matched nothing"
        );
        let result = Kind::Result(pb::ResultSet {
            size: 17,
            content_type: "application/json".into(),
        });
        assert_eq!(
            line(result.clone()),
            "result set (17 bytes, application/json)"
        );

        let v = render::event_json(&event(work));
        assert_eq!(v["type"], "work");
        assert_eq!(v["kind"], "checkpoint");
        assert_eq!(v["fields"]["loss"], "0.1");
        let v = render::event_json(&event(stored));
        assert_eq!(v["type"], "artifact");
        assert_eq!(v["blob"]["size"], 42);
        assert!(v["error"].is_null());
        let v = render::event_json(&event(missing));
        assert!(v["blob"].is_null());
        assert_eq!(v["error"], "matched nothing");
        let v = render::event_json(&event(result));
        assert_eq!(v["type"], "result");
        assert_eq!(v["size"], 17);
        assert_eq!(v["content_type"], "application/json");
    }

    #[test]
    fn an_input_that_cannot_be_had_is_named() {
        let job = pb::Job {
            status: pb::JobStatus::Failed as i32,
            failure_kind: pb::FailureKind::InputUnavailable as i32,
            failure_message: "input in.bin: job j1 has no artifact named out.bin".into(),
            ..Default::default()
        };
        assert_eq!(
            render::outcome_line(&job),
            "failed (input_unavailable): input in.bin: job j1 has no artifact named out.bin"
        );
        assert_eq!(job_exit_code(&job), 125);
        assert_eq!(render::job_json(&job)["failure_kind"], "input_unavailable");
    }

    #[test]
    fn exit_codes_follow_the_job() {
        assert_eq!(job_exit_code(&job(pb::JobStatus::Succeeded, Some(0))), 0);
        assert_eq!(job_exit_code(&job(pb::JobStatus::Failed, Some(3))), 3);
        assert_eq!(job_exit_code(&job(pb::JobStatus::Failed, Some(256))), 1);
        assert_eq!(job_exit_code(&job(pb::JobStatus::Failed, None)), 125);
        assert_eq!(job_exit_code(&job(pb::JobStatus::Canceled, Some(143))), 130);
        assert_eq!(job_exit_code(&job(pb::JobStatus::TimedOut, None)), 124);
    }
}
