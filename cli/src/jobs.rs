//! Job commands: submit, jobs, get, cancel, retry.
use gantry_proto as pb;

use crate::{
    args::{self, Global, JobsArgs, Output, SpecArgs, SubmitArgs},
    client::{CliError, Clients, Result},
    follow,
    render::{self, Table},
};

/// The job spec a `submit` (or `job submit`) command line describes.
pub fn spec(args: &SpecArgs) -> Result<pb::JobSpec> {
    if args.image.is_none() && (args.entrypoint.is_some() || args.pull.is_some()) {
        return Err(CliError::usage(
            "--entrypoint and --pull apply to container jobs: add --image",
        ));
    }
    let mut spec = pb::JobSpec {
        queue: args.queue.clone().unwrap_or_default(),
        labels: args.labels.iter().cloned().collect(),
        env: args.env.iter().cloned().collect(),
        metadata: args.metadata.iter().cloned().collect(),
        priority: args.priority,
        // Zero means the server's default; anything else goes to the server as asked (it
        // names the field when the value is out of range). Sub-second values round up.
        timeout_seconds: args.timeout.map_or(0, args::seconds_up),
        lock_key: args.lock_key.clone().unwrap_or_default(),
        idempotency_key: args.idempotency_key.clone().unwrap_or_default(),
        working_dir: args.workdir.clone().unwrap_or_default(),
        cancel_grace_seconds: args.grace.map_or(0, args::grace_seconds),
        inputs: args.inputs.clone(),
        artifacts: args.artifacts.clone(),
        ..Default::default()
    };
    if args.retries > 0 {
        spec.retry = Some(pb::RetryPolicy {
            max_attempts: args.retries.saturating_add(1),
            initial_backoff_ms: args
                .retry_backoff
                .map_or(1000, |b| u32::try_from(b.as_millis()).unwrap_or(u32::MAX)),
            max_backoff_ms: 0,
        });
    }
    if args.memory.is_some() || args.cpus.is_some() {
        spec.resources = Some(pb::Resources {
            memory_bytes: args.memory.unwrap_or(0),
            cpu_millis: args.cpus.unwrap_or(0),
        });
    }
    match &args.image {
        Some(image) => {
            // As with `docker run IMAGE COMMAND…`: the command is the container's CMD.
            spec.executor = pb::ExecutorKind::Docker as i32;
            spec.image = image.clone();
            spec.args = args.command.clone();
            if let Some(e) = &args.entrypoint {
                spec.command = vec![e.clone()];
            }
            if let Some(p) = args.pull {
                spec.pull_policy = pb::PullPolicy::from(p) as i32;
            }
        }
        None => {
            spec.executor = pb::ExecutorKind::Process as i32;
            spec.command = args.command.clone();
        }
    }
    Ok(spec)
}

/// `gantry submit`.
pub async fn submit(global: &Global, args: SubmitArgs) -> Result<u8> {
    let spec = spec(&args.spec)?;
    let mut c = Clients::connect(global).await?;
    let response = c
        .jobs
        .submit_job(pb::SubmitJobRequest { spec: Some(spec) })
        .await
        .map_err(|s| c.error(&s))?
        .into_inner();
    let job = response
        .job
        .as_ref()
        .ok_or_else(|| CliError::new(1, "the server answered without the job"))?;
    if !(args.wait || args.follow) {
        print_submitted(&response, global.output)?;
        return Ok(0);
    }
    eprintln!(
        "job {}{}",
        job.id,
        if response.deduplicated {
            " (an earlier job with this idempotency key)"
        } else {
            ""
        }
    );
    if args.follow {
        follow::stream_logs(&mut c, &job.id, 0, None, true, global.output).await?;
    } else {
        follow::wait_for_end(&mut c, &job.id).await?;
        follow::stream_logs(&mut c, &job.id, 0, None, false, global.output).await?;
    }
    follow::finish(&mut c, &job.id, global.output).await
}

/// Prints a job just submitted: its id, or (JSON) the job with `deduplicated`.
pub fn print_submitted(response: &pb::SubmitJobResponse, output: Output) -> Result<()> {
    let job = response
        .job
        .as_ref()
        .ok_or_else(|| CliError::new(1, "the server answered without the job"))?;
    match output {
        Output::Json => {
            let mut v = render::job_json(job);
            if let Some(o) = v.as_object_mut() {
                o.insert("deduplicated".into(), response.deduplicated.into());
            }
            render::print_json(&v);
        }
        Output::Table => println!("{}", job.id),
    }
    Ok(())
}

/// `gantry jobs`.
pub async fn list(global: &Global, args: JobsArgs) -> Result<u8> {
    let mut c = Clients::connect(global).await?;
    let response = c
        .jobs
        .list_jobs(pb::ListJobsRequest {
            statuses: args
                .statuses
                .iter()
                .map(|s| pb::JobStatus::from(*s) as i32)
                .collect(),
            queue: args.queue.unwrap_or_default(),
            labels: args.labels.into_iter().collect(),
            runner_id: args.runner.unwrap_or_default(),
            parent_job_id: args.parent.unwrap_or_default(),
            page_size: args.limit,
            page_token: args.page_token.unwrap_or_default(),
        })
        .await
        .map_err(|s| c.error(&s))?
        .into_inner();
    match global.output {
        Output::Json => render::print_json(&serde_json::json!({
            "jobs": response.jobs.iter().map(render::job_json).collect::<Vec<_>>(),
            "next_page_token": (!response.next_page_token.is_empty()).then_some(&response.next_page_token),
        })),
        Output::Table => {
            let colour = render::colour();
            let mut t = Table::new(&[
                "ID", "STATUS", "QUEUE", "AGE", "TRIES", "PROGRESS", "COMMAND",
            ]);
            for job in &response.jobs {
                let spec = job.spec.clone().unwrap_or_default();
                let progress = job
                    .progress
                    .as_ref()
                    .map_or_else(|| "-".to_string(), |p| format!("{}%", p.percent));
                t.row(vec![
                    render::cell(job.id.clone()),
                    render::status_cell(job.status, colour),
                    render::cell(spec.queue.clone()),
                    render::cell(render::ago(job.created_at_unix_ms)),
                    render::cell(job.attempt_count.to_string()),
                    render::cell(progress),
                    render::cell(render::what(&spec)),
                ]);
            }
            t.print();
            if !response.next_page_token.is_empty() {
                eprintln!("more: --page-token {}", response.next_page_token);
            }
        }
    }
    Ok(0)
}

/// `gantry get`.
pub async fn get(global: &Global, id: String) -> Result<u8> {
    let mut c = Clients::connect(global).await?;
    let job = c.job(id).await?;
    print_job(&job, global.output);
    Ok(0)
}

/// Prints a job in full.
pub fn print_job(job: &pb::Job, output: Output) {
    if output == Output::Json {
        render::print_json(&render::job_json(job));
        return;
    }
    let colour = render::colour();
    let spec = job.spec.clone().unwrap_or_default();
    let status = pb::JobStatus::try_from(job.status).unwrap_or_default();
    println!("id:        {}", job.id);
    println!(
        "status:    {}",
        render::paint_status(status, &render::outcome_line(job), colour)
    );
    println!("command:   {}", render::what(&spec));
    println!("queue:     {}   priority: {}", spec.queue, spec.priority);
    if !spec.labels.is_empty() {
        let mut labels: Vec<_> = spec
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        labels.sort();
        println!("labels:    {}", labels.join(","));
    }
    if let Some(p) = &job.progress {
        println!("progress:  {}% {} {}", p.percent, p.stage, p.message);
    }
    if !spec.inputs.is_empty() {
        let inputs: Vec<_> = spec.inputs.iter().map(render::input_line).collect();
        println!("inputs:    {}", inputs.join(", "));
    }
    if !spec.artifacts.is_empty() {
        println!("artifacts: {}", spec.artifacts.join(", "));
    }
    println!("created:   {} ago", render::ago(job.created_at_unix_ms));
    if !job.retried_from_job_id.is_empty() {
        println!("retry of:  {}", job.retried_from_job_id);
    }
    if !job.parent_job_id.is_empty() {
        println!("parent:    {}", job.parent_job_id);
    }
    if let Some(r) = &job.result {
        print_result(r);
    }
    if !job.attempts.is_empty() {
        println!();
        let mut t = Table::new(&["ATTEMPT", "STATUS", "RUNNER", "EXIT", "WHY"]);
        for a in &job.attempts {
            t.row(vec![
                render::cell(a.number.to_string()),
                render::status_cell(a.status, colour),
                render::cell(a.runner_id.clone()),
                render::cell(a.exit_code.map_or_else(|| "-".into(), |c| c.to_string())),
                render::cell(a.failure_message.clone()),
            ]);
        }
        t.print();
    }
}

/// Results at most this long are shown by `gantry get` when they are text.
const SHOWN_RESULT_BYTES: usize = 4096;

/// Prints a job's result: its type and size, then its bytes when they are text of a
/// reasonable size, else a note saying where they are.
fn print_result(r: &pb::JobResult) {
    let content_type = if r.content_type.is_empty() {
        "application/octet-stream"
    } else {
        &r.content_type
    };
    println!("result:    {content_type}, {} bytes", r.data.len());
    match result_text(&r.data) {
        Some(text) if !text.is_empty() => {
            for line in text.lines() {
                println!("  {line}");
            }
        }
        Some(_) => {}
        None => println!(
            "  (not shown: {}; `gantry get -o json` has the bytes)",
            if r.data.len() > SHOWN_RESULT_BYTES {
                "too long"
            } else {
                "not text"
            }
        ),
    }
}

/// A result's bytes as text to show, when they are UTF-8 without control characters (other
/// than newlines and tabs) and at most [`SHOWN_RESULT_BYTES`] long.
fn result_text(data: &[u8]) -> Option<&str> {
    if data.len() > SHOWN_RESULT_BYTES {
        return None;
    }
    let text = std::str::from_utf8(data).ok()?;
    let printable = text
        .chars()
        .all(|c| !c.is_control() || matches!(c, '\n' | '\t' | '\r'));
    printable.then_some(text)
}

/// `gantry cancel`.
pub async fn cancel(global: &Global, id: String, reason: String) -> Result<u8> {
    let mut c = Clients::connect(global).await?;
    let job = c
        .jobs
        .cancel_job(pb::CancelJobRequest { job_id: id, reason })
        .await
        .map_err(|s| c.error(&s))?
        .into_inner()
        .job
        .ok_or_else(|| CliError::new(1, "the server answered without the job"))?;
    match global.output {
        Output::Json => render::print_json(&render::job_json(&job)),
        Output::Table => println!("{} {}", job.id, render::status_name(job.status)),
    }
    Ok(0)
}

/// `gantry retry`.
pub async fn retry(global: &Global, id: String) -> Result<u8> {
    let mut c = Clients::connect(global).await?;
    let job = c
        .jobs
        .retry_job(pb::RetryJobRequest { job_id: id })
        .await
        .map_err(|s| c.error(&s))?
        .into_inner()
        .job
        .ok_or_else(|| CliError::new(1, "the server answered without the job"))?;
    match global.output {
        Output::Json => render::print_json(&render::job_json(&job)),
        Output::Table => println!("{}", job.id),
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_is_shown_when_it_is_short_text() {
        assert_eq!(result_text(b"{\"ok\": true}\n"), Some("{\"ok\": true}\n"));
        assert_eq!(result_text(b""), Some(""));
        assert_eq!(result_text(&[0xff, 0xfe]), None);
        assert_eq!(result_text(b"a\x00b"), None);
        assert_eq!(result_text(&vec![b'a'; SHOWN_RESULT_BYTES + 1]), None);
    }

    #[test]
    fn a_job_as_json_has_its_result_parent_inputs_and_artifacts() {
        let job = pb::Job {
            id: "j2".into(),
            parent_job_id: "j1".into(),
            result: Some(pb::JobResult {
                data: b"{\"n\": 1}".to_vec(),
                content_type: "application/json".into(),
                set_at_unix_ms: 5,
                attempt: 1,
            }),
            spec: Some(pb::JobSpec {
                inputs: vec![pb::Input {
                    path: "in.bin".into(),
                    source: Some(pb::input::Source::Artifact(pb::ArtifactRef {
                        job_id: "j0".into(),
                        name: "out.bin".into(),
                    })),
                }],
                artifacts: vec!["out/".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        let v = render::job_json(&job);
        assert_eq!(v["parent_job_id"], "j1");
        assert_eq!(v["result"]["content_type"], "application/json");
        assert_eq!(v["result"]["size"], 8);
        assert_eq!(v["result"]["data"], "{\"n\": 1}");
        assert_eq!(v["result"]["data_base64"], "eyJuIjogMX0=");
        assert_eq!(v["spec"]["inputs"][0]["path"], "in.bin");
        assert_eq!(v["spec"]["inputs"][0]["artifact"]["job_id"], "j0");
        assert!(v["spec"]["inputs"][0]["blob_digest"].is_null());
        assert_eq!(v["spec"]["artifacts"][0], "out/");
        let bare = render::job_json(&pb::Job::default());
        assert!(bare["result"].is_null() && bare["parent_job_id"].is_null());
    }
}
