//! The `gantry-runner` binary's command line: flags it documents, bad flags refused with exit
//! status 2, and a clear error when it has neither an identity nor a token to register with.
//! (The runner at work — sessions, executors, faults — is tested end to end in `tests/`.)
use std::process::Command;

fn runner() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gantry-runner"))
}

#[test]
fn help_documents_every_setting_with_its_environment_variable() {
    let out = runner().arg("--help").output().expect("run gantry-runner");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--server",
        "GANTRY_SERVER",
        "--registration-token",
        "--label",
        "--capacity",
        "--executors",
        "--state-dir",
        "--drain-grace-seconds",
        "--once",
        "--idle-timeout-seconds",
        "--tls-ca",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}:\n{help}");
    }
}

#[test]
fn bad_flags_exit_2_naming_the_rule() {
    let out = runner()
        .args(["--executors", "vm"])
        .output()
        .expect("run gantry-runner");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an executor"));
}

#[test]
fn no_identity_and_no_token_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = runner()
        .args(["--executors", "process", "--server", "http://127.0.0.1:9"])
        .arg("--state-dir")
        .arg(dir.path())
        .env_remove("GANTRY_REGISTRATION_TOKEN")
        .env("NO_COLOR", "1")
        .output()
        .expect("run gantry-runner");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--registration-token"), "{err}");
}
