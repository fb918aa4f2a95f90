//! A private S3-compatible server for one test: `s3s-fs` (crates.io, a real S3 HTTP API over a
//! directory, installed by `.ci/setup`) on its own port on 127.0.0.1, with one bucket, killed
//! when dropped. Objects are files under [`S3Server::bucket_dir`], so tests can see what exists.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fhir_bulk_proxy::config::{Config, StorageBackend};

pub const BUCKET: &str = "exports";
pub const ACCESS_KEY: &str = "test-access-key";
pub const SECRET_KEY: &str = "test-secret-key";

pub struct S3Server {
    port: u16,
    child: Option<Child>,
    root: tempfile::TempDir,
}

/// The server binary: on PATH, or where `cargo install` put it. A missing binary fails the test
/// (never skips it): `.ci/setup` installs it.
fn binary() -> PathBuf {
    let home_bin = std::env::var_os("HOME")
        .map(|home| PathBuf::from(home).join(".cargo/bin/s3s-fs"))
        .filter(|p| p.is_file());
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("s3s-fs"))
            .find(|p| p.is_file())
    });
    on_path.or(home_bin).unwrap_or_else(|| {
        panic!(
            "s3s-fs is not installed: the object-storage tests need a real S3-compatible server; \
             run .ci/setup (cargo install --locked s3s-fs --version 0.14.0 --features binary)"
        )
    })
}

impl S3Server {
    /// Starts a server on a free port with the bucket created, and waits until it accepts.
    pub fn start() -> Self {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(root.path().join(BUCKET)).expect("bucket dir");
        let binary = binary();
        // A free port can be taken between probing and binding: try a few.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port();
            let mut child = Command::new(&binary)
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
                .arg(root.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn s3s-fs");
            if wait_ready(&mut child, port) {
                return Self {
                    port,
                    child: Some(child),
                    root,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("could not start s3s-fs");
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
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

fn wait_ready(child: &mut Child, port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return false;
        }
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}
