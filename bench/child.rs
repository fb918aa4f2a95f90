//! The proxy binary as a benchmark's child process: a fresh ES384 client key registered in its
//! configuration, its job store and files in a temporary directory, each stderr line handed to
//! the caller. Shared by the benchmarks, each of which uses part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use testkit::client::ClientKey;

/// The client id every benchmark registers.
pub const CLIENT_ID: &str = "bench";
/// The signing secret of the benchmarks' proxies (32+ bytes).
pub const SIGNING_SECRET: &str = "benchmark-proxy-signing-secret-0123456789";

pub struct ChildProxy {
    child: Child,
    pub port: u16,
    /// `http://127.0.0.1:PORT` + the upstream's base path.
    pub base: String,
    pub key: ClientKey,
    /// The configuration file the child reads (the environment adds to it).
    pub config_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl ChildProxy {
    /// Starts the release binary in front of `upstream_url`; `auth_extra` is appended to its
    /// `[auth]` table, `env` are more `BULK_PROXY_*` settings, and `on_line` sees every line the
    /// proxy writes to stderr (text logs at `log_level`). Waits until `/healthz` answers.
    pub fn start(
        upstream_url: &str,
        auth_extra: &str,
        log_level: &str,
        env: &[(&str, String)],
        mut on_line: impl FnMut(String) + Send + 'static,
    ) -> Result<Self> {
        let bin = PathBuf::from(env!("CARGO_BIN_EXE_fhir-bulk-proxy"));
        ensure!(bin.exists(), "no proxy binary at {}", bin.display());
        let dir = tempfile::tempdir()?;
        let key = fhir_bulk_proxy::auth::keygen::generate(
            fhir_bulk_proxy::auth::keygen::KeyAlgorithm::Es384,
        )?;
        let config_path = dir.path().join("proxy.toml");
        std::fs::write(
            &config_path,
            format!(
                "[auth]\nsigning_secret = \"{SIGNING_SECRET}\"\n{auth_extra}\n\n[[auth.clients]]\nclient_id = \"{CLIENT_ID}\"\nscopes = [\"system/*.read\"]\njwks = '''{}'''\n\n[export]\npoll_retry_after_secs = 1\n",
                key.public_jwks
            ),
        )?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut child = Command::new(&bin)
            .arg("--config")
            .arg(&config_path)
            .env("BULK_PROXY_UPSTREAM__URL", upstream_url)
            .env("BULK_PROXY_SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .env("BULK_PROXY_STORE__PATH", dir.path().join("jobs.redb"))
            .env("BULK_PROXY_STORAGE__PATH", dir.path().join("files"))
            .env("BULK_PROXY_LOG__LEVEL", log_level)
            .env("BULK_PROXY_LOG__FORMAT", "text")
            .env("NO_COLOR", "1")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stderr = child.stderr.take().context("stderr")?;
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                on_line(line);
            }
        });
        let path = url::Url::parse(upstream_url)?
            .path()
            .trim_end_matches('/')
            .to_owned();
        let proxy = Self {
            child,
            port,
            base: format!("http://127.0.0.1:{port}{path}"),
            key: ClientKey::from_json(&key.private_jwk)?,
            config_path,
            _dir: dir,
        };
        proxy.wait_until_serving()?;
        Ok(proxy)
    }

    fn wait_until_serving(&self) -> Result<()> {
        for _ in 0..400 {
            if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = stream
                    .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                let mut answer = String::new();
                let _ = std::io::Read::read_to_string(&mut stream, &mut answer);
                if answer.starts_with("HTTP/1.1 200") {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        bail!("the proxy did not start within 10 s")
    }

    /// An access token for `system/*.read`.
    pub async fn token(&self, http: &reqwest::Client) -> Result<String> {
        let token_url = format!("{}/token", self.base);
        let assertion = self.key.assertion(CLIENT_ID, &token_url)?;
        let response = http
            .post(&token_url)
            .form(&[
                ("grant_type", "client_credentials"),
                ("scope", "system/*.read"),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", &assertion),
            ])
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await?;
        ensure!(status == 200, "token refused: {body}");
        body["access_token"]
            .as_str()
            .map(str::to_owned)
            .context("no access_token")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for ChildProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
