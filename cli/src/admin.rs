//! Operator commands: runners, drain, stats.
use gantry_proto as pb;

use crate::{
    args::{DrainArgs, Global, Output, RunnersArgs},
    client::{Clients, Result},
    render::{self, Table},
};

/// `gantry runners`.
pub async fn runners(global: &Global, args: RunnersArgs) -> Result<u8> {
    let mut c = Clients::connect(global).await?;
    let mut runners = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = c
            .admin
            .list_runners(pb::ListRunnersRequest {
                states: args
                    .states
                    .iter()
                    .map(|s| pb::RunnerState::from(*s) as i32)
                    .collect(),
                page_size: 500,
                page_token,
            })
            .await
            .map_err(|s| c.error(&s))?
            .into_inner();
        runners.extend(page.runners);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    match global.output {
        Output::Json => render::print_json(&serde_json::json!({
            "runners": runners.iter().map(render::runner_json).collect::<Vec<_>>(),
        })),
        Output::Table => {
            let mut t = Table::new(&["ID", "NAME", "STATE", "JOBS", "EXECUTORS", "LABELS", "SEEN"]);
            for r in &runners {
                let v = render::runner_json(r);
                let executors = v["executors"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|e| e.as_str())
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or_default();
                let mut labels: Vec<String> =
                    r.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                labels.sort();
                t.plain(vec![
                    r.id.clone(),
                    r.name.clone(),
                    v["state"].as_str().unwrap_or("?").to_string(),
                    format!("{}/{}", r.active_jobs, r.capacity),
                    executors,
                    labels.join(","),
                    format!("{} ago", render::ago(r.last_heartbeat_unix_ms)),
                ]);
            }
            t.print();
        }
    }
    Ok(0)
}

/// `gantry drain`.
pub async fn drain(global: &Global, args: DrainArgs) -> Result<u8> {
    let mut c = Clients::connect(global).await?;
    let runner = c
        .admin
        .drain_runner(pb::DrainRunnerRequest {
            runner_id: args.runner,
            reason: args.reason,
        })
        .await
        .map_err(|s| c.error(&s))?
        .into_inner();
    match global.output {
        Output::Json => render::print_json(&render::runner_json(&runner)),
        Output::Table => println!(
            "{} {}",
            runner.id,
            render::runner_json(&runner)["state"]
                .as_str()
                .unwrap_or("?")
        ),
    }
    Ok(0)
}

/// `gantry stats`.
pub async fn stats(global: &Global) -> Result<u8> {
    let mut c = Clients::connect(global).await?;
    let stats = c
        .admin
        .get_stats(pb::GetStatsRequest {})
        .await
        .map_err(|s| c.error(&s))?
        .into_inner();
    let v = render::stats_json(&stats);
    match global.output {
        Output::Json => render::print_json(&v),
        Output::Table => {
            let counts = |key: &str| {
                v[key]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, n)| format!("{k} {n}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "none".into())
            };
            println!("jobs:    {}", counts("jobs_by_status"));
            println!("runners: {}", counts("runners_by_state"));
            if !stats.queues.is_empty() {
                println!();
                let mut t = Table::new(&["QUEUE", "QUEUED", "ACTIVE"]);
                for q in &stats.queues {
                    t.plain(vec![
                        q.queue.clone(),
                        q.queued.to_string(),
                        q.active.to_string(),
                    ]);
                }
                t.print();
            }
        }
    }
    Ok(0)
}
