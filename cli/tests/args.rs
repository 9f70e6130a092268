//! The `gantry` binary's command line on its own (no server): help, completions, and bad
//! flags refused on one line with exit status 2. Commands against a server are tested end to
//! end in `tests/`.
use std::process::Command;

fn gantry(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gantry"))
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("GANTRY_SERVER")
        .env_remove("GANTRY_TOKEN")
        .env_remove("GANTRY_ENDPOINT")
        .env_remove("GANTRY_WORK_TOKEN")
        .env_remove("GANTRY_JOB_ID")
        .output()
        .expect("run gantry")
}

#[test]
fn help_lists_every_command() {
    let out = gantry(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "dev",
        "submit",
        "jobs",
        "get",
        "watch",
        "logs",
        "cancel",
        "retry",
        "sandbox",
        "exec",
        "runners",
        "drain",
        "stats",
        "artifacts",
        "download",
        "blob",
        "job",
        "completions",
    ] {
        assert!(help.contains(cmd), "--help lacks {cmd}:\n{help}");
    }
    assert!(help.contains("GANTRY_SERVER") || help.contains("--server"));
}

#[test]
fn sandbox_help_lists_its_commands() {
    let out = gantry(&["sandbox", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in ["create", "ls", "get", "rm", "watch"] {
        assert!(help.contains(cmd), "sandbox --help lacks {cmd}:\n{help}");
    }
    // Without a subcommand: the help, and the exit status of a bad command line.
    let out = gantry(&["sandbox"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn job_help_lists_the_works_commands() {
    let out = gantry(&["job", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "progress", "event", "result", "artifact", "inputs", "submit",
    ] {
        assert!(help.contains(cmd), "job --help lacks {cmd}:\n{help}");
    }
    assert!(help.contains("GANTRY_WORK_TOKEN"), "{help}");
}

#[test]
fn the_works_commands_need_the_works_environment() {
    for args in [
        &["job", "progress", "10"][..],
        &["job", "event", "checkpoint"],
        &["job", "result", "--data", "{}"],
        &["job", "inputs"],
        &["job", "submit", "--", "true"],
    ] {
        let out = gantry(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.starts_with("error: GANTRY_ENDPOINT is not set"),
            "{args:?}: {err}"
        );
    }
    let out = Command::new(env!("CARGO_BIN_EXE_gantry"))
        .args(["job", "progress", "10"])
        .env("NO_COLOR", "1")
        .env("GANTRY_ENDPOINT", "unix:///nonexistent/gantry.sock")
        .env("GANTRY_WORK_TOKEN", "s3cret-work-token")
        .env_remove("GANTRY_JOB_ID")
        .output()
        .expect("run gantry");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("GANTRY_JOB_ID is not set"), "{err}");
    // An endpoint that does not answer: exit 3, and the token is never shown.
    let out = Command::new(env!("CARGO_BIN_EXE_gantry"))
        .args(["job", "progress", "10"])
        .env("NO_COLOR", "1")
        .env("GANTRY_ENDPOINT", "unix:///nonexistent/gantry.sock")
        .env("GANTRY_WORK_TOKEN", "s3cret-work-token")
        .env("GANTRY_JOB_ID", "j1")
        .output()
        .expect("run gantry");
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unix:///nonexistent/gantry.sock"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
}

#[test]
fn completions_are_generated_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let out = gantry(&["completions", shell]);
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(
            script.contains("gantry") && script.contains("submit"),
            "{shell}: {script}"
        );
    }
}

#[test]
fn bad_flags_are_one_line_with_exit_status_2() {
    for args in [
        &["submit", "--label", "nokey", "--", "true"][..],
        &["submit", "--timeout", "-5s", "--", "true"],
        &["submit", "--memory", "lots", "--", "true"],
        &["submit"],
        &["jobs", "--status", "sleeping"],
        &["completions", "tcsh"],
        &["sandbox", "create", "--image", "alpine", "--process"],
        &["sandbox", "create", "--lifetime", "forever"],
        &["sandbox", "ls", "--status", "sleeping"],
        &["sandbox", "rm"],
        &["exec", "sb1"],
        &[
            "exec",
            "sb1",
            "--stdin",
            "--stdin-file",
            "in.txt",
            "--",
            "cat",
        ],
        // Checked before any connection is tried.
        &["sandbox", "create", "--pull", "never"],
        &[
            "exec",
            "sb1",
            "--stdin-file",
            "/nonexistent/in.txt",
            "--",
            "cat",
        ],
        &["submit", "--input", "model.bin", "--", "true"],
        &["submit", "--input", "/abs/in.bin=j1:out.bin", "--", "true"],
        &["submit", "--input", "in.bin=sha256:abc", "--", "true"],
        &["submit", "--artifact", "../out", "--", "true"],
        &["sandbox", "create", "--input", "in.bin=j1"],
        &["sandbox", "create", "--artifact", "/out"],
        &["download", "j1"],
        &["blob", "get", "sha256:xyz"],
        &["blob", "put"],
        &["job", "progress", "101"],
        &["job", "progress"],
        &["job", "result"],
        &["job", "result", "--data", "x", "--stdin"],
        &["job", "event", "k", "--field", "novalue"],
        &["job", "artifact", "put"],
        // Checked before any connection is tried.
        &["job", "artifact", "put", "/etc/hostname"],
        &["job", "artifact", "put", "../out"],
        &["job", "artifact", "put", "a", "b", "--name", "x"],
        &["job", "submit", "--pull", "never", "--", "true"],
        &["blob", "put", "/nonexistent/blob.bin"],
        &["--server", "localhost:50051", "jobs"],
        &[
            "--server",
            "http://127.0.0.1:9",
            "--tls-ca",
            "/nonexistent.pem",
            "jobs",
        ],
        &[
            "--server",
            "http://127.0.0.1:9",
            "--tls-domain",
            "gantry-server",
            "jobs",
        ],
    ] {
        let out = gantry(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{args:?}: {err}");
    }
}
