//! A private S3-compatible server for one test: the `s3s` crate's S3 HTTP API over a directory
//! (`s3s_fs::FileSystem`), served in this test process with hyper on its own port on 127.0.0.1,
//! with one bucket and the access key / secret checked on every request, stopped when dropped.
//! The proxy talks to it over a real socket with its real `object_store` client. The server runs
//! on a thread and runtime of its own, so it outlives nothing and depends on no test's runtime.
//! Objects are files under [`S3Server::bucket_dir`], so tests can see what exists.

use std::path::PathBuf;
use std::thread::JoinHandle;

use fhir_bulk_proxy::config::{Config, StorageBackend};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;

pub const BUCKET: &str = "exports";
pub const ACCESS_KEY: &str = "test-access-key";
pub const SECRET_KEY: &str = "test-secret-key";

pub struct S3Server {
    port: u16,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    root: tempfile::TempDir,
}

impl S3Server {
    /// Starts a server on a free port with the bucket created; it accepts connections on return.
    pub fn start() -> Self {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(root.path().join(BUCKET)).expect("bucket dir");
        let backend = s3s_fs::FileSystem::new(root.path()).expect("s3s-fs over the temp dir");
        let service = {
            let mut builder = S3ServiceBuilder::new(backend);
            builder.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
            builder.build()
        };
        // Bound before the thread starts: connections queue from now on.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("local addr").port();
        let (shutdown, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("s3-{port}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .expect("S3 server runtime");
                runtime.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                    let http = ConnBuilder::new(TokioExecutor::new());
                    loop {
                        let socket = tokio::select! {
                            accepted = listener.accept() => match accepted {
                                Ok((socket, _)) => socket,
                                Err(_) => continue,
                            },
                            _ = &mut stopped => break,
                        };
                        let connection = http
                            .serve_connection(TokioIo::new(socket), service.clone())
                            .into_owned();
                        tokio::spawn(async move {
                            let _ = connection.await;
                        });
                    }
                });
                // Dropping the runtime ends the connections still open.
            })
            .expect("spawn the S3 server thread");
        Self {
            port,
            shutdown: Some(shutdown),
            thread: Some(thread),
            root,
        }
    }

    fn stop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The directory holding the bucket's objects.
    pub fn bucket_dir(&self) -> PathBuf {
        self.root.path().join(BUCKET)
    }

    /// Object keys under `prefix` (relative to the bucket), sorted; s3s-fs keeps its own
    /// bookkeeping in dot-files, which are not objects.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let mut keys = Vec::new();
        let mut dirs = vec![self.bucket_dir().join(prefix)];
        while let Some(dir) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue;
                }
                if path.is_dir() {
                    dirs.push(path);
                } else if let Ok(rel) = path.strip_prefix(self.bucket_dir()) {
                    keys.push(rel.to_string_lossy().into_owned());
                }
            }
        }
        keys.sort();
        keys
    }

    /// Points `config` at this server's bucket.
    pub fn configure(&self, config: &mut Config) {
        config.storage.backend = StorageBackend::S3;
        let s3 = &mut config.storage.s3;
        s3.bucket = BUCKET.into();
        s3.endpoint = Some(self.endpoint());
        s3.allow_http = true;
        s3.region = "us-east-1".into();
        s3.access_key_id = Some(ACCESS_KEY.into());
        s3.secret_access_key = Some(SECRET_KEY.into());
        s3.prefix = "bulk".into();
        s3.part_size_bytes = 5 * 1024 * 1024;
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}
