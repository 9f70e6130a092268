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
        // Checked before any connection is tried.
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
