//! The proxy binary as a child process, for tests that kill it (SIGKILL) and start it again. It
//! listens on a port it binds itself (`127.0.0.1:0`, read back from its start-up log line), so no
//! other process can take the port between choosing and binding it. Its log (stderr, JSON unless
//! the environment asks for text) is kept for the test to wait on and search. Waiting blocks the thread (`block_in_place`): call it from a
//! multi-thread runtime.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Log {
    lines: Mutex<Vec<String>>,
    grew: Condvar,
}

pub struct ProxyProcess {
    pub addr: SocketAddr,
    child: Option<Child>,
    log: Arc<Log>,
}

impl ProxyProcess {
    /// Starts the binary with `config` (a TOML file) and the extra environment `env`, at log level
    /// `level`, and waits until it listens.
    pub fn spawn(config: &Path, level: &str, env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(binary());
        command
            .args(["--config", &config.display().to_string()])
            .env("BULK_PROXY_SERVER__LISTEN", "127.0.0.1:0")
            .env("BULK_PROXY_LOG__FORMAT", "json")
            .env("BULK_PROXY_LOG__LEVEL", level)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().expect("spawn the proxy binary");
        let log = Arc::new(Log::default());
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lines.lock().unwrap().push(line);
                sink.grew.notify_all();
            }
        });
        let mut process = Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            child: Some(child),
            log,
        };
        let line = process
            .wait_for_log("fhir-bulk-proxy listening", Duration::from_secs(30))
            .unwrap_or_else(|| panic!("the proxy did not start:\n{}", process.logs().join("\n")));
        let listen = match serde_json::from_str::<serde_json::Value>(&line) {
            Ok(event) => event["listen"].as_str().map(str::to_owned),
            // Text: `... fhir-bulk-proxy listening listen=127.0.0.1:PORT tls=false ...`.
            Err(_) => line
                .split_whitespace()
                .find_map(|field| field.strip_prefix("listen="))
                .map(str::to_owned),
        };
        process.addr = listen
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no listen address in {line}"));
        process
    }

    /// `http://127.0.0.1:PORT/fhir` (the default base path).
    pub fn base(&self) -> String {
        format!("http://{}/fhir", self.addr)
    }

    /// The first log line containing `needle`, waiting up to `timeout` for it.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        tokio::task::block_in_place(|| {
            let mut lines = self.log.lines.lock().unwrap();
            loop {
                if let Some(line) = lines.iter().find(|l| l.contains(needle)) {
                    return Some(line.clone());
                }
                let left = deadline.checked_duration_since(Instant::now())?;
                lines = self.log.grew.wait_timeout(lines, left).unwrap().0;
            }
        })
    }

    /// How many log lines contain `needle`.
    pub fn count_logs(&self, needle: &str) -> usize {
        self.log
            .lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Every log line so far.
    pub fn logs(&self) -> Vec<String> {
        self.log.lines.lock().unwrap().clone()
    }

    /// SIGKILL: no shutdown, no release of leases or claims.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The proxy binary Cargo built beside the running test or benchmark: `target/PROFILE/deps/TEST`
/// runs, `target/PROFILE/fhir-bulk-proxy` is the binary (Cargo builds a package's binaries before
/// its integration tests and benchmarks). `FBP_PROXY_BIN` names another one.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("FBP_PROXY_BIN") {
        return path.into();
    }
    let exe = std::env::current_exe().expect("the running test's path");
    let profile = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test runs from target/PROFILE/deps");
    let binary = profile.join("fhir-bulk-proxy");
    assert!(
        binary.exists(),
        "{} does not exist: build the proxy first (cargo build), or set FBP_PROXY_BIN",
        binary.display()
    );
    binary
}

impl ProxyProcess {
    /// SIGTERM, then waits (at most 20 s) for the process to exit; returns its exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("the proxy is running");
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("run kill");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("wait for the proxy") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the proxy did not stop after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Asserts that a command (the proxy binary's `keygen`, `check-config`, `jobs`...) succeeded,
/// showing its stderr if not.
pub fn assert_succeeded(output: &std::process::Output) {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The job store a test's proxy processes share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    Embedded,
    Redis,
}

impl Store {
    /// Points `config` at this store: the embedded file in `dir`, or a Redis started for the
    /// test (returned: it stops when dropped).
    pub fn configure(
        self,
        config: &mut fhir_bulk_proxy::config::Config,
        dir: &Path,
    ) -> Option<crate::RedisServer> {
        match self {
            Store::Embedded => {
                config.store.path = dir.join("jobs.redb");
                None
            }
            Store::Redis => {
                let redis = crate::RedisServer::start();
                config.store.backend = fhir_bulk_proxy::config::StoreBackend::Redis;
                config.store.redis_url = Some(redis.url().into());
                Some(redis)
            }
        }
    }
}

/// An access token for `client` from `proxy`, whose public base is `public` (the assertion's
/// `aud` is `{public}/token`).
pub async fn token(
    client: &crate::smart::SmartClient,
    proxy: &ProxyProcess,
    public: &str,
) -> String {
    let assertion = client.key.assertion(&client.id, &format!("{public}/token"));
    let response = crate::plain_client()
        .post(format!("{}/token", proxy.base()))
        .form(&crate::smart::token_form(&assertion, "system/*.read"))
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = response.json().await.unwrap();
    body["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("{body}"))
        .to_owned()
}

/// One upstream, one job store and one file directory, written to a configuration file, shared
/// by the proxy processes a test starts one after the other (or side by side). Clients and status
/// URLs name [`Processes::PUBLIC`]; [`Processes::on`] points them at a running process.
pub struct Processes {
    pub fhir: crate::memory_fhir::RunningFhir,
    pub config: fhir_bulk_proxy::config::Config,
    pub config_path: PathBuf,
    pub client: crate::smart::SmartClient,
    _redis: Option<crate::RedisServer>,
    _dir: tempfile::TempDir,
}

impl Processes {
    /// The public base every process names.
    pub const PUBLIC: &str = "http://fhir.example.test/fhir";

    /// `fhir` upstream, `store`, short leases and sweeps, 1 s polls and a registered client;
    /// then `configure`.
    pub fn new(
        store: Store,
        fhir: crate::memory_fhir::RunningFhir,
        configure: impl FnOnce(&mut fhir_bulk_proxy::config::Config),
    ) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut config = fhir_bulk_proxy::config::Config::default();
        config.upstream.url = fhir.url();
        config.server.public_url = Some(Self::PUBLIC.into());
        config.storage.path = dir.path().join("files");
        let redis = store.configure(&mut config, dir.path());
        config.export.lease_secs = 2;
        config.export.sweep_interval_secs = 1;
        config.export.poll_retry_after_secs = 1;
        let client = crate::smart::SmartClient::register(&mut config);
        configure(&mut config);
        let config_path = dir.path().join("proxy.toml");
        let text = toml::to_string(&config).expect("the configuration as TOML");
        std::fs::write(&config_path, text).expect("write proxy.toml");
        Self {
            fhir,
            config,
            config_path,
            client,
            _redis: redis,
            _dir: dir,
        }
    }

    /// A process with the extra environment `env`.
    pub fn spawn(&self, env: &[(&str, &str)]) -> ProxyProcess {
        ProxyProcess::spawn(&self.config_path, "info", env)
    }

    /// An access token from `proxy` for the registered client.
    pub async fn token(&self, proxy: &ProxyProcess) -> String {
        token(&self.client, proxy, Self::PUBLIC).await
    }

    /// `url` (under [`Processes::PUBLIC`]) on `proxy`.
    pub fn on(proxy: &ProxyProcess, url: &str) -> String {
        url.replace(Self::PUBLIC, &proxy.base())
    }
}
