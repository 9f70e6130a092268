//! `gantry exec`: runs a command in a sandbox and relays it as if it ran here — its output
//! as it comes (stdout to stdout, stderr to stderr, the bytes as they are), then its exit
//! status as ours.
//!
//! Exit status: the command's exit code; 124 when it timed out, 125 when it failed without
//! an exit code of its own (e.g. its sandbox's runner was lost), 130 when it was canceled —
//! each of these three with a line on stderr saying how it ended. Ctrl-C cancels the command
//! once (CancelSandboxCommand) and keeps relaying its output until it has ended; a second
//! Ctrl-C stops waiting at once, with 130.
use std::{io::Read, path::Path};

use gantry_proto as pb;
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::StreamExt as _;

use crate::{
    args::{self, ExecArgs, Global, Output},
    client::{CliError, Clients, Result, exit, from_status},
    follow::{self, Ended},
    render,
};

/// Bytes a command's standard input may hold (the proto's `CommandSpec.stdin`).
pub const STDIN_LIMIT: usize = 1 << 20;

/// Reads all of `from`, which may hold at most [`STDIN_LIMIT`] bytes; `what` names it in
/// errors.
pub fn read_stdin(from: impl Read, what: &str) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    from.take(STDIN_LIMIT as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| CliError::usage(format!("{what}: {e}")))?;
    if bytes.len() > STDIN_LIMIT {
        return Err(CliError::usage(format!(
            "{what}: more than 1 MiB (a command's standard input is at most {STDIN_LIMIT} bytes)"
        )));
    }
    Ok(bytes)
}

/// The standard input the command line asks for: a file's, ours, or none.
fn stdin_of(args: &ExecArgs) -> Result<Vec<u8>> {
    if let Some(path) = &args.stdin_file {
        let what = format!("--stdin-file {}", path.display());
        let file = std::fs::File::open(Path::new(path))
            .map_err(|e| CliError::usage(format!("{what}: {e}")))?;
        read_stdin(file, &what)
    } else if args.stdin {
        read_stdin(std::io::stdin().lock(), "--stdin")
    } else {
        Ok(Vec::new())
    }
}

/// The request an `exec` command line describes, with `stdin` for the command.
pub fn run_request(args: &ExecArgs, stdin: Vec<u8>) -> pb::RunCommandRequest {
    pb::RunCommandRequest {
        sandbox_id: args.sandbox.clone(),
        command: Some(pb::CommandSpec {
            argv: args.command.clone(),
            env: args.env.iter().cloned().collect(),
            working_dir: args.workdir.clone().unwrap_or_default(),
            // Zero means the server's default (one hour).
            timeout_seconds: args.timeout.map_or(0, args::seconds_up),
            stdin,
            idempotency_key: args.idempotency_key.clone().unwrap_or_default(),
        }),
    }
}

/// How a command that ended stands as an exit status.
pub fn command_exit_code(cmd: &pb::SandboxCommand) -> u8 {
    match pb::CommandStatus::try_from(cmd.status).unwrap_or_default() {
        pb::CommandStatus::Succeeded => Ended::Succeeded,
        pb::CommandStatus::Canceled => Ended::Canceled,
        pb::CommandStatus::TimedOut => Ended::TimedOut,
        _ => Ended::Failed(cmd.exit_code),
    }
    .exit_code()
}

/// What to say on stderr about how a command ended: nothing when it succeeded or just exited
/// non-zero (its exit status says it, as a local program's would), else how it ended.
pub fn ending_note(cmd: &pb::SandboxCommand) -> Option<String> {
    let plain_exit = cmd.status == pb::CommandStatus::Failed as i32
        && cmd.exit_code.is_some()
        && matches!(
            pb::FailureKind::try_from(cmd.failure_kind),
            Ok(pb::FailureKind::ExitNonzero | pb::FailureKind::Unspecified)
        );
    if cmd.status == pb::CommandStatus::Succeeded as i32 || plain_exit {
        return None;
    }
    Some(format!(
        "command {}: {}",
        cmd.id,
        render::command_outcome_line(cmd)
    ))
}

/// What a Ctrl-C does while `exec` relays a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OnCtrlC {
    /// Cancel the command and keep relaying its output until it ends.
    Cancel,
    /// Stop waiting at once.
    StopWaiting,
}

/// The Ctrl-Cs seen so far: the first cancels, any further one stops waiting.
#[derive(Debug, Default)]
struct CtrlC {
    pressed: bool,
}

impl CtrlC {
    fn press(&mut self) -> OnCtrlC {
        if std::mem::replace(&mut self.pressed, true) {
            OnCtrlC::StopWaiting
        } else {
            OnCtrlC::Cancel
        }
    }
}

/// `gantry exec`.
pub async fn run(global: &Global, args: ExecArgs) -> Result<u8> {
    // Read before connecting: a bad --stdin-file costs no request.
    let stdin = stdin_of(&args)?;
    let mut c = Clients::connect(global).await?;
    let response = c
        .sandboxes
        .run_command(run_request(&args, stdin))
        .await
        .map_err(|s| c.error(&s))?
        .into_inner();
    let cmd = response
        .command
        .ok_or_else(|| CliError::new(exit::REFUSED, "the server answered without the command"))?;
    if args.detach {
        match global.output {
            Output::Json => {
                let mut v = render::command_json(&cmd);
                if let Some(o) = v.as_object_mut() {
                    o.insert("deduplicated".into(), response.deduplicated.into());
                }
                render::print_json(&v);
            }
            Output::Table => println!("{}", cmd.id),
        }
        return Ok(0);
    }
    if response.deduplicated {
        eprintln!(
            "command {} (an earlier command with this idempotency key)",
            cmd.id
        );
    }
    if !relay(&mut c, &cmd, global.output).await? {
        return Ok(exit::CANCELED);
    }
    let ended = c.command(cmd.id.clone()).await?;
    if !render::command_ended(ended.status) {
        return Err(CliError::new(
            exit::UNREACHABLE,
            format!(
                "the server ended the output before command {} finished (it is {}); `gantry sandbox get {}` shows it",
                ended.id,
                render::command_status_name(ended.status),
                ended.sandbox_id
            ),
        ));
    }
    match global.output {
        // One line, like the NDJSON output before it.
        Output::Json => println!("{}", render::command_json(&ended)),
        Output::Table => {
            if let Some(note) = ending_note(&ended) {
                eprintln!("{note}");
            }
        }
    }
    Ok(command_exit_code(&ended))
}

/// Relays the command's output until the server ends it (the command ended). Returns false
/// when a second Ctrl-C stopped the waiting first.
async fn relay(c: &mut Clients, cmd: &pb::SandboxCommand, output: Output) -> Result<bool> {
    // From here on Ctrl-C is ours: the command was accepted, and leaving would not stop it.
    let mut interrupts = signal(SignalKind::interrupt())
        .map_err(|e| CliError::new(exit::REFUSED, format!("cannot handle Ctrl-C: {e}")))?;
    let mut ctrl_c = CtrlC::default();
    let mut chunks = c
        .sandboxes
        .get_command_logs(pb::GetCommandLogsRequest {
            command_id: cmd.id.clone(),
            follow: true,
            ..Default::default()
        })
        .await
        .map_err(|s| c.error(&s))?
        .into_inner();
    loop {
        tokio::select! {
            chunk = chunks.next() => match chunk {
                Some(Ok(chunk)) => follow::print_chunk(&chunk, output),
                Some(Err(s)) => return Err(c.error(&s)),
                None => return Ok(true),
            },
            _ = interrupts.recv() => match ctrl_c.press() {
                OnCtrlC::Cancel => {
                    eprintln!("canceling command {} (Ctrl-C again to stop waiting)", cmd.id);
                    cancel(c, &cmd.id);
                }
                OnCtrlC::StopWaiting => {
                    eprintln!(
                        "stopped waiting for command {}; `gantry sandbox get {}` shows how it ends",
                        cmd.id, cmd.sandbox_id
                    );
                    return Ok(false);
                }
            },
        }
    }
}

/// Asks the server to cancel the command, without holding up the relay of its output (a
/// second Ctrl-C must not wait for the answer).
fn cancel(c: &Clients, id: &str) {
    let mut client = c.sandboxes.clone();
    let server = c.server.clone();
    let request = pb::CancelSandboxCommandRequest {
        command_id: id.to_string(),
        reason: "Ctrl-C in gantry exec".into(),
    };
    tokio::spawn(async move {
        match client.cancel_sandbox_command(request).await {
            Ok(_) => {}
            // It ended meanwhile: its output ends as well, and its status says how.
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {}
            Err(s) => eprintln!("error: canceling: {}", from_status(&server, &s)),
        }
    });
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::args::{Cli, Command};

    fn exec_args(line: &[&str]) -> ExecArgs {
        let cli = Cli::try_parse_from(std::iter::once("gantry").chain(line.iter().copied()))
            .unwrap_or_else(|e| panic!("{line:?}: {e}"));
        match cli.command {
            Command::Exec(a) => a,
            other => panic!("not exec: {other:?}"),
        }
    }

    fn command(
        status: pb::CommandStatus,
        kind: pb::FailureKind,
        exit_code: Option<i32>,
    ) -> pb::SandboxCommand {
        pb::SandboxCommand {
            id: "c1".into(),
            status: status as i32,
            failure_kind: kind as i32,
            exit_code,
            ..Default::default()
        }
    }

    #[test]
    fn the_command_line_becomes_the_request() {
        let args = exec_args(&[
            "exec",
            "sb1",
            "-e",
            "A=1",
            "--env",
            "B=x=y",
            "--workdir",
            "/src",
            "--timeout",
            "1500ms",
            "--idempotency-key",
            "k",
            "--",
            "sh",
            "-c",
            "echo hi",
        ]);
        let request = run_request(&args, b"in".to_vec());
        assert_eq!(request.sandbox_id, "sb1");
        let spec = request.command.unwrap_or_default();
        assert_eq!(spec.argv, ["sh", "-c", "echo hi"]);
        assert_eq!(spec.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(spec.env.get("B").map(String::as_str), Some("x=y"));
        assert_eq!(spec.working_dir, "/src");
        assert_eq!(spec.timeout_seconds, 2);
        assert_eq!(spec.stdin, b"in");
        assert_eq!(spec.idempotency_key, "k");

        let bare = run_request(&exec_args(&["exec", "sb1", "--", "true"]), Vec::new());
        let spec = bare.command.unwrap_or_default();
        assert_eq!(spec.timeout_seconds, 0, "the server's default");
        assert!(spec.stdin.is_empty() && spec.working_dir.is_empty());
    }

    #[test]
    fn the_command_line_is_checked() {
        let parse = |line: &[&str]| {
            Cli::try_parse_from(std::iter::once("gantry").chain(line.iter().copied()))
        };
        assert!(parse(&["exec", "sb1"]).is_err(), "a command is required");
        assert!(
            parse(&["exec", "--", "true"]).is_err(),
            "a sandbox is required"
        );
        assert!(
            parse(&["exec", "sb1", "--stdin", "--stdin-file", "f", "--", "cat"]).is_err(),
            "one standard input"
        );
        assert!(parse(&["exec", "sb1", "--env", "NOEQUALS", "--", "true"]).is_err());
        assert!(exec_args(&["exec", "sb1", "-d", "--", "true"]).detach);
    }

    #[test]
    fn stdin_is_at_most_one_mib() {
        let exact = vec![7u8; STDIN_LIMIT];
        assert_eq!(
            read_stdin(&exact[..], "--stdin").ok().map(|b| b.len()),
            Some(STDIN_LIMIT)
        );
        let over = vec![7u8; STDIN_LIMIT + 1];
        let err = read_stdin(&over[..], "--stdin")
            .err()
            .map(|e| (e.code, e.message));
        assert!(
            matches!(&err, Some((2, m)) if m.starts_with("--stdin: more than 1 MiB")),
            "{err:?}"
        );
        assert_eq!(read_stdin(&b""[..], "--stdin").ok(), Some(Vec::new()));
    }

    #[test]
    fn exit_codes_follow_the_command() {
        use pb::{CommandStatus as S, FailureKind as K};
        let code = |s, k, e| command_exit_code(&command(s, k, e));
        assert_eq!(code(S::Succeeded, K::Unspecified, Some(0)), 0);
        assert_eq!(code(S::Failed, K::ExitNonzero, Some(3)), 3);
        assert_eq!(code(S::Failed, K::ExitNonzero, Some(256)), 1);
        assert_eq!(code(S::Failed, K::RunnerLost, None), 125);
        assert_eq!(code(S::Failed, K::ExecutorError, None), 125);
        assert_eq!(code(S::Canceled, K::Canceled, Some(143)), 130);
        assert_eq!(code(S::TimedOut, K::Timeout, None), 124);
    }

    #[test]
    fn only_endings_the_exit_status_cannot_tell_are_explained() {
        use pb::{CommandStatus as S, FailureKind as K};
        let note = |s, k, e| ending_note(&command(s, k, e));
        assert_eq!(note(S::Succeeded, K::Unspecified, Some(0)), None);
        assert_eq!(note(S::Failed, K::ExitNonzero, Some(3)), None);
        assert_eq!(
            note(S::Failed, K::RunnerLost, None).as_deref(),
            Some("command c1: failed (runner_lost)")
        );
        assert_eq!(
            note(S::Failed, K::OomKilled, Some(137)).as_deref(),
            Some("command c1: failed (oom_killed, exit code 137)")
        );
        assert_eq!(
            note(S::TimedOut, K::Timeout, None).as_deref(),
            Some("command c1: timed_out (timeout)")
        );
        assert_eq!(
            note(S::Canceled, K::Canceled, None).as_deref(),
            Some("command c1: canceled (canceled)")
        );
    }

    #[test]
    fn the_first_ctrl_c_cancels_and_the_second_stops_waiting() {
        let mut c = CtrlC::default();
        assert_eq!(c.press(), OnCtrlC::Cancel);
        assert_eq!(c.press(), OnCtrlC::StopWaiting);
        assert_eq!(c.press(), OnCtrlC::StopWaiting);
    }
}
