//! Sandbox commands: `gantry sandbox create | ls | get | rm | watch`.
//!
//! A sandbox is a workspace a runner keeps for a sequence of commands (`gantry exec`, in
//! `exec.rs`). Its life is PENDING → CREATING → STARTING → RUNNING → DELETING → DELETED, or
//! FAILED; waiting for a step of it (`create --wait`, `rm --wait`) follows its event trail
//! from the sequence the last answer carried, so an old step is never taken for a new one.
use std::io::IsTerminal as _;

use gantry_proto as pb;
use tokio_stream::StreamExt as _;

use crate::{
    args::{self, Global, Output, SandboxCommand, SandboxCreateArgs, SandboxLsArgs, SandboxRmArgs},
    client::{CliError, Clients, Result, exit},
    follow,
    render::{self, Table},
};

/// `gantry sandbox …`.
pub async fn run(global: &Global, command: SandboxCommand) -> Result<u8> {
    match command {
        SandboxCommand::Create(a) => create(global, *a).await,
        SandboxCommand::Ls(a) => list(global, a).await,
        SandboxCommand::Get(a) => get(global, a.id).await,
        SandboxCommand::Rm(a) => rm(global, a).await,
        SandboxCommand::Watch(a) => watch(global, a.id).await,
    }
}

/// The request a `sandbox create` command line describes.
pub fn create_request(args: &SandboxCreateArgs) -> Result<pb::CreateSandboxRequest> {
    if args.image.is_none() && args.pull.is_some() {
        return Err(CliError::usage(
            "--pull applies to container sandboxes: add --image",
        ));
    }
    let mut spec = pb::SandboxSpec {
        queue: args.queue.clone().unwrap_or_default(),
        labels: args.labels.iter().cloned().collect(),
        env: args.env.iter().cloned().collect(),
        metadata: args.metadata.iter().cloned().collect(),
        working_dir: args.workdir.clone().unwrap_or_default(),
        lock_key: args.lock_key.clone().unwrap_or_default(),
        // Zero means the server's default; anything else goes as asked (the server names
        // the field when it is out of range).
        idle_timeout_seconds: args.idle_timeout.map_or(0, args::seconds_up),
        max_lifetime_seconds: args.lifetime.map_or(0, args::seconds_up),
        one_shot: args.one_shot,
        cancel_grace_seconds: args.grace.map_or(0, args::grace_seconds),
        inputs: args.inputs.clone(),
        artifacts: args.artifacts.clone(),
        ..Default::default()
    };
    if args.memory.is_some() || args.cpus.is_some() {
        spec.resources = Some(pb::Resources {
            memory_bytes: args.memory.unwrap_or(0),
            cpu_millis: args.cpus.unwrap_or(0),
        });
    }
    match &args.image {
        Some(image) => {
            spec.executor = pb::ExecutorKind::Docker as i32;
            spec.image = image.clone();
            if let Some(p) = args.pull {
                spec.pull_policy = pb::PullPolicy::from(p) as i32;
            }
        }
        None => spec.executor = pb::ExecutorKind::Process as i32,
    }
    Ok(pb::CreateSandboxRequest {
        spec: Some(spec),
        idempotency_key: args.idempotency_key.clone().unwrap_or_default(),
    })
}

/// `gantry sandbox create`.
async fn create(global: &Global, args: SandboxCreateArgs) -> Result<u8> {
    let request = create_request(&args)?;
    let mut c = Clients::connect(global).await?;
    let response = c
        .sandboxes
        .create_sandbox(request)
        .await
        .map_err(|s| c.error(&s))?
        .into_inner();
    let mut sandbox = response
        .sandbox
        .ok_or_else(|| CliError::new(exit::REFUSED, "the server answered without the sandbox"))?;
    if args.wait {
        if response.deduplicated && global.output == Output::Table {
            eprintln!(
                "sandbox {} (an earlier sandbox with this idempotency key)",
                sandbox.id
            );
        }
        sandbox = wait_running(&mut c, sandbox, global.output).await?;
    }
    match global.output {
        Output::Json => {
            let mut v = render::sandbox_json(&sandbox);
            if let Some(o) = v.as_object_mut() {
                o.insert("deduplicated".into(), response.deduplicated.into());
            }
            render::print_json(&v);
        }
        Output::Table => println!("{}", sandbox.id),
    }
    Ok(0)
}

/// What stopped a wait on a sandbox's trail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reached {
    /// It became RUNNING.
    Running,
    /// It ended (DELETED or FAILED).
    Ended,
}

/// What a lifecycle step means to a wait: `Some` when the wait is over.
fn reached(status: i32, until_running: bool) -> Option<Reached> {
    if render::sandbox_ended(status) {
        Some(Reached::Ended)
    } else if until_running && status == pb::SandboxStatus::Running as i32 {
        Some(Reached::Running)
    } else {
        None
    }
}

/// Follows the sandbox's trail after `sandbox.last_event_sequence` until it runs (when
/// `until_running`) or ends, and returns it as it is then. Lifecycle lines go to stderr when
/// it is a terminal (a wait on an image pull is long otherwise).
async fn follow_lifecycle(
    c: &mut Clients,
    sandbox: pb::Sandbox,
    until_running: bool,
    output: Output,
) -> Result<pb::Sandbox> {
    if reached(sandbox.status, until_running).is_some() {
        return Ok(sandbox);
    }
    let show = output == Output::Table && std::io::stderr().is_terminal();
    let mut events = c
        .sandboxes
        .watch_sandbox(pb::WatchSandboxRequest {
            sandbox_id: sandbox.id.clone(),
            after_sequence: sandbox.last_event_sequence,
            follow: true,
        })
        .await
        .map_err(|s| c.error(&s))?
        .into_inner();
    let mut seen = None;
    while let Some(e) = events.next().await {
        let e = e.map_err(|s| c.error(&s))?;
        if show && let Some(line) = follow::event_line(&e) {
            eprintln!("{line}");
        }
        if let Some(pb::job_event::Kind::Sandbox(change)) = &e.kind {
            seen = reached(change.to, until_running);
            if seen.is_some() {
                break;
            }
        }
    }
    let now = c.sandbox(sandbox.id.clone()).await?;
    // A step seen on the trail counts even when the sandbox moved on since (a one-shot one
    // may be deleting already); without one, the stream was cut and the sandbox decides.
    if seen.is_none() && reached(now.status, until_running).is_none() {
        return Err(CliError::new(
            exit::UNREACHABLE,
            format!(
                "the server ended the stream while sandbox {} is {}; run `gantry sandbox watch {}`",
                now.id,
                render::sandbox_status_name(now.status),
                now.id
            ),
        ));
    }
    Ok(now)
}

/// Waits until the sandbox runs; an ending first is an error (exit 125) with its reason.
async fn wait_running(
    c: &mut Clients,
    sandbox: pb::Sandbox,
    output: Output,
) -> Result<pb::Sandbox> {
    let id = sandbox.id.clone();
    let sandbox = follow_lifecycle(c, sandbox, true, output).await?;
    if render::sandbox_ended(sandbox.status) {
        return Err(not_running(&id, &sandbox));
    }
    Ok(sandbox)
}

/// The error for a sandbox that ended before it ran.
fn not_running(id: &str, sandbox: &pb::Sandbox) -> CliError {
    CliError::new(
        exit::NO_EXIT_CODE,
        format!(
            "sandbox {id} ended before it ran: {}",
            render::sandbox_outcome_line(sandbox)
        ),
    )
}

/// The request a `sandbox ls` command line describes.
pub fn list_request(args: &SandboxLsArgs) -> pb::ListSandboxesRequest {
    pb::ListSandboxesRequest {
        statuses: args
            .statuses
            .iter()
            .map(|s| pb::SandboxStatus::from(*s) as i32)
            .collect(),
        queue: args.queue.clone().unwrap_or_default(),
        runner_id: args.runner.clone().unwrap_or_default(),
        page_size: args.limit,
        page_token: args.page_token.clone().unwrap_or_default(),
    }
}

/// `gantry sandbox ls`.
async fn list(global: &Global, args: SandboxLsArgs) -> Result<u8> {
    let mut c = Clients::connect(global).await?;
    let response = c
        .sandboxes
        .list_sandboxes(list_request(&args))
        .await
        .map_err(|s| c.error(&s))?
        .into_inner();
    match global.output {
        Output::Json => render::print_json(&serde_json::json!({
            "sandboxes": response.sandboxes.iter().map(render::sandbox_json).collect::<Vec<_>>(),
            "next_page_token": (!response.next_page_token.is_empty()).then_some(&response.next_page_token),
        })),
        Output::Table => {
            let colour = render::colour();
            let mut t = Table::new(&["ID", "STATUS", "EXECUTOR", "RUNNER", "COMMANDS", "AGE"]);
            for sb in &response.sandboxes {
                let spec = sb.spec.clone().unwrap_or_default();
                t.row(vec![
                    render::cell(sb.id.clone()),
                    render::sandbox_status_cell(sb.status, colour),
                    render::cell(render::sandbox_executor(&spec)),
                    render::cell(if sb.runner_id.is_empty() {
                        "-".into()
                    } else {
                        sb.runner_id.clone()
                    }),
                    render::cell(sb.command_count.to_string()),
                    render::cell(render::ago(sb.created_at_unix_ms)),
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

/// A sandbox's commands, oldest first (every page).
async fn commands(c: &mut Clients, sandbox_id: &str) -> Result<Vec<pb::SandboxCommand>> {
    let mut commands = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = c
            .sandboxes
            .list_commands(pb::ListCommandsRequest {
                sandbox_id: sandbox_id.to_string(),
                page_size: 1000,
                page_token,
            })
            .await
            .map_err(|s| c.error(&s))?
            .into_inner();
        commands.extend(page.commands);
        if page.next_page_token.is_empty() {
            return Ok(commands);
        }
        page_token = page.next_page_token;
    }
}

/// `gantry sandbox get`.
async fn get(global: &Global, id: String) -> Result<u8> {
    let mut c = Clients::connect(global).await?;
    let sandbox = c.sandbox(id).await?;
    let commands = commands(&mut c, &sandbox.id).await?;
    print_sandbox(&sandbox, &commands, global.output);
    Ok(0)
}

/// Prints a sandbox in full, with its commands.
fn print_sandbox(sb: &pb::Sandbox, commands: &[pb::SandboxCommand], output: Output) {
    if output == Output::Json {
        let mut v = render::sandbox_json(sb);
        if let Some(o) = v.as_object_mut() {
            o.insert(
                "commands".into(),
                commands.iter().map(render::command_json).collect(),
            );
        }
        render::print_json(&v);
        return;
    }
    let colour = render::colour();
    let spec = sb.spec.clone().unwrap_or_default();
    println!("id:        {}", sb.id);
    println!(
        "status:    {}",
        render::paint_sandbox_status(sb.status, &render::sandbox_outcome_line(sb), colour)
    );
    println!("executor:  {}", render::sandbox_executor(&spec));
    println!("queue:     {}", spec.queue);
    if !spec.labels.is_empty() {
        let mut labels: Vec<_> = spec
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        labels.sort();
        println!("labels:    {}", labels.join(","));
    }
    if !spec.working_dir.is_empty() {
        println!("workdir:   {}", spec.working_dir);
    }
    if !spec.lock_key.is_empty() {
        println!("lock:      {}", spec.lock_key);
    }
    if !spec.inputs.is_empty() {
        let inputs: Vec<_> = spec.inputs.iter().map(render::input_line).collect();
        println!("inputs:    {}", inputs.join(", "));
    }
    if !spec.artifacts.is_empty() {
        println!("artifacts: {}", spec.artifacts.join(", "));
    }
    if !sb.runner_id.is_empty() {
        println!("runner:    {}", sb.runner_id);
    }
    if !sb.container_id.is_empty() {
        println!("container: {}", sb.container_id);
    }
    println!(
        "limits:    idle {}, lifetime {}, grace {}{}",
        render::span(i64::from(spec.idle_timeout_seconds)),
        render::span(i64::from(spec.max_lifetime_seconds)),
        render::span(i64::from(spec.cancel_grace_seconds)),
        if spec.one_shot { ", one-shot" } else { "" }
    );
    println!("created:   {} ago", render::ago(sb.created_at_unix_ms));
    if sb.finished_at_unix_ms != 0 {
        println!("ended:     {} ago", render::ago(sb.finished_at_unix_ms));
    } else if sb.expires_at_unix_ms != 0 {
        println!("expires:   in {}", render::until(sb.expires_at_unix_ms));
    }
    if !commands.is_empty() {
        println!();
        let mut t = Table::new(&["#", "ID", "STATUS", "EXIT", "AGE", "COMMAND", "WHY"]);
        for cmd in commands {
            let argv = cmd.spec.clone().unwrap_or_default().argv;
            t.row(vec![
                render::cell(cmd.number.to_string()),
                render::cell(cmd.id.clone()),
                render::command_status_cell(cmd.status, colour),
                render::cell(cmd.exit_code.map_or_else(|| "-".into(), |c| c.to_string())),
                render::cell(render::ago(cmd.created_at_unix_ms)),
                render::cell(render::short_line(&argv)),
                render::cell(cmd.failure_message.clone()),
            ]);
        }
        t.print();
    }
}

/// `gantry sandbox rm`: exits 0 once the sandbox was deleted (or, with --wait, has ended,
/// DELETED or FAILED; the line printed says which).
async fn rm(global: &Global, args: SandboxRmArgs) -> Result<u8> {
    let mut c = Clients::connect(global).await?;
    let mut sandbox = c
        .sandboxes
        .delete_sandbox(pb::DeleteSandboxRequest {
            sandbox_id: args.id,
            reason: args.reason,
        })
        .await
        .map_err(|s| c.error(&s))?
        .into_inner()
        .sandbox
        .ok_or_else(|| CliError::new(exit::REFUSED, "the server answered without the sandbox"))?;
    if args.wait {
        sandbox = follow_lifecycle(&mut c, sandbox, false, global.output).await?;
    }
    match global.output {
        Output::Json => render::print_json(&render::sandbox_json(&sandbox)),
        Output::Table => println!(
            "{} {}",
            sandbox.id,
            render::paint_sandbox_status(
                sandbox.status,
                &render::sandbox_outcome_line(&sandbox),
                render::colour()
            )
        ),
    }
    Ok(0)
}

/// What the live bar of `sandbox watch` shows: the command that runs, else the sandbox.
#[derive(Debug, Default)]
struct BarState {
    /// The sandbox's latest status.
    sandbox: i32,
    /// The number of the command running now, if one does.
    running: Option<u32>,
}

impl BarState {
    /// Takes in a lifecycle or command event; returns the bar's new prefix when it changes
    /// (and its progress restarts from zero).
    fn apply(&mut self, kind: &pb::job_event::Kind) -> Option<String> {
        match kind {
            pb::job_event::Kind::Sandbox(s) => {
                self.sandbox = s.to;
                self.running.is_none().then(|| self.prefix())
            }
            // Progress comes from the command that runs; a bar that missed its start
            // (its RUNNING step dropped by a storage limit) takes it up here.
            pb::job_event::Kind::Command(u) if u.progress.is_some() => {
                if self.running == Some(u.number) {
                    return None;
                }
                self.running = Some(u.number);
                Some(self.prefix())
            }
            pb::job_event::Kind::Command(u) => {
                if u.status == pb::CommandStatus::Running as i32 {
                    self.running = Some(u.number);
                } else if render::command_ended(u.status) && self.running == Some(u.number) {
                    self.running = None;
                } else {
                    return None;
                }
                Some(self.prefix())
            }
            _ => None,
        }
    }

    fn prefix(&self) -> String {
        match self.running {
            Some(n) => format!("command {n}"),
            None => render::sandbox_status_name(self.sandbox),
        }
    }
}

/// `gantry sandbox watch`: lifecycle steps, phases and command changes as lines, the
/// running command's progress as a bar (on a terminal), until the sandbox ends; exits 0
/// when it ended DELETED, 125 when FAILED.
async fn watch(global: &Global, id: String) -> Result<u8> {
    let mut c = Clients::connect(global).await?;
    let mut events = c
        .sandboxes
        .watch_sandbox(pb::WatchSandboxRequest {
            sandbox_id: id.clone(),
            after_sequence: 0,
            follow: true,
        })
        .await
        .map_err(|s| c.error(&s))?
        .into_inner();
    let live = global.output == Output::Table && std::io::stderr().is_terminal();
    let bar = live.then(|| follow::live_bar("pending"));
    let mut state = BarState::default();
    while let Some(e) = events.next().await {
        let e = match e {
            Ok(e) => e,
            Err(s) => {
                if let Some(bar) = &bar {
                    bar.abandon();
                }
                return Err(c.error(&s));
            }
        };
        if global.output == Output::Json {
            println!("{}", render::sandbox_event_json(&e));
            continue;
        }
        let Some(bar) = &bar else {
            if let Some(line) = follow::event_line(&e) {
                println!("{line}");
            }
            continue;
        };
        let Some(kind) = &e.kind else { continue };
        if let Some(prefix) = state.apply(kind) {
            bar.set_prefix(prefix);
            bar.set_position(0);
            bar.set_message("");
        }
        match kind {
            pb::job_event::Kind::Command(pb::CommandUpdate {
                progress: Some(p), ..
            }) => follow::show_progress(bar, p),
            _ => {
                if let Some(line) = follow::event_line(&e) {
                    bar.println(line);
                }
            }
        }
    }
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let sandbox = c.sandbox(id.clone()).await?;
    if !render::sandbox_ended(sandbox.status) {
        return Err(CliError::new(
            exit::UNREACHABLE,
            format!(
                "the server ended the stream before sandbox {id} ended (it is {}); run `gantry sandbox watch {id}` again",
                render::sandbox_status_name(sandbox.status)
            ),
        ));
    }
    if global.output == Output::Table {
        println!(
            "sandbox {} {}",
            sandbox.id,
            render::paint_sandbox_status(
                sandbox.status,
                &render::sandbox_outcome_line(&sandbox),
                render::colour()
            )
        );
    }
    Ok(sandbox_exit_code(&sandbox))
}

/// The exit status of `sandbox watch` for an ended sandbox.
fn sandbox_exit_code(sb: &pb::Sandbox) -> u8 {
    if sb.status == pb::SandboxStatus::Failed as i32 {
        exit::NO_EXIT_CODE
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::args::{Cli, Command};

    fn sandbox_command(line: &[&str]) -> SandboxCommand {
        let cli = Cli::try_parse_from(
            ["gantry", "sandbox"]
                .into_iter()
                .chain(line.iter().copied()),
        )
        .unwrap_or_else(|e| panic!("{line:?}: {e}"));
        match cli.command {
            Command::Sandbox(s) => s,
            other => panic!("not sandbox: {other:?}"),
        }
    }

    fn create_args(line: &[&str]) -> SandboxCreateArgs {
        match sandbox_command(&[&["create"], line].concat()) {
            SandboxCommand::Create(a) => *a,
            other => panic!("not create: {other:?}"),
        }
    }

    fn change(from: pb::SandboxStatus, to: pb::SandboxStatus) -> pb::job_event::Kind {
        pb::job_event::Kind::Sandbox(pb::SandboxChange {
            from: from as i32,
            to: to as i32,
            ..Default::default()
        })
    }

    fn update(number: u32, status: pb::CommandStatus, percent: Option<u32>) -> pb::job_event::Kind {
        pb::job_event::Kind::Command(pb::CommandUpdate {
            command_id: format!("c{number}"),
            number,
            status: status as i32,
            progress: percent.map(|percent| pb::Progress {
                percent,
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    #[test]
    fn a_docker_sandbox_command_line_becomes_the_request() {
        let request = create_request(&create_args(&[
            "--image",
            "alpine:3",
            "--env",
            "A=1",
            "--workdir",
            "/src",
            "--queue",
            "gpu",
            "--label",
            "zone=b",
            "--meta",
            "team=x",
            "--memory",
            "512m",
            "--cpus",
            "1.5",
            "--lock-key",
            "db",
            "--idle-timeout",
            "90",
            "--lifetime",
            "2h",
            "--one-shot",
            "--pull-policy",
            "always",
            "--grace",
            "5s",
            "--idempotency-key",
            "k1",
        ]))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(request.idempotency_key, "k1");
        let spec = request.spec.unwrap_or_default();
        assert_eq!(spec.executor, pb::ExecutorKind::Docker as i32);
        assert_eq!(spec.image, "alpine:3");
        assert_eq!(spec.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(spec.working_dir, "/src");
        assert_eq!(spec.queue, "gpu");
        assert_eq!(spec.labels.get("zone").map(String::as_str), Some("b"));
        assert_eq!(spec.metadata.get("team").map(String::as_str), Some("x"));
        assert_eq!(
            spec.resources,
            Some(pb::Resources {
                memory_bytes: 512 << 20,
                cpu_millis: 1500
            })
        );
        assert_eq!(spec.lock_key, "db");
        assert_eq!(spec.idle_timeout_seconds, 90);
        assert_eq!(spec.max_lifetime_seconds, 7200);
        assert!(spec.one_shot);
        assert_eq!(spec.pull_policy, pb::PullPolicy::Always as i32);
        assert_eq!(spec.cancel_grace_seconds, 5);
    }

    #[test]
    fn a_sandbox_takes_inputs_and_artifacts() {
        let request = create_request(&create_args(&[
            "--input",
            "in/data.csv=j1:out/data.csv",
            "--artifact",
            "results/",
        ]))
        .unwrap_or_else(|e| panic!("{e}"));
        let spec = request.spec.unwrap_or_default();
        assert_eq!(
            spec.inputs,
            [pb::Input {
                path: "in/data.csv".into(),
                source: Some(pb::input::Source::Artifact(pb::ArtifactRef {
                    job_id: "j1".into(),
                    name: "out/data.csv".into(),
                })),
            }]
        );
        assert_eq!(spec.artifacts, ["results/"]);
    }

    #[test]
    fn a_bare_sandbox_is_a_process_one_with_the_servers_defaults() {
        for line in [&[][..], &["--process"]] {
            let request = create_request(&create_args(line)).unwrap_or_else(|e| panic!("{e}"));
            let spec = request.spec.unwrap_or_default();
            assert_eq!(spec.executor, pb::ExecutorKind::Process as i32);
            assert!(spec.image.is_empty() && spec.resources.is_none());
            assert_eq!(
                (
                    spec.idle_timeout_seconds,
                    spec.max_lifetime_seconds,
                    spec.cancel_grace_seconds
                ),
                (0, 0, 0)
            );
            assert!(!spec.one_shot);
            assert_eq!(spec.pull_policy, pb::PullPolicy::Unspecified as i32);
        }
    }

    #[test]
    fn contradictions_are_refused_before_any_request() {
        let parse = |line: &[&str]| {
            Cli::try_parse_from(
                ["gantry", "sandbox", "create"]
                    .into_iter()
                    .chain(line.iter().copied()),
            )
        };
        assert!(parse(&["--image", "alpine", "--process"]).is_err());
        assert!(parse(&["--idle-timeout", "soon"]).is_err());
        let pull_without_image = create_request(&create_args(&["--pull", "never"]));
        assert!(
            matches!(&pull_without_image, Err(e) if e.code == exit::USAGE),
            "{pull_without_image:?}"
        );
    }

    #[test]
    fn ls_filters_become_the_request() {
        let SandboxCommand::Ls(args) = sandbox_command(&[
            "ls", "--status", "running", "--status", "failed", "--queue", "q", "--runner", "r1",
            "--limit", "10",
        ]) else {
            panic!("not ls");
        };
        let request = list_request(&args);
        assert_eq!(
            request.statuses,
            [
                pb::SandboxStatus::Running as i32,
                pb::SandboxStatus::Failed as i32
            ]
        );
        assert_eq!(
            (
                request.queue.as_str(),
                request.runner_id.as_str(),
                request.page_size
            ),
            ("q", "r1", 10)
        );
        assert!(matches!(sandbox_command(&["list"]), SandboxCommand::Ls(_)));
        assert!(matches!(
            sandbox_command(&["delete", "s1", "--wait"]),
            SandboxCommand::Rm(SandboxRmArgs { wait: true, .. })
        ));
    }

    #[test]
    fn a_wait_ends_on_the_step_it_waits_for_or_on_an_ending() {
        use pb::SandboxStatus as S;
        for (status, until_running, expected) in [
            (S::Pending, true, None),
            (S::Starting, true, None),
            (S::Running, true, Some(Reached::Running)),
            (S::Running, false, None),
            (S::Deleting, false, None),
            (S::Deleted, true, Some(Reached::Ended)),
            (S::Failed, false, Some(Reached::Ended)),
        ] {
            assert_eq!(
                reached(status as i32, until_running),
                expected,
                "{status:?} {until_running}"
            );
        }
    }

    #[test]
    fn the_bar_follows_the_running_command_then_the_sandbox() {
        use pb::{CommandStatus as C, SandboxStatus as S};
        let mut bar = BarState::default();
        assert_eq!(
            bar.apply(&change(S::Pending, S::Creating)).as_deref(),
            Some("creating")
        );
        assert_eq!(
            bar.apply(&change(S::Starting, S::Running)).as_deref(),
            Some("running")
        );
        // A queued command leaves the bar as it is; its start takes it over.
        assert_eq!(bar.apply(&update(1, C::Queued, None)), None);
        assert_eq!(
            bar.apply(&update(1, C::Running, None)).as_deref(),
            Some("command 1")
        );
        assert_eq!(bar.apply(&update(1, C::Running, Some(40))), None);
        // The next command queued meanwhile does not take the bar from the running one.
        assert_eq!(bar.apply(&update(2, C::Queued, None)), None);
        assert_eq!(
            bar.apply(&update(1, C::Succeeded, None)).as_deref(),
            Some("running")
        );
        // Progress of a command whose start the bar missed takes it up.
        assert_eq!(
            bar.apply(&update(2, C::Running, Some(10))).as_deref(),
            Some("command 2")
        );
        // A lifecycle step while a command runs keeps the command on the bar.
        assert_eq!(bar.apply(&change(S::Running, S::Deleting)), None);
        assert_eq!(
            bar.apply(&update(2, C::Canceled, None)).as_deref(),
            Some("deleting")
        );
    }

    #[test]
    fn watch_exits_0_for_deleted_and_125_for_failed() {
        let sb = |status: pb::SandboxStatus| pb::Sandbox {
            status: status as i32,
            ..Default::default()
        };
        assert_eq!(sandbox_exit_code(&sb(pb::SandboxStatus::Deleted)), 0);
        assert_eq!(sandbox_exit_code(&sb(pb::SandboxStatus::Failed)), 125);
    }

    #[test]
    fn a_sandbox_that_ended_before_it_ran_says_why() {
        let sb = pb::Sandbox {
            status: pb::SandboxStatus::Failed as i32,
            failure_kind: pb::FailureKind::ImageUnavailable as i32,
            message: "no such image: nope:1".into(),
            ..Default::default()
        };
        let e = not_running("s1", &sb);
        assert_eq!(e.code, 125);
        assert_eq!(
            e.message,
            "sandbox s1 ended before it ran: failed (image_unavailable): no such image: nope:1"
        );
    }
}
