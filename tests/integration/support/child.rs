//! The proxy binary as a child process: its configuration written as a file, `server.listen` on
//! port 0 (the child binds it and its start-up log line says which port: no race with another
//! process picking the same free port), its JSON log in a file the test can read.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fhir_bulk_proxy::config::Config;
use serde_json::Value;

pub struct ChildProxy {
    pub addr: SocketAddr,
    pub config: Config,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ChildProxy {
    /// Starts the binary with `config` (its store and files in a temporary directory unless set)
    /// and `log_level`; waits until it listens.
    pub fn spawn(mut config: Config, log_level: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let defaults = Config::default();
        if config.store.path == defaults.store.path {
            config.store.path = dir.path().join("jobs.redb");
        }
        if config.storage.path == defaults.storage.path {
            config.storage.path = dir.path().join("files");
        }
        config.server.listen = "127.0.0.1:0".into();
        let config_path = dir.path().join("proxy.toml");
        std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
        let log = dir.path().join("proxy.log");
        let child = Command::new(env!("CARGO_BIN_EXE_fhir-bulk-proxy"))
            .arg("--config")
            .arg(&config_path)
            .env("BULK_PROXY_LOG__LEVEL", log_level)
            .env("BULK_PROXY_LOG__FORMAT", "json")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn the proxy binary");
        let addr = listening_addr(&log);
        Self {
            addr,
            config,
            child,
            log,
            _dir: dir,
        }
    }

    /// `http://127.0.0.1:PORT` + the base path.
    pub fn base(&self) -> String {
        format!("http://{}{}", self.addr, self.config.base_path())
    }

    /// Everything the child has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ChildProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address of the start-up line (`"message":"fhir-bulk-proxy listening","listen":...`).
fn listening_addr(log: &Path) -> SocketAddr {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let listen = text
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .find(|line| line["message"] == "fhir-bulk-proxy listening")
            .and_then(|line| line["listen"].as_str().and_then(|a| a.parse().ok()));
        if let Some(addr) = listen {
            return addr;
        }
        assert!(
            Instant::now() < deadline,
            "the proxy did not start within 20 s:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}
