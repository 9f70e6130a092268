//! The real `gantry` binary against a real server and a real runner process: what a user
//! types, what they see, and the exit statuses scripts rely on.
use std::{
    io::{BufRead as _, BufReader},
    process::Stdio,
};

use gantry_proto as pb;
use gantry_tests::{
    Db, TestServer, TlsFiles, get,
    procs::{RunnerProcess, binary, eventually, gantry, wait_for_output},
    sh, submit, wait_for_status,
};
use pb::JobStatus;

/// A server with one process runner.
async fn system() -> (TestServer, RunnerProcess) {
    let server = TestServer::start(Db::Sqlite).await;
    let runner = RunnerProcess::start(
        &server,
        "cli",
        &["--executors", "process", "--capacity", "4"],
    );
    (server, runner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_wait_prints_the_output_and_returns_the_jobs_exit_code() {
    let (server, _runner) = system().await;
    let (url, token) = (server.url(), server.api_token.clone());
    let ok = gantry(
        &url,
        &token,
        &[
            "submit",
            "--wait",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2",
        ],
    )
    .await;
    assert_eq!(ok.code, 0, "{ok:?}");
    assert_eq!(ok.stdout, "out\n");
    assert!(ok.stderr.contains("err\n"), "{ok:?}");
    let failed = gantry(
        &url,
        &token,
        &["submit", "--wait", "--", "sh", "-c", "echo partial; exit 7"],
    )
    .await;
    assert_eq!(failed.code, 7, "{failed:?}");
    assert_eq!(failed.stdout, "partial\n");
    assert!(failed.stderr.contains("exit code 7"), "{failed:?}");
    // The output of a finished job, one stream at a time.
    let id = failed
        .stderr
        .lines()
        .find_map(|l| {
            l.strip_prefix("job ")
                .and_then(|r| r.split_whitespace().next())
        })
        .expect("the job id on stderr")
        .trim_end_matches(':')
        .to_string();
    let out = gantry(&url, &token, &["logs", &id, "--stream", "stdout"]).await;
    assert_eq!((out.code, out.stdout.as_str()), (0, "partial\n"), "{out:?}");
    let err = gantry(&url, &token, &["logs", &id, "--stream", "stderr"]).await;
    assert_eq!(
        (err.code, err.stdout.as_str(), err.stderr.as_str()),
        (0, "", ""),
        "{err:?}"
    );
    // Retry submits the spec again as a new job, which fails the same way.
    let retried = gantry(&url, &token, &["retry", &id]).await;
    assert_eq!(retried.code, 0, "{retried:?}");
    let new_id = retried.stdout.trim().to_string();
    assert_ne!(new_id, id);
    let watch = gantry(&url, &token, &["watch", &new_id]).await;
    assert_eq!(watch.code, 7, "{watch:?}");
    let timed_out = gantry(
        &url,
        &token,
        &[
            "submit",
            "--wait",
            "--timeout",
            "1s",
            "--grace",
            "1s",
            "--",
            "sleep",
            "60",
        ],
    )
    .await;
    assert_eq!(timed_out.code, 124, "{timed_out:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_follow_streams_the_logs_in_order() {
    let (server, _runner) = system().await;
    let run = gantry(
        &server.url(),
        &server.api_token,
        &[
            "submit",
            "--follow",
            "--",
            "sh",
            "-c",
            "for i in $(seq 1 60); do echo line-$i; sleep 0.01; done",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let want: String = (1..=60).map(|i| format!("line-{i}\n")).collect();
    assert_eq!(run.stdout, want);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_follows_progress_to_100_and_exits_0() {
    let (server, _runner) = system().await;
    let (url, token) = (server.url(), server.api_token.clone());
    let submitted = gantry(
        &url,
        &token,
        &[
            "submit",
            "--",
            "sh",
            "-c",
            "for i in 1 2 3 4; do echo \"::progress $((i*25)) step $i::\"; sleep 0.1; done",
        ],
    )
    .await;
    assert_eq!(submitted.code, 0, "{submitted:?}");
    let id = submitted.stdout.trim().to_string();
    let watch = gantry(&url, &token, &["watch", &id]).await;
    assert_eq!(watch.code, 0, "{watch:?}");
    let lines: Vec<&str> = watch.stdout.lines().collect();
    for want in [
        "progress 25% step 1",
        "progress 50% step 2",
        "progress 100% step 4",
        "status running -> succeeded (exit code 0)",
    ] {
        assert!(
            lines.contains(&want),
            "watch lacks {want:?}:\n{}",
            watch.stdout
        );
    }
    assert_eq!(
        lines.last().copied(),
        Some(format!("job {id} succeeded (exit code 0)").as_str())
    );
    // As JSON, one event per line.
    let json = gantry(&url, &token, &["-o", "json", "watch", &id]).await;
    assert_eq!(json.code, 0, "{json:?}");
    let events: Vec<serde_json::Value> = json
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "progress" && e["percent"] == 100)
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_turns_a_running_job_canceled() {
    let (server, _runner) = system().await;
    let mut jobs = server.jobs().await;
    let id = submit(&mut jobs, sh("echo ready; sleep 300")).await;
    wait_for_output(&mut jobs, &id, "ready").await;
    let run = gantry(
        &server.url(),
        &server.api_token,
        &["cancel", &id, "--reason", "from the cli"],
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.starts_with(&id), "{run:?}");
    wait_for_status(&mut jobs, &id, JobStatus::Canceled).await;
    let job = get(&mut jobs, &id).await;
    assert!(
        job.failure_message.contains("from the cli"),
        "{}",
        job.failure_message
    );
    // Waiting on a canceled job exits 130.
    let watch = gantry(&server.url(), &server.api_token, &["watch", &id]).await;
    assert_eq!(watch.code, 130, "{watch:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runners_and_drain_as_an_operator_sees_them() {
    let (server, mut runner) = system().await;
    let (url, token) = (server.url(), server.api_token.clone());
    let id = runner.id().await;
    let table = eventually("the runner is listed online", || {
        let (url, token, id) = (url.clone(), token.clone(), id.clone());
        async move {
            let t = gantry(&url, &token, &["runners"]).await;
            (t.stdout.contains(&id) && t.stdout.contains("online")).then_some(t)
        }
    })
    .await;
    assert_eq!(table.code, 0);
    let drained = gantry(&url, &token, &["drain", &id, "--reason", "maintenance"]).await;
    assert_eq!(drained.code, 0, "{drained:?}");
    assert_eq!(drained.stdout.trim(), format!("{id} draining"));
    // The runner drains and leaves.
    assert_eq!(runner.wait().await, 0, "{}", runner.log());
    let offline = gantry(
        &url,
        &token,
        &["-o", "json", "runners", "--state", "offline"],
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(&offline.stdout).expect("JSON");
    assert_eq!(v["runners"][0]["id"], id.as_str(), "{v}");
    let stats = gantry(&url, &token, &["stats"]).await;
    assert!(stats.stdout.contains("offline 1"), "{stats:?}");
    let unknown = gantry(
        &url,
        &token,
        &["drain", "01a1fcf4-0000-7000-8000-000000000000"],
    )
    .await;
    assert_eq!(unknown.code, 1, "{unknown:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_as_json_parses_and_filters() {
    let (server, _runner) = system().await;
    let (url, token) = (server.url(), server.api_token.clone());
    let mut jobs = server.jobs().await;
    let good = submit(&mut jobs, sh("true")).await;
    let bad = submit(&mut jobs, sh("exit 4")).await;
    wait_for_status(&mut jobs, &good, JobStatus::Succeeded).await;
    wait_for_status(&mut jobs, &bad, JobStatus::Failed).await;
    let run = gantry(&url, &token, &["-o", "json", "jobs", "--status", "failed"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let v: serde_json::Value = serde_json::from_str(&run.stdout).expect("jobs -o json is JSON");
    let listed = v["jobs"].as_array().expect("jobs array");
    assert_eq!(listed.len(), 1, "{v}");
    assert_eq!(listed[0]["id"], bad.as_str());
    assert_eq!(listed[0]["status"], "failed");
    assert_eq!(listed[0]["failure_kind"], "exit_nonzero");
    assert_eq!(listed[0]["exit_code"], 4);
    let all = gantry(&url, &token, &["-o", "json", "jobs"]).await;
    let v: serde_json::Value = serde_json::from_str(&all.stdout).expect("JSON");
    assert_eq!(v["jobs"].as_array().map(Vec::len), Some(2));
    // Newest first.
    assert_eq!(v["jobs"][0]["id"], bad.as_str());
    let one = gantry(&url, &token, &["-o", "json", "get", &good]).await;
    let v: serde_json::Value = serde_json::from_str(&one.stdout).expect("JSON");
    assert_eq!(v["status"], "succeeded");
    assert_eq!(v["attempts"][0]["exit_code"], 0);
    for read in [&["-o", "json", "runners"][..], &["-o", "json", "stats"]] {
        let run = gantry(&url, &token, read).await;
        serde_json::from_str::<serde_json::Value>(&run.stdout)
            .unwrap_or_else(|e| panic!("{read:?} is not JSON ({e}): {}", run.stdout));
    }
    // Pages: one job per page, then the next page from the token.
    let first = gantry(&url, &token, &["-o", "json", "jobs", "--limit", "1"]).await;
    let v: serde_json::Value = serde_json::from_str(&first.stdout).expect("JSON");
    assert_eq!(v["jobs"][0]["id"], bad.as_str());
    let next = v["next_page_token"]
        .as_str()
        .expect("a next page")
        .to_string();
    let second = gantry(
        &url,
        &token,
        &["-o", "json", "jobs", "--limit", "1", "--page-token", &next],
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(&second.stdout).expect("JSON");
    assert_eq!(v["jobs"][0]["id"], good.as_str());
    // The table is for people: the ids are there, and no colour codes go into a pipe even
    // when NO_COLOR is not set.
    let table = tokio::process::Command::new(binary("gantry", "GANTRY_CLI_BIN"))
        .args(["--server", &url, "--token", &token, "jobs"])
        .env_remove("NO_COLOR")
        .output()
        .await
        .expect("run gantry");
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains(&good) && table.contains(&bad), "{table}");
    assert!(!table.contains('\x1b'), "{table:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_one_line_and_the_exit_status_that_fits() {
    let server = TestServer::start(Db::Sqlite).await;
    let (url, token) = (server.url(), server.api_token.clone());
    let cases: Vec<(Vec<&str>, &str, &str, i32, &str)> = vec![
        (
            vec!["submit", "--label", "gpu", "--", "true"],
            &url,
            &token,
            2,
            "KEY=VALUE",
        ),
        (
            vec!["submit", "--timeout", "-5s", "--", "true"],
            &url,
            &token,
            2,
            "not a duration",
        ),
        (
            vec!["submit", "--priority", "5000", "--", "true"],
            &url,
            &token,
            1,
            "spec.priority",
        ),
        (
            vec!["submit", "--label", "Bad Key=x", "--", "true"],
            &url,
            &token,
            1,
            "spec.labels",
        ),
        (vec!["get", "not-a-uuid"], &url, &token, 1, "job_id"),
        (
            vec!["jobs"],
            "http://127.0.0.1:9",
            &token,
            3,
            "cannot reach the server at http://127.0.0.1:9",
        ),
        (
            vec!["jobs"],
            &url,
            "wrong-token",
            4,
            "authentication failed",
        ),
    ];
    for (args, server_url, token, code, needle) in cases {
        let run = gantry(server_url, token, &args).await;
        assert_eq!(run.code, code, "{args:?}: {run:?}");
        assert_eq!(
            run.stderr.lines().count(),
            1,
            "{args:?}: one line: {}",
            run.stderr
        );
        assert!(
            run.stderr.starts_with("error: "),
            "{args:?}: {}",
            run.stderr
        );
        assert!(run.stderr.contains(needle), "{args:?}: {}", run.stderr);
        assert!(
            !run.stderr.contains("Status {"),
            "no debug dumps: {}",
            run.stderr
        );
    }
    // None of it changed anything.
    let listed = gantry(&url, &server.api_token, &["-o", "json", "jobs"]).await;
    let v: serde_json::Value = serde_json::from_str(&listed.stdout).expect("JSON");
    assert_eq!(v["jobs"].as_array().map(Vec::len), Some(0));
    server.stop().await;
}

/// Kills a `gantry dev` left running by a failed test.
struct Reap(Option<std::process::Child>);

impl Drop for Reap {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gantry_dev_serves_a_job_end_to_end_and_stops_on_sigint() {
    let data = tempfile::tempdir().expect("data dir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let mut child = std::process::Command::new(binary("gantry", "GANTRY_CLI_BIN"))
        .args([
            "dev",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(data.path())
        .env_remove("GANTRY_TOKEN")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn gantry dev");
    let stdout = child.stdout.take().expect("stdout");
    let mut dev = Reap(Some(child));
    // The banner says what to paste; read it as a newcomer would.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (mut server, mut token) = (None, None);
    while server.is_none() || token.is_none() {
        let line = rx
            .recv_timeout(gantry_tests::PATIENCE)
            .expect("gantry dev prints its exports");
        if let Some(v) = line.trim().strip_prefix("export GANTRY_SERVER=") {
            server = Some(v.to_string());
        }
        if let Some(v) = line.trim().strip_prefix("export GANTRY_TOKEN=") {
            token = Some(v.trim_matches('\'').to_string());
        }
    }
    let (server, token) = (server.unwrap_or_default(), token.unwrap_or_default());
    assert_eq!(server, format!("http://127.0.0.1:{port}"));
    let run = gantry(
        &server,
        &token,
        &[
            "submit",
            "--wait",
            "--",
            "sh",
            "-c",
            "echo hello from gantry",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.stdout, "hello from gantry\n");
    // A second `gantry dev` on the same data directory is refused, in one line.
    let second = std::process::Command::new(binary("gantry", "GANTRY_CLI_BIN"))
        .args(["dev", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .env("NO_COLOR", "1")
        .output()
        .expect("run a second gantry dev");
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(err.contains("another gantry dev is using"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let runners = gantry(&server, &token, &["-o", "json", "runners"]).await;
    let v: serde_json::Value = serde_json::from_str(&runners.stdout).expect("JSON");
    assert_eq!(v["runners"][0]["state"], "online", "{v}");
    // Ctrl-C stops both, cleanly.
    let child = dev.0.as_mut().expect("running");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
    let status = eventually("gantry dev exits after SIGINT", || {
        let status = child.try_wait().ok().flatten();
        async move { status }
    })
    .await;
    assert_eq!(status.code(), Some(0));
    dev.0 = None;
    let gone = gantry(&server, &token, &["jobs"]).await;
    assert_eq!(gone.code, 3, "the server stopped: {gone:?}");
}

/// A tmux server of the test's own (its own socket), killed when the test ends.
struct Tmux(String);

impl Tmux {
    fn run(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("tmux")
            .arg("-L")
            .arg(&self.0)
            .args(args)
            .output()
            .expect("tmux (scripts/test.sh installs it)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_renders_a_live_progress_bar_in_a_real_terminal() {
    let (server, _runner) = system().await;
    let mut jobs = server.jobs().await;
    let gate = tempfile::tempdir().expect("gate dir");
    let go = gate.path().join("go");
    let id = submit(
        &mut jobs,
        sh(&format!(
            "echo '::progress 40 loading data::'; while [ ! -e {} ]; do sleep 0.05; done; echo '::progress 100 done::'",
            go.display()
        )),
    )
    .await;
    let tmux = Tmux(format!("gantry-test-{}", uuid::Uuid::new_v4().simple()));
    let command = format!(
        "GANTRY_SERVER={} GANTRY_TOKEN={} {} watch {id}; echo EXIT=$?; sleep 600",
        server.url(),
        server.api_token,
        binary("gantry", "GANTRY_CLI_BIN").display()
    );
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "watch",
        "-x",
        "120",
        "-y",
        "20",
        &command,
    ]);
    let screen = |tmux: &Tmux| tmux.run(&["capture-pane", "-p", "-t", "watch"]);
    let mid = eventually("the bar shows 40 % and the stage", || {
        let s = screen(&tmux);
        async move { (s.contains(" 40%") && s.contains("loading data")).then_some(s) }
    })
    .await;
    // A bar, not lines: the running line shows the status and a partly filled bar.
    let bar_line = mid
        .lines()
        .find(|l| l.contains(" 40%"))
        .expect("the bar line");
    assert!(
        bar_line.contains("running") && bar_line.contains("[") && bar_line.contains("="),
        "{mid}"
    );
    assert!(mid.contains("status assigned -> running"), "{mid}");
    std::fs::write(&go, b"").expect("open the gate");
    let end = eventually("watch ends with exit 0", || {
        let s = screen(&tmux);
        async move { s.contains("EXIT=0").then_some(s) }
    })
    .await;
    assert!(
        end.contains("100%") && end.contains(&format!("job {id} succeeded")),
        "{end}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_cut_off_by_a_server_crash_says_so_and_exits_3() {
    use tokio::io::AsyncBufReadExt as _;
    let mut server = gantry_tests::procs::ServerProcess::start(&[]).await;
    let mut jobs = server.jobs().await;
    // No runner: the job stays queued, so the watch cannot end on its own.
    let id = submit(&mut jobs, sh("true")).await;
    let mut watch = tokio::process::Command::new(binary("gantry", "GANTRY_CLI_BIN"))
        .args([
            "--server",
            &server.url,
            "--token",
            &server.api_token,
            "watch",
            &id,
        ])
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn gantry watch");
    let mut lines = tokio::io::BufReader::new(watch.stdout.take().expect("stdout")).lines();
    let first = tokio::time::timeout(gantry_tests::PATIENCE, lines.next_line())
        .await
        .expect("watch prints the first event")
        .expect("read");
    assert_eq!(first.as_deref(), Some("status queued: submitted"));
    server.kill().await;
    let out = tokio::time::timeout(gantry_tests::PATIENCE, watch.wait_with_output())
        .await
        .expect("watch ends")
        .expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: "), "{err}");
}

/// Over TLS the CLI trusts the server through `--tls-ca`; `--tls-domain` names the
/// certificate's host when the URL's differs (a port-forward to 127.0.0.1, say). A name
/// mismatch is refused, not ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_the_cli_checks_the_certificate_against_its_ca_and_domain() {
    let tls = TlsFiles::self_signed("gantry-server");
    let server = TestServer::start_with(Db::Sqlite, |c| tls.serve(c)).await;
    let url = format!("https://127.0.0.1:{}", server.addr.port());
    let ca = tls.cert_arg();
    let token = server.api_token.clone();

    let ok = gantry(
        &url,
        &token,
        &[
            "--tls-ca",
            ca,
            "--tls-domain",
            "gantry-server",
            "-o",
            "json",
            "jobs",
        ],
    )
    .await;
    assert_eq!(ok.code, 0, "{ok:?}");
    let listed: serde_json::Value = serde_json::from_str(&ok.stdout).expect("jobs -o json");
    assert!(listed.is_object() || listed.is_array(), "{listed}");

    // The certificate names gantry-server, not 127.0.0.1: refused without --tls-domain.
    let mismatch = gantry(&url, &token, &["--tls-ca", ca, "jobs"]).await;
    assert_eq!(mismatch.code, 3, "{mismatch:?}");
    assert!(
        mismatch.stderr.contains("cannot reach the server"),
        "{mismatch:?}"
    );
    // And with a domain it does not carry.
    let wrong = gantry(
        &url,
        &token,
        &["--tls-ca", ca, "--tls-domain", "elsewhere", "jobs"],
    )
    .await;
    assert_eq!(wrong.code, 3, "{wrong:?}");
    // https without a CA is a usage error, said before any connection.
    let no_ca = gantry(&url, &token, &["jobs"]).await;
    assert_eq!(no_ca.code, 2, "{no_ca:?}");
    assert!(no_ca.stderr.contains("--tls-ca"), "{no_ca:?}");
    server.stop().await;
}

/// A sandbox from the CLI: create and wait, exec with output, exit codes, stdin, detach,
/// Ctrl-C canceling just the command, timeout, list as JSON, delete and wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_and_exec_as_a_user_types_them() {
    let (server, runner) = system().await;
    let (url, token) = (server.url(), server.api_token.clone());
    let created = gantry(&url, &token, &["sandbox", "create", "--process", "--wait"]).await;
    assert_eq!(
        created.code,
        0,
        "{created:?}\nrunner log:\n{}",
        runner.log()
    );
    let sandbox = created.stdout.trim().to_string();
    let exec = |args: &[&str]| {
        let mut all = vec!["exec", sandbox.as_str()];
        all.extend_from_slice(args);
        all.iter().map(|s| s.to_string()).collect::<Vec<String>>()
    };
    let run = |args: Vec<String>| {
        let (url, token) = (url.clone(), token.clone());
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            gantry(&url, &token, &args).await
        }
    };
    // Output on its own streams, and the command's exit code.
    let out = run(exec(&[
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; echo kept > f; exit 3",
    ]))
    .await;
    assert_eq!(out.code, 3, "{out:?}");
    assert_eq!(out.stdout, "out\n");
    assert!(out.stderr.contains("err\n"), "{out:?}");
    // The workspace carries over; stdin from a file reaches the command.
    let input = tempfile::NamedTempFile::new().expect("stdin file");
    std::fs::write(input.path(), b"from a file").expect("write stdin");
    let path = input.path().display().to_string();
    let cat = run(exec(&[
        "--stdin-file",
        &path,
        "--",
        "sh",
        "-c",
        "cat f; cat",
    ]))
    .await;
    assert_eq!(
        (cat.code, cat.stdout.as_str()),
        (0, "kept\nfrom a file"),
        "{cat:?}"
    );
    // Past its timeout: 124.
    let slow = run(exec(&["--timeout", "1", "--", "sleep", "30"])).await;
    assert_eq!(slow.code, 124, "{slow:?}");
    // Detached: the command id, and it runs.
    let detached = run(exec(&["--detach", "--", "sh", "-c", "echo bg"])).await;
    assert_eq!(detached.code, 0, "{detached:?}");
    let command = detached.stdout.trim().to_string();
    let mut sandboxes = server.sandboxes().await;
    gantry_tests::wait_for_command(
        &mut sandboxes,
        &sandbox,
        &command,
        pb::CommandStatus::Succeeded,
    )
    .await;
    // Ctrl-C cancels the command, not the sandbox: 130.
    let mut child = tokio::process::Command::new(binary("gantry", "GANTRY_CLI_BIN"))
        .args(["exec", &sandbox, "--", "sh", "-c", "echo ready; sleep 600"])
        .env("GANTRY_SERVER", &url)
        .env("GANTRY_TOKEN", &token)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn gantry exec");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::BufReader::new(stdout);
    let mut first = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut lines, &mut first)
        .await
        .expect("read");
    assert_eq!(first, "ready\n");
    let pid = nix::unistd::Pid::from_raw(child.id().expect("pid") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let status = tokio::time::timeout(gantry_tests::PATIENCE, child.wait())
        .await
        .expect("exec ends after Ctrl-C")
        .expect("wait");
    assert_eq!(status.code(), Some(130));
    let got = run(vec![
        "sandbox".into(),
        "get".into(),
        sandbox.clone(),
        "-o".into(),
        "json".into(),
    ])
    .await;
    assert_eq!(got.code, 0, "{got:?}");
    let details: serde_json::Value = serde_json::from_str(&got.stdout).expect("json");
    let commands = details["commands"].as_array().expect("its commands");
    assert_eq!(commands.len(), 5, "{details}");
    assert_eq!(commands[0]["exit_code"], 3, "{details}");
    let text = run(vec!["sandbox".into(), "get".into(), sandbox.clone()]).await;
    assert_eq!(text.code, 0, "{text:?}");
    assert!(
        text.stdout.contains(&command),
        "the commands are listed: {text:?}"
    );
    let listed = run(vec![
        "sandbox".into(),
        "ls".into(),
        "-o".into(),
        "json".into(),
    ])
    .await;
    assert_eq!(listed.code, 0, "{listed:?}");
    let json: serde_json::Value = serde_json::from_str(&listed.stdout).expect("json");
    let first = &json["sandboxes"][0];
    assert_eq!(first["id"], sandbox.as_str(), "{json}");
    assert!(
        first["status"]
            .as_str()
            .is_some_and(|s| s.to_lowercase().contains("running")),
        "the sandbox survives the canceled command: {json}"
    );
    let removed = run(vec![
        "sandbox".into(),
        "rm".into(),
        sandbox.clone(),
        "--wait".into(),
    ])
    .await;
    assert_eq!(removed.code, 0, "{removed:?}");
    assert!(
        removed.stdout.to_lowercase().contains("deleted"),
        "{removed:?}"
    );
    server.stop().await;
}

/// Sandbox endings as the CLI reports them, against the real server and a real docker
/// runner: a sandbox that fails before it runs (`create --wait`: 125), `sandbox watch` to the
/// end as text and as JSON, and a command to an unknown sandbox (1, one line).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_endings_as_the_cli_reports_them() {
    let server = TestServer::start(Db::Sqlite).await;
    let _runner = RunnerProcess::start(&server, "cli-docker", &["--executors", "docker"]);
    let (url, token) = (server.url(), server.api_token.clone());
    let missing = gantry(
        &url,
        &token,
        &[
            "sandbox",
            "create",
            "--image",
            "gantry-test/absent:1",
            "--pull",
            "never",
            "--wait",
        ],
    )
    .await;
    assert_eq!(missing.code, 125, "{missing:?}");
    assert!(missing.stderr.contains("image_unavailable"), "{missing:?}");

    let image = gantry_tests::procs::busybox_image().await;
    let created = gantry(
        &url,
        &token,
        &[
            "sandbox",
            "create",
            "--image",
            &image,
            "--pull",
            "never",
            "--one-shot",
            "--wait",
        ],
    )
    .await;
    assert_eq!(created.code, 0, "{created:?}");
    let sandbox = created.stdout.trim().to_string();
    let ran = gantry(&url, &token, &["exec", &sandbox, "--", "echo", "only"]).await;
    assert_eq!((ran.code, ran.stdout.as_str()), (0, "only\n"), "{ran:?}");
    // One-shot: the sandbox ends by itself; watch follows it to the end.
    let watch = gantry(&url, &token, &["sandbox", "watch", &sandbox]).await;
    assert_eq!(watch.code, 0, "{watch:?}");
    for step in ["running", "deleting", "deleted", "command 1"] {
        assert!(
            watch.stdout.contains(step) || watch.stderr.contains(step),
            "{step}: {watch:?}"
        );
    }
    let json = gantry(&url, &token, &["sandbox", "watch", &sandbox, "-o", "json"]).await;
    assert_eq!(json.code, 0, "{json:?}");
    let events: Vec<serde_json::Value> = json
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert!(events.len() >= 6, "{events:?}");
    assert!(
        events.iter().all(|e| e["sandbox_id"] == sandbox.as_str()),
        "{events:?}"
    );

    let unknown = gantry(
        &url,
        &token,
        &["exec", "018f0000-0000-7000-8000-000000000000", "--", "true"],
    )
    .await;
    assert_eq!(unknown.code, 1, "{unknown:?}");
    assert_eq!(unknown.stderr.lines().count(), 1, "{unknown:?}");
    assert!(unknown.stderr.contains("not found"), "{unknown:?}");
    server.stop().await;
}

/// `gantry sandbox watch` in a real terminal (tmux): the lifecycle as lines, and a live
/// progress bar for the running command from its `::progress` lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_watch_renders_the_running_commands_progress_bar_in_a_real_terminal() {
    let (server, _runner) = system().await;
    let mut sandboxes = server.sandboxes().await;
    let sandbox = gantry_tests::create_sandbox(&mut sandboxes, pb::SandboxSpec::default()).await;
    gantry_tests::wait_for_sandbox(&mut sandboxes, &sandbox.id, pb::SandboxStatus::Running).await;
    let gate = tempfile::tempdir().expect("gate dir");
    let go = gate.path().join("go");
    let command = gantry_tests::run_command(
        &mut sandboxes,
        &sandbox.id,
        pb::CommandSpec {
            argv: vec![
                "sh".into(),
                "-c".into(),
                format!(
                    "echo '::progress 40 loading data::'; while [ ! -e {} ]; do sleep 0.05; done; echo '::progress 100 done::'",
                    go.display()
                ),
            ],
            ..Default::default()
        },
    )
    .await;
    let tmux = Tmux(format!("gantry-test-{}", uuid::Uuid::new_v4().simple()));
    let shell = format!(
        "GANTRY_SERVER={} GANTRY_TOKEN={} {} sandbox watch {}; echo EXIT=$?; sleep 600",
        server.url(),
        server.api_token,
        binary("gantry", "GANTRY_CLI_BIN").display(),
        sandbox.id
    );
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "watch",
        "-x",
        "120",
        "-y",
        "20",
        &shell,
    ]);
    let screen = |tmux: &Tmux| tmux.run(&["capture-pane", "-p", "-t", "watch"]);
    let mid = eventually("the bar shows 40 % and the stage", || {
        let s = screen(&tmux);
        async move { (s.contains(" 40%") && s.contains("loading data")).then_some(s) }
    })
    .await;
    let bar_line = mid
        .lines()
        .find(|l| l.contains(" 40%"))
        .expect("the bar line");
    assert!(bar_line.contains('[') && bar_line.contains('='), "{mid}");
    assert!(mid.contains("running"), "the lifecycle is shown: {mid}");
    std::fs::write(&go, b"").expect("open the gate");
    gantry_tests::wait_for_command(
        &mut sandboxes,
        &sandbox.id,
        &command.id,
        pb::CommandStatus::Succeeded,
    )
    .await;
    gantry_tests::delete_sandbox(&mut sandboxes, &sandbox.id).await;
    let end = eventually("watch ends with exit 0", || {
        let s = screen(&tmux);
        async move { s.contains("EXIT=0").then_some(s) }
    })
    .await;
    assert!(end.contains("deleted"), "{end}");
    server.stop().await;
}

/// Data in and out of work through the CLI: `blob put`, `submit --input/--artifact`, the
/// work's own `gantry job …` calls, `artifacts`, `download`, `get` showing the result and
/// `ls --parent` the child; bad forms are refused naming the flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_moves_through_the_cli_inputs_results_artifacts_and_children() {
    let (server, _runner) = system().await;
    let (url, token) = (server.url(), server.api_token.clone());
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("in.txt");
    std::fs::write(&input, "hello cli\n").expect("write input");
    let put = gantry(&url, &token, &["blob", "put", &input.display().to_string()]).await;
    assert_eq!(put.code, 0, "{put:?}");
    let digest = put.stdout.trim().to_string();
    assert_eq!(digest, gantry_tests::data::digest(b"hello cli\n"));

    let cli = binary("gantry", "GANTRY_CLI_BIN").display().to_string();
    let submitted = gantry(
        &url,
        &token,
        &[
            "submit",
            "--input",
            &format!("in/data.txt={digest}"),
            "--artifact",
            "out",
            "--env",
            &format!("CLI={cli}"),
            "--",
            "sh",
            "-c",
            r#"set -e
            mkdir -p out && cat in/data.txt > out/copy.txt
            "$CLI" job progress 60 copying
            "$CLI" job result --data 'all done' --content-type text/plain
            "$CLI" job submit -- true"#,
        ],
    )
    .await;
    assert_eq!(submitted.code, 0, "{submitted:?}");
    let id = submitted.stdout.trim().to_string();
    let watched = gantry(&url, &token, &["watch", &id]).await;
    assert_eq!(watched.code, 0, "{watched:?}");

    let listed = gantry(&url, &token, &["artifacts", &id]).await;
    assert_eq!(listed.code, 0, "{listed:?}");
    assert!(listed.stdout.contains("out/copy.txt"), "{}", listed.stdout);
    assert!(
        listed.stdout.contains(&digest),
        "same bytes, same digest: {}",
        listed.stdout
    );
    let json = gantry(&url, &token, &["artifacts", &id, "-o", "json"]).await;
    let parsed: serde_json::Value = serde_json::from_str(&json.stdout).expect("json");
    assert_eq!(parsed["artifacts"][0]["name"], "out/copy.txt");
    assert_eq!(parsed["artifacts"][0]["size"], 10);
    let target = dir.path().join("got.txt");
    let downloaded = gantry(
        &url,
        &token,
        &[
            "download",
            &id,
            "out/copy.txt",
            "--to",
            &target.display().to_string(),
        ],
    )
    .await;
    assert_eq!(downloaded.code, 0, "{downloaded:?}");
    assert_eq!(
        std::fs::read(&target).expect("downloaded file"),
        b"hello cli\n"
    );

    let shown = gantry(&url, &token, &["get", &id]).await;
    assert_eq!(shown.code, 0, "{shown:?}");
    assert!(
        shown.stdout.contains("all done"),
        "the result: {}",
        shown.stdout
    );
    assert!(shown.stdout.contains("text/plain"), "{}", shown.stdout);
    let job: serde_json::Value = serde_json::from_str(
        &gantry(&url, &token, &["get", &id, "-o", "json"])
            .await
            .stdout,
    )
    .expect("json");
    assert_eq!(job["result"]["data"], "all done");
    assert_eq!(job["progress"]["percent"], 60);
    let children = gantry(&url, &token, &["ls", "--parent", &id, "-o", "json"]).await;
    let children: serde_json::Value = serde_json::from_str(&children.stdout).expect("json");
    assert_eq!(
        children["jobs"][0]["parent_job_id"],
        id.as_str(),
        "{children}"
    );

    // Bad forms: refused naming the flag, exit 2; nothing submitted.
    for bad in [
        vec!["submit", "--input", "no-source", "--", "true"],
        vec!["submit", "--input", "../x=sha256:00", "--", "true"],
        vec!["submit", "--artifact", "/abs", "--", "true"],
    ] {
        let refused = gantry(&url, &token, &bad).await;
        assert_eq!(refused.code, 2, "{bad:?}: {refused:?}");
        assert!(refused.stderr.contains(bad[1]), "{bad:?}: {refused:?}");
    }
    // `gantry job …` outside a job says what is missing.
    let outside = gantry(&url, &token, &["job", "progress", "10"]).await;
    assert_eq!(outside.code, 2, "{outside:?}");
    assert!(outside.stderr.contains("GANTRY_"), "{outside:?}");
}
