//! Job commands: submit, jobs, get, cancel, retry.
use gantry_proto as pb;

use crate::{
    args::{self, Global, JobsArgs, Output, SubmitArgs},
    client::{CliError, Clients, Result},
    follow,
    render::{self, Table},
};

/// The job spec a `submit` command line describes.
pub fn spec(args: &SubmitArgs) -> pb::JobSpec {
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
    spec
}

/// `gantry submit`.
pub async fn submit(global: &Global, args: SubmitArgs) -> Result<u8> {
    if args.image.is_none() && (args.entrypoint.is_some() || args.pull.is_some()) {
        return Err(CliError::usage(
            "--entrypoint and --pull apply to container jobs: add --image",
        ));
    }
    let mut c = Clients::connect(global).await?;
    let response = c
        .jobs
        .submit_job(pb::SubmitJobRequest {
            spec: Some(spec(&args)),
        })
        .await
        .map_err(|s| c.error(&s))?
        .into_inner();
    let job = response
        .job
        .ok_or_else(|| CliError::new(1, "the server answered without the job"))?;
    if !(args.wait || args.follow) {
        match global.output {
            Output::Json => {
                let mut v = render::job_json(&job);
                if let Some(o) = v.as_object_mut() {
                    o.insert("deduplicated".into(), response.deduplicated.into());
                }
                render::print_json(&v);
            }
            Output::Table => println!("{}", job.id),
        }
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
    println!("created:   {} ago", render::ago(job.created_at_unix_ms));
    if !job.retried_from_job_id.is_empty() {
        println!("retry of:  {}", job.retried_from_job_id);
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
