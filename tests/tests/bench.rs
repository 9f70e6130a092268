//! `gantry-bench --quick` runs and prints every figure (CI keeps the tool from rotting; it
//! never checks what the figures are).
use gantry_tests::procs::binary;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quick_benchmark_runs_and_prints_every_figure() {
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(300),
        tokio::process::Command::new(binary("gantry-bench", "GANTRY_BENCH_BIN"))
            .args(["--quick", "--json"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the quick benchmark finishes")
    .expect("run gantry-bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "gantry-bench failed: {stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    let figures = v["figures"].as_array().expect("figures");
    let mut scenarios: Vec<&str> = figures
        .iter()
        .filter_map(|f| f["scenario"].as_str())
        .collect();
    scenarios.dedup();
    for s in [
        "reference",
        "throughput",
        "start",
        "cancel",
        "logs",
        "sessions",
        "docker",
    ] {
        assert!(scenarios.contains(&s), "no {s} figures: {v}");
    }
    for f in figures {
        let value = f["value"].as_f64().unwrap_or(f64::NAN);
        assert!(value.is_finite(), "not a figure: {f}");
    }
    if std::env::var("GANTRY_TEST_REQUIRE_ALL").as_deref() == Ok("1") {
        assert!(
            figures
                .iter()
                .any(|f| f["name"].as_str().is_some_and(|n| n.contains("postgres"))),
            "the PostgreSQL run is part of the full test command: {stderr}"
        );
    }
}
