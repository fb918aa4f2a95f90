//! A real proxy (`server::run`) on `127.0.0.1:0`, stopped when dropped or by [`TestProxy::shutdown`].

use std::net::SocketAddr;

use fhir_bulk_proxy::config::Config;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct TestProxy {
    pub addr: SocketAddr,
    pub config: Config,
    /// Job store and files of this proxy, unless the test chose its own paths.
    _dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestProxy {
    /// A configuration for `upstream` with test-friendly defaults.
    pub fn config(upstream: &str) -> Config {
        let mut config = Config::default();
        config.upstream.url = upstream.to_owned();
        config.server.listen = "127.0.0.1:0".into();
        config.server.shutdown_grace_secs = 5;
        config
    }

    pub async fn start(mut config: Config) -> Self {
        let defaults = Config::default();
        let dir = tempfile::tempdir().unwrap();
        if config.store.path == defaults.store.path {
            config.store.path = dir.path().join("jobs.redb");
        }
        if config.storage.path == defaults.storage.path {
            config.storage.path = dir.path().join("files");
        }
        config.validate().expect("valid test configuration");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(fhir_bulk_proxy::server::run(
            config.clone(),
            listener,
            async move {
                let _ = stopped.await;
            },
        ));
        let proxy = Self {
            addr,
            config,
            _dir: dir,
            stop: Some(stop),
            task: Some(task),
        };
        proxy.wait_until_serving().await;
        proxy
    }

    /// Start-up (store, keys, clients) happens inside `server::run`: wait until it answers.
    async fn wait_until_serving(&self) {
        let client = reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .build()
            .unwrap();
        let scheme = if self.config.server.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let health = format!("{scheme}://{}/healthz", self.addr);
        for _ in 0..200 {
            if let Ok(response) = client.get(&health).send().await
                && response.status().is_success()
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        panic!("the proxy did not start within 5 s");
    }

    /// `http://127.0.0.1:PORT` + the base path.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}{}", self.addr, self.config.base_path(), path)
    }

    /// `http://127.0.0.1:PORT` + `path` (outside the FHIR base).
    pub fn root(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Signals shutdown and waits for `server::run` to return.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.take().unwrap().await.unwrap()
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}
