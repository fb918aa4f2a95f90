//! The hostile-input run (issue 14): 120,000 generated requests against a release build of the
//! proxy, across kick-off (GET query strings, POST `Parameters` bodies), status, files, `/token`
//! and passthrough. Not a timed benchmark: it counts what must never happen.
//!
//! ```sh
//! cargo bench --bench hostile                        # 120,000 requests, 16 at a time (≈ 2 min)
//! cargo bench --bench hostile -- --write-results     # ... and write the "Hostile input" section of bench/RESULTS.md
//! cargo bench --bench hostile -- --requests 20000 --concurrency 8 --seed 7
//! ```
//!
//! Options (or environment): `--requests N` (`BENCH_REQUESTS`, 120000), `--concurrency N`
//! (`BENCH_CONCURRENCY`, 16: connections in flight), `--seed N` (`BENCH_SEED`, 14: the same seed
//! generates the same requests), `--write-results`.
//!
//! The requests, and the properties each answer must have, are the property tests' own
//! (`tests/integration/hostile_input/corpus.rs`, included here): every request goes on a new
//! connection as raw bytes; the answer must be complete by its own framing, never a 5xx the proxy
//! made, a 4xx an OperationOutcome (OAuth error JSON at `/token`), a file answer the export's
//! file. Two processes: the **proxy** (the release binary Cargo builds for this bench, a temp
//! `proxy.toml`: one client, `system/*.read`, embedded store; otherwise the defaults, fast path
//! included) and this one, the **driver**, which also serves the **upstream** (the in-memory FHIR
//! server: 3 patients with 2 Observations each and a Group).
//!
//! Counted: panics (lines with "panicked" on the proxy's stderr, and the process must still be
//! alive at the end), 5xx from the proxy's own making, dropped connections (closed, reset or cut
//! short before a complete answer; no answer within 10 s), other broken properties, and the
//! proxy's peak RSS (`VmHWM` in `/proc/PID/status`). The only upstream failures are deliberate:
//! searches of the type `Broken`, which the upstream answers 500 with the diagnostics "Broken
//! searches are broken"; a passthrough 5xx counts as the upstream's only when the request was such
//! a search and the body is exactly that OperationOutcome (for HEAD, which has no body, the
//! status 500). Any other 5xx counts against the proxy. Answers that break a property because of
//! a known bug elsewhere (`corpus::known_failure`) are counted in their own column, by kind.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config as ProptestConfig, RngAlgorithm, TestRng, TestRunner};
use serde_json::{Value, json};
use testkit::memory_fhir::{MemoryFhir, RunningFhir};

mod child;
#[path = "../tests/integration/hostile_input/corpus.rs"]
mod corpus;
mod procfs;
mod results;

use child::{CLIENT_ID, ChildProxy};
use corpus::{Endpoint, Hostile, Verdict};
use procfs::proc_status;

/// How long one exchange may take before it counts as no answer.
const DEADLINE: Duration = Duration::from_secs(10);

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; it means nothing here.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let opts = <Opts as clap::Parser>::parse_from(std::iter::once("hostile".into()).chain(args));
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(opts))
}

/// The options; each also read from the environment.
#[derive(clap::Parser)]
struct Opts {
    /// Requests to send.
    #[arg(long, env = "BENCH_REQUESTS", default_value_t = 120_000)]
    requests: u64,
    /// Connections in flight.
    #[arg(long, env = "BENCH_CONCURRENCY", default_value_t = 16)]
    concurrency: usize,
    /// The same seed generates the same requests.
    #[arg(long, env = "BENCH_SEED", default_value_t = 14)]
    seed: u64,
    /// Write the "Hostile input" section of bench/RESULTS.md.
    #[arg(long)]
    write_results: bool,
}

impl Opts {
    fn command(&self) -> String {
        format!(
            "cargo bench --bench hostile -- --requests {} --concurrency {} --seed {}{}",
            self.requests,
            self.concurrency,
            self.seed,
            if self.write_results {
                " --write-results"
            } else {
                ""
            }
        )
    }
}

async fn run(opts: Opts) -> Result<()> {
    let fhir = upstream().await?;
    let mut proxy = Proxy::start(&fhir.url())?;
    let http = reqwest::Client::new();
    let bearer = proxy.process.token(&http).await?;
    let (job_id, file_name, file_body) =
        finished_export(&http, &proxy.process.base, &bearer).await?;
    let key = proxy.process.key.clone();
    let token_url = format!("{}/token", proxy.process.base);
    let target = corpus::Target {
        host: format!("127.0.0.1:{}", proxy.process.port),
        base: "/fhir".to_owned(),
        token_path: "/token".to_owned(),
        client_id: CLIENT_ID.to_owned(),
        bearer,
        group_id: "g1".to_owned(),
        job_id,
        file_name,
        file_body,
        assertion: Arc::new(move || key.assertion(CLIENT_ID, &token_url).unwrap_or_default()),
    };
    let hwm_before = proc_status(proxy.process.pid(), "VmHWM")?;

    // One thread generates (the same seed, the same requests); `concurrency` tasks send.
    let (tx, rx) = tokio::sync::mpsc::channel::<Hostile>(1024);
    let generator = {
        let target = target.clone();
        let (count, seed) = (opts.requests, opts.seed);
        std::thread::spawn(move || {
            let mut seed_bytes = [0u8; 32];
            seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
            let mut runner = TestRunner::new_with_rng(
                ProptestConfig::default(),
                TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
            );
            let strategy = corpus::any_request(&target);
            for _ in 0..count {
                let Ok(tree) = strategy.new_tree(&mut runner) else {
                    break;
                };
                if tx.blocking_send(tree.current()).is_err() {
                    break;
                }
            }
        })
    };
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let done = Arc::new(AtomicU64::new(0));
    let addr: std::net::SocketAddr = target.host.parse()?;
    let started = Instant::now();
    let mut senders = Vec::new();
    for _ in 0..opts.concurrency {
        let (rx, tally, done, target) = (rx.clone(), tally.clone(), done.clone(), target.clone());
        senders.push(tokio::spawn(async move {
            loop {
                let Some(request) = rx.lock().await.recv().await else {
                    return;
                };
                let answer = corpus::exchange(addr, &request, DEADLINE).await;
                tally
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .record(&target, &request, answer);
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                if n % 10_000 == 0 {
                    eprintln!("{n} requests, {:.0} s", started.elapsed().as_secs_f64());
                }
            }
        }));
    }
    for sender in senders {
        sender.await?;
    }
    let _ = generator.join();
    let wall = started.elapsed();

    let alive = proxy.process.alive();
    let hwm = proc_status(proxy.process.pid(), "VmHWM")?;
    let rss = proc_status(proxy.process.pid(), "VmRSS")?;
    let health = http
        .get(format!("http://127.0.0.1:{}/healthz", proxy.process.port))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0);
    let log = proxy.log.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let tally = Arc::try_unwrap(tally)
        .ok()
        .context("senders still running")?
        .into_inner()
        .unwrap_or_else(|e| e.into_inner());
    let report = report(
        &opts,
        &tally,
        &log,
        alive && health == 200,
        (hwm_before, hwm, rss),
        wall,
    )?;
    println!("{report}");
    if opts.write_results {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/RESULTS.md");
        results::write_section(&path, "## Hostile input", &report)?;
        eprintln!("wrote the Hostile input section of {}", path.display());
    }
    ensure!(
        tally.failures() == 0 && log.panics == 0 && alive,
        "the proxy broke a property (see the report)"
    );
    drop(fhir);
    Ok(())
}

/// What happened to the requests of one endpoint.
#[derive(Default, Clone)]
struct Counts {
    requests: u64,
    ok_2xx: u64,
    client_4xx: u64,
    /// Requests that are not valid HTTP (answered by the HTTP layer).
    not_http: u64,
    upstream_5xx: u64,
    known: u64,
    own_5xx: u64,
    broken: u64,
    dropped: u64,
}

#[derive(Default)]
struct Tally {
    by_endpoint: BTreeMap<Endpoint, Counts>,
    known: BTreeMap<&'static str, u64>,
    /// The first few failures of each kind, with the request and the answer.
    examples: BTreeMap<String, (u64, String)>,
}

impl Tally {
    fn record(
        &mut self,
        target: &corpus::Target,
        request: &Hostile,
        answer: Result<corpus::Answer, corpus::Dropped>,
    ) {
        let counts = self.by_endpoint.entry(request.endpoint).or_default();
        counts.requests += 1;
        if request.is_not_http() {
            counts.not_http += 1;
        }
        let answer = match answer {
            Ok(answer) => answer,
            Err(dropped) => {
                counts.dropped += 1;
                self.example(format!("dropped: {dropped:?}"), request, "");
                return;
            }
        };
        match answer.status {
            200..=299 => counts.ok_2xx += 1,
            400..=499 => counts.client_4xx += 1,
            _ => {}
        }
        match corpus::judge(target, request, &answer) {
            Ok(Verdict::Fine) => {}
            Ok(Verdict::UpstreamFailure) => counts.upstream_5xx += 1,
            Ok(Verdict::Known(what)) => {
                counts.known += 1;
                *self.known.entry(what).or_default() += 1;
            }
            Err(violation) => {
                if answer.status >= 500 {
                    counts.own_5xx += 1;
                } else {
                    counts.broken += 1;
                }
                let shown = format!(
                    "{} {:?} {}",
                    answer.status,
                    answer.headers,
                    String::from_utf8_lossy(&answer.body[..answer.body.len().min(600)])
                );
                self.example(violation, request, &shown);
            }
        }
    }

    fn example(&mut self, kind: String, request: &Hostile, answer: &str) {
        let entry = self.examples.entry(kind).or_insert((0, String::new()));
        entry.0 += 1;
        if entry.1.is_empty() {
            let text = format!("{request:?}");
            entry.1 = format!(
                "{}\n(a {}-byte body)\n→ {answer}",
                text.chars().take(1500).collect::<String>(),
                request.body_len
            );
        }
    }

    fn total(&self) -> Counts {
        let mut t = Counts::default();
        for c in self.by_endpoint.values() {
            t.requests += c.requests;
            t.ok_2xx += c.ok_2xx;
            t.client_4xx += c.client_4xx;
            t.not_http += c.not_http;
            t.upstream_5xx += c.upstream_5xx;
            t.known += c.known;
            t.own_5xx += c.own_5xx;
            t.broken += c.broken;
            t.dropped += c.dropped;
        }
        t
    }

    fn failures(&self) -> u64 {
        let t = self.total();
        t.own_5xx + t.broken + t.dropped
    }
}

fn report(
    opts: &Opts,
    tally: &Tally,
    log: &Log,
    alive: bool,
    (hwm_before, hwm, rss): (u64, u64, u64),
    wall: Duration,
) -> Result<String> {
    use std::fmt::Write as _;
    let mut out = String::new();
    let t = tally.total();
    writeln!(out, "## Hostile input\n")?;
    writeln!(
        out,
        "Date: {}. Machine: {} CPUs, shared with other work. Build: the release binary at {}.",
        fhir_bulk_proxy::fhir::Instant::now(),
        std::thread::available_parallelism().map_or(0, usize::from),
        git_head()
    )?;
    writeln!(
        out,
        "Command: `{}` ({} requests in {:.0} s, {:.0} requests/s, {} connections at a time).\n",
        opts.command(),
        t.requests,
        wall.as_secs_f64(),
        t.requests as f64 / wall.as_secs_f64(),
        opts.concurrency
    )?;
    writeln!(
        out,
        "Requests generated by `tests/integration/hostile_input/corpus.rs` (the property tests' corpus), each on a new connection; \
         the proxy a child process with default settings but one registered client; the upstream the in-memory FHIR server, \
         whose only failures are the deliberate ones (a search of the type `Broken` answers 500, \"Broken searches are broken\"). \
         \"not HTTP\": requests that are not valid HTTP/1.1 (target not a URI, longer than 64 KiB, wrong form), answered by the HTTP layer; \
         they are included in the other columns.\n"
    )?;
    writeln!(
        out,
        "| endpoint | requests | 2xx | 4xx | of them not HTTP | upstream 5xx (deliberate) | known failures | 5xx of the proxy's own | other broken properties | dropped / no answer |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    let row = |out: &mut String, name: &str, c: &Counts| {
        writeln!(
            out,
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            c.requests,
            c.ok_2xx,
            c.client_4xx,
            c.not_http,
            c.upstream_5xx,
            c.known,
            c.own_5xx,
            c.broken,
            c.dropped
        )
    };
    for (endpoint, counts) in &tally.by_endpoint {
        row(&mut out, endpoint.name(), counts)?;
    }
    row(&mut out, "**all**", &t)?;
    writeln!(out)?;
    writeln!(
        out,
        "- Panics (lines with \"panicked\" on the proxy's stderr): **{}**; the process alive and `/healthz` 200 at the end: **{}**.",
        log.panics,
        if alive { "yes" } else { "NO" }
    )?;
    writeln!(
        out,
        "- 5xx of the proxy's own: **{}**; other broken properties: **{}**; dropped connections or no answer within {} s: **{}**.",
        t.own_5xx,
        t.broken,
        DEADLINE.as_secs(),
        t.dropped
    )?;
    writeln!(
        out,
        "- Peak RSS of the proxy (VmHWM): **{:.1} MB** (after set-up, before the run: {:.1} MB; VmRSS at the end {:.1} MB).",
        hwm as f64 / 1e6,
        hwm_before as f64 / 1e6,
        rss as f64 / 1e6
    )?;
    writeln!(
        out,
        "- The proxy's log (level `warn`): {} WARN and {} ERROR lines.",
        log.warn, log.error
    )?;
    if !tally.known.is_empty() {
        writeln!(
            out,
            "\nKnown failures (bugs outside this work, reported with issue 14):\n"
        )?;
        for (what, count) in &tally.known {
            writeln!(out, "- {count} × {what}")?;
        }
    }
    if !tally.examples.is_empty() {
        writeln!(out, "\nFailures, the first of each kind:\n")?;
        for (kind, (count, example)) in &tally.examples {
            writeln!(out, "- {count} × {kind}:\n\n```\n{example}\n```")?;
        }
    }
    if !log.first.is_empty() {
        writeln!(out, "\nThe proxy's first WARN and ERROR lines:\n\n```")?;
        for line in &log.first {
            writeln!(out, "{line}")?;
        }
        writeln!(out, "```")?;
    }
    Ok(out)
}

fn git_head() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map_or_else(|| "?".to_owned(), |s| s.trim().to_owned())
}

// ---------------------------------------------------------------------------------------------
// The upstream, the proxy and one finished export.

async fn upstream() -> Result<RunningFhir> {
    let mut fhir = MemoryFhir::new().synthetic(3, 2);
    fhir.insert(json!({
        "resourceType": "Group", "id": "g1", "type": "person", "actual": true,
        "member": [{ "entity": { "reference": "Patient/pat-0" } }, { "entity": { "reference": "Patient/pat-1" } }]
    }));
    let fhir = fhir.start().await?;
    *fhir
        .faults
        .broken_type
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = Some(corpus::BROKEN_TYPE.to_owned());
    Ok(fhir)
}

/// What the proxy's stderr showed.
#[derive(Default, Clone)]
struct Log {
    panics: u64,
    warn: u64,
    error: u64,
    /// The first few WARN and ERROR lines.
    first: Vec<String>,
}

struct Proxy {
    process: ChildProxy,
    log: Arc<Mutex<Log>>,
}

impl Proxy {
    fn start(upstream_url: &str) -> Result<Self> {
        let log = Arc::new(Mutex::new(Log::default()));
        let seen = log.clone();
        let process = ChildProxy::start(
            upstream_url,
            "token_lifetime_secs = 3600",
            "warn",
            &[],
            move |line| {
                let mut log = seen.lock().unwrap_or_else(|e| e.into_inner());
                if line.contains("panicked") {
                    log.panics += 1;
                    eprintln!("[proxy] {line}");
                }
                let warn = line.contains(" WARN ");
                let error = line.contains(" ERROR ");
                log.warn += u64::from(warn);
                log.error += u64::from(error);
                if (warn || error) && log.first.len() < 5 {
                    log.first.push(line.chars().take(400).collect());
                }
            },
        )?;
        Ok(Self { process, log })
    }
}

/// Runs a Patient export to completion: its id, its first file's name and bytes.
async fn finished_export(
    http: &reqwest::Client,
    base: &str,
    bearer: &str,
) -> Result<(String, String, Vec<u8>)> {
    let kick_off = http
        .get(format!("{base}/$export?_type=Patient"))
        .header("accept", "application/fhir+json")
        .header("prefer", "respond-async")
        .bearer_auth(bearer)
        .send()
        .await?;
    ensure!(kick_off.status() == 202, "kick-off: {}", kick_off.status());
    let status_url = kick_off
        .headers()
        .get("content-location")
        .and_then(|v| v.to_str().ok())
        .context("no Content-Location")?
        .to_owned();
    let job_id = status_url.rsplit('/').next().unwrap_or("").to_owned();
    let manifest: Value = loop {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let status = http.get(&status_url).bearer_auth(bearer).send().await?;
        match status.status().as_u16() {
            200 => break status.json().await?,
            202 => {}
            other => bail!("status: {other}"),
        }
    };
    let url = manifest["output"][0]["url"]
        .as_str()
        .context("no output file")?
        .to_owned();
    let file_name = url.rsplit('/').next().unwrap_or("").to_owned();
    let body = http
        .get(&url)
        .bearer_auth(bearer)
        .send()
        .await?
        .bytes()
        .await?;
    ensure!(!body.is_empty(), "an empty file");
    Ok((job_id, file_name, body.to_vec()))
}
