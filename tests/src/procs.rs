//! Real processes for end-to-end tests: `gantry-runner` and `gantry-server` binaries, the
//! Docker engine (through bollard, as the runner sees it) and the test image built locally.
//!
//! The binaries are the ones cargo built next to the test executable (`target/<profile>/`);
//! `cargo test --workspace` builds them because their packages have integration tests of
//! their own. `GANTRY_RUNNER_BIN` / `GANTRY_SERVER_BIN` override the paths.
use std::{collections::HashMap, path::PathBuf, process::Stdio, time::Duration};

use bollard::{Docker, query_parameters::ListContainersOptions};
use gantry_proto as pb;
use pb::job_service_client::JobServiceClient;
use tokio::{process::Child, sync::OnceCell};
use tokio_stream::StreamExt;

use crate::{Authed, PATIENCE, TestServer};

/// The path of a workspace binary, next to the test executable.
pub fn binary(name: &str, env: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> or target/<profile>/<bin> -> target/<profile>/<name>
    let mut dir = exe.parent().expect("executable in a directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target/<profile>");
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p {name}` (cargo test --workspace does), or set {env}",
        path.display()
    );
    path
}

/// The statically linked `gantry` binary runners mount into job containers (built by
/// scripts/test.sh, which sets `GANTRY_TEST_STATIC_GANTRY`).
pub fn static_gantry() -> PathBuf {
    let path = std::env::var_os("GANTRY_TEST_STATIC_GANTRY")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "GANTRY_TEST_STATIC_GANTRY is unset: run scripts/test.sh, which builds a static \
                 gantry (cargo build -p gantry-cli --target <host> with +crt-static) and sets it"
            )
        });
    assert!(path.exists(), "{} is missing", path.display());
    path
}

/// Polls `check` until it returns `Some`, for conditions that have no event to await (a
/// process's exit status, a runner's state); fails after [`PATIENCE`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `gantry-runner` process with its own state directory.
pub struct RunnerProcess {
    /// Runner name.
    pub name: String,
    /// Its state directory (identity, scratch dirs, its log).
    pub state_dir: PathBuf,
    args: Vec<String>,
    server_url: String,
    registration_token: String,
    child: Option<Child>,
    _dir: tempfile::TempDir,
    runs: u32,
}

impl RunnerProcess {
    /// Starts a runner for `server` with extra flags (e.g. `--capacity 2`).
    pub fn start(server: &TestServer, name: &str, args: &[&str]) -> RunnerProcess {
        Self::start_for(&server.url(), &server.registration_token, name, args)
    }

    /// Starts a runner for the server at `url`.
    pub fn start_for(
        url: &str,
        registration_token: &str,
        name: &str,
        args: &[&str],
    ) -> RunnerProcess {
        let dir = tempfile::tempdir().expect("runner temp dir");
        let mut r = RunnerProcess {
            name: name.to_string(),
            state_dir: dir.path().join("state"),
            args: args.iter().map(|s| s.to_string()).collect(),
            server_url: url.to_string(),
            registration_token: registration_token.to_string(),
            child: None,
            _dir: dir,
            runs: 0,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        self.runs += 1;
        std::fs::create_dir_all(&self.state_dir).expect("state dir");
        let log = std::fs::File::create(self.log_path(self.runs)).expect("runner log file");
        let child = tokio::process::Command::new(binary("gantry-runner", "GANTRY_RUNNER_BIN"))
            .arg("--server")
            .arg(&self.server_url)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--name")
            .arg(&self.name)
            .args(&self.args)
            .env("GANTRY_REGISTRATION_TOKEN", &self.registration_token)
            .env("RUST_LOG", "info,gantry_runner=debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn gantry-runner");
        self.child = Some(child);
    }

    fn log_path(&self, run: u32) -> PathBuf {
        self._dir.path().join(format!("runner-{run}.log"))
    }

    /// Everything the runner logged, every run.
    pub fn log(&self) -> String {
        (1..=self.runs)
            .map(|r| std::fs::read_to_string(self.log_path(r)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n--- restart ---\n")
    }

    /// The runner id from its state file, once it has registered.
    pub async fn id(&self) -> String {
        let file = self.state_dir.join("runner.json");
        eventually(&format!("runner {} registers", self.name), || async {
            let bytes = std::fs::read(&file).ok()?;
            let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
            v.get("runner_id")?.as_str().map(str::to_string)
        })
        .await
    }

    /// Sends a signal to the runner process.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = self
            .child
            .as_ref()
            .and_then(Child::id)
            .expect("runner is running");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).expect("signal");
    }

    /// Kills the runner with SIGKILL, as a crash would.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().await.expect("SIGKILL the runner");
        }
    }

    /// Starts the runner again with the same state directory (the same runner).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "kill or wait for the runner first");
        self.spawn();
    }

    /// Waits for the runner to exit; returns its exit code.
    pub async fn wait(&mut self) -> i32 {
        let mut child = self.child.take().expect("runner is running");
        let status = tokio::time::timeout(PATIENCE, child.wait())
            .await
            .unwrap_or_else(|_| panic!("runner did not exit; its log:\n{}", self.log()))
            .expect("wait for the runner");
        status.code().unwrap_or(-1)
    }
}

impl Drop for RunnerProcess {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
        // Containers a killed runner left behind go with it.
        if let Ok(bytes) = std::fs::read(self.state_dir.join("runner.json"))
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes)
            && let Some(id) = v.get("runner_id").and_then(|v| v.as_str())
        {
            remove_containers_blocking(&format!("gantry.runner-id={id}"));
        }
    }
}

/// Removes every container carrying `label` (KEY=VALUE) with the docker CLI; for Drop.
fn remove_containers_blocking(label: &str) {
    let Ok(out) = std::process::Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label={label}")])
        .output()
    else {
        return;
    };
    let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    if !ids.is_empty() {
        let _ = std::process::Command::new("docker")
            .arg("rm")
            .arg("-f")
            .args(&ids)
            .output();
    }
}

/// The Docker engine, or a failure that says it is missing.
pub async fn docker() -> Docker {
    let docker = Docker::connect_with_local_defaults().unwrap_or_else(|e| {
        panic!("these tests need the Docker engine, and none is reachable: {e}")
    });
    docker.ping().await.unwrap_or_else(|e| {
        panic!("these tests need the Docker engine, and it does not answer: {e}")
    });
    docker
}

/// Containers (running or not) carrying `label` (KEY=VALUE).
pub async fn containers_with_label(label: &str) -> Vec<bollard::models::ContainerSummary> {
    docker()
        .await
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([(
                "label".to_string(),
                vec![label.to_string()],
            )])),
            ..Default::default()
        }))
        .await
        .expect("list containers")
}

/// Waits until no container carries `label` (KEY=VALUE) any more.
pub async fn until_no_container(label: &str, what: &str) {
    eventually(what, || async {
        containers_with_label(label).await.is_empty().then_some(())
    })
    .await
}

/// The test image: `FROM scratch` with Debian's static busybox as /bin/sh, sleep, echo …,
/// built locally once (no registry is involved). Its name is returned.
pub async fn busybox_image() -> String {
    static IMAGE: OnceCell<String> = OnceCell::const_new();
    IMAGE
        .get_or_init(|| async {
            docker().await;
            let busybox = std::env::var_os("GANTRY_TEST_BUSYBOX")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/bin/busybox"));
            assert!(
                busybox.exists(),
                "the Docker tests build their image from a static busybox, and {} is missing: \
                 run scripts/test.sh (it fetches Debian's busybox-static) or set GANTRY_TEST_BUSYBOX",
                busybox.display()
            );
            let ctx = tempfile::tempdir().expect("build context");
            let bin = ctx.path().join("bin");
            std::fs::create_dir(&bin).expect("bin dir");
            std::fs::copy(&busybox, bin.join("busybox")).expect("copy busybox");
            for applet in [
                "sh", "sleep", "echo", "cat", "printf", "seq", "head", "tail", "true", "false",
                "env", "ls", "touch", "test", "[", "kill", "wc", "yes", "tr", "pwd", "setsid",
                "mkdir", "rm", "grep",
            ] {
                std::os::unix::fs::symlink("busybox", bin.join(applet)).expect("applet link");
            }
            std::fs::write(
                ctx.path().join("Dockerfile"),
                "FROM scratch\nCOPY bin /bin\nENV PATH=/bin\nCMD [\"sh\"]\n",
            )
            .expect("Dockerfile");
            let name = "gantry-test/busybox:1".to_string();
            let out = tokio::process::Command::new("docker")
                .args(["build", "-q", "-t", &name])
                .arg(ctx.path())
                .env("DOCKER_BUILDKIT", "0")
                .output()
                .await
                .expect("run docker build");
            assert!(
                out.status.success(),
                "docker build of the test image failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            name
        })
        .await
        .clone()
}

/// A docker job running `sh -c script` in the test image.
pub async fn docker_sh(script: &str) -> pb::JobSpec {
    pb::JobSpec {
        executor: pb::ExecutorKind::Docker as i32,
        image: busybox_image().await,
        pull_policy: pb::PullPolicy::Never as i32,
        command: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

/// Follows a job's stdout until it contains `needle`.
pub async fn wait_for_output(jobs: &mut JobServiceClient<Authed>, id: &str, needle: &str) {
    let mut stream = jobs
        .get_logs(pb::GetLogsRequest {
            job_id: id.into(),
            follow: true,
            ..Default::default()
        })
        .await
        .expect("get logs")
        .into_inner();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let next = tokio::time::timeout_at(deadline, stream.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "job {id} never printed {needle:?}; output: {}",
                    String::from_utf8_lossy(&seen)
                )
            });
        match next {
            Some(Ok(chunk)) => {
                seen.extend_from_slice(&chunk.data);
                if String::from_utf8_lossy(&seen).contains(needle) {
                    return;
                }
            }
            Some(Err(e)) => panic!("logs failed: {e}"),
            None => panic!(
                "job {id} ended without printing {needle:?}; output: {}",
                String::from_utf8_lossy(&seen)
            ),
        }
    }
}

/// A `gantry-server` process on a fixed loopback port and a SQLite file, which a test can
/// kill with SIGKILL and start again.
pub struct ServerProcess {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// The API token.
    pub api_token: String,
    /// The registration token.
    pub registration_token: String,
    listen: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
    args: Vec<String>,
    database_url: Option<String>,
}

impl ServerProcess {
    /// Starts a server with extra flags; waits until it answers.
    pub async fn start(args: &[&str]) -> ServerProcess {
        Self::start_on(None, args).await
    }

    /// Starts a server on `database_url` (default: a SQLite file of its own).
    pub async fn start_on(database_url: Option<String>, args: &[&str]) -> ServerProcess {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let listen = format!("127.0.0.1:{port}");
        let mut s = ServerProcess {
            url: format!("http://{listen}"),
            api_token: "test-api-token".into(),
            registration_token: "test-registration-token".into(),
            listen,
            dir: tempfile::tempdir().expect("server dir"),
            child: None,
            args: args.iter().map(|s| s.to_string()).collect(),
            database_url,
        };
        s.spawn().await;
        s
    }

    /// The server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .expect("server log");
        let db = self.database_url.clone().unwrap_or_else(|| {
            format!(
                "sqlite://{}?mode=rwc",
                self.dir.path().join("g.db").display()
            )
        });
        let child = tokio::process::Command::new(binary("gantry-server", "GANTRY_SERVER_BIN"))
            .args(["--listen", &self.listen, "--database-url", &db])
            .args(["--api-token", &self.api_token])
            .args(["--registration-token", &self.registration_token])
            .args(&self.args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn gantry-server");
        self.child = Some(child);
        let url = self.url.clone();
        eventually("gantry-server answers", || {
            let url = url.clone();
            async move {
                let channel = tonic::transport::Channel::from_shared(url)
                    .ok()?
                    .connect()
                    .await
                    .ok()?;
                let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
                health
                    .check(tonic_health::pb::HealthCheckRequest::default())
                    .await
                    .ok()
                    .map(|_| ())
            }
        })
        .await;
    }

    /// Kills the server with SIGKILL (a crash: nothing is flushed or closed).
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().await.expect("SIGKILL the server");
        }
    }

    /// Starts it again on the same port and database.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "kill the server first");
        self.spawn().await;
    }

    /// JobService with the API token.
    pub async fn jobs(&self) -> JobServiceClient<Authed> {
        JobServiceClient::with_interceptor(
            crate::channel(&self.url).await,
            crate::Bearer::new(&self.api_token),
        )
    }

    /// SandboxService with the API token.
    pub async fn sandboxes(&self) -> crate::Sandboxes {
        pb::sandbox_service_client::SandboxServiceClient::with_interceptor(
            crate::channel(&self.url).await,
            crate::Bearer::new(&self.api_token),
        )
    }

    /// What the server logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Its local blob directory (the default beside its SQLite file), when it has one.
    pub fn blob_dir(&self) -> Option<PathBuf> {
        self.database_url
            .is_none()
            .then(|| self.dir.path().join("g.db.blobs"))
    }
}

/// A TCP proxy on loopback standing for the network between a runner and the server. `cut`
/// turns it into a black hole (connections stay open but nothing crosses, as when a cable is
/// pulled); `restore` drops the black-holed connections and forwards new ones again.
pub struct Proxy {
    /// Where clients connect.
    pub addr: std::net::SocketAddr,
    cut: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Forwards connections to `upstream`.
    pub async fn start(upstream: std::net::SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (cut, cut_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let mut cut_rx = cut_rx.clone();
                tokio::spawn(async move {
                    // A connection made while cut is held until restored, then dropped.
                    if *cut_rx.borrow_and_update() {
                        let _ = cut_rx.wait_for(|cut| !cut).await;
                        return;
                    }
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = async { cut_rx.wait_for(|cut| *cut).await.map(|_| ()) } => {
                            // Black hole: hold both ends, forward nothing, until restored.
                            let _ = cut_rx.wait_for(|cut| !cut).await;
                        }
                    }
                });
            }
        });
        Proxy { addr, cut, task }
    }

    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Nothing crosses any more.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Traffic flows again (connections from before are gone).
    pub fn restore(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a finished `gantry` command did.
#[derive(Debug)]
pub struct CliRun {
    /// Exit status.
    pub code: i32,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
}

/// Runs the real `gantry` binary against `server` (`GANTRY_SERVER`, `GANTRY_TOKEN`), without
/// a terminal and without colours.
pub async fn gantry(server: &str, token: &str, args: &[&str]) -> CliRun {
    let out = tokio::time::timeout(
        PATIENCE,
        tokio::process::Command::new(binary("gantry", "GANTRY_CLI_BIN"))
            .args(args)
            .env("GANTRY_SERVER", server)
            .env("GANTRY_TOKEN", token)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("gantry {args:?} did not finish"))
    .expect("run gantry");
    CliRun {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
