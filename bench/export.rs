//! Export benchmark (issue 4): the proxy's `$export` against a plain parallel pager that fetches the
//! same search pages from the same upstream and discards them (the limit: the upstream itself), at
//! equal concurrency, interleaved in the same run.
//!
//! ```sh
//! cargo bench --bench export                          # every case, 3 rounds, 10 ms upstream latency
//! cargo bench --bench export -- --write-results       # ... and write the "Export" section of bench/RESULTS.md
//! cargo bench --bench export -- --cases fixture,group --rounds 5 --latency-ms 20
//! ```
//!
//! Options (or environment): `--fixture DIR` (`BENCH_FIXTURE`, default
//! `../shared/fixtures/synthea/bds-r4-100` relative to the repository), `--rounds N`
//! (`BENCH_ROUNDS`, 3), `--latency-ms N` (`BENCH_LATENCY_MS`, 10: added to every upstream search
//! so the upstream, not the CPUs, is the limit), `--synthetic PxN` (`BENCH_SYNTHETIC`, `10000x99`:
//! patients × Observations each, ≈ 1M resources), `--cases LIST` (`BENCH_CASES`, default
//! `fixture,fixture0,group,1m`), `--write-results`.
//!
//! Three processes: the **upstream** (this binary, `upstream` mode: the in-memory FHIR server on a
//! free port, steered over stdin), the **proxy** (the release binary `fhir-bulk-proxy`, built by
//! Cargo for this bench, configured by a temp `proxy.toml` and environment variables, a fresh one
//! per case so its peak RSS is that case's) and the **driver** (this process: the plain pager, the
//! export client, the measurements).
//!
//! Timing: the baseline runs from its first request to its last page. The proxy runs from the
//! kick-off request to its log line "export finished" (the manifest is ready then; the driver reads
//! the proxy's stderr in a thread and stamps the line on arrival), so the status polling interval
//! does not blur the result; the manifest is then fetched and its counts checked.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use fhir_bulk_proxy::config::Config;
use fhir_bulk_proxy::export::kickoff::{self, RawKickOff};
use fhir_bulk_proxy::export::pager::Pager;
use fhir_bulk_proxy::export::plan::{self, PlanInput};
use fhir_bulk_proxy::job::Level;
use serde_json::Value;
use testkit::memory_fhir::MemoryFhir;

mod bulk;
mod child;
mod pager;
mod procfs;
mod results;
mod timed;
use bulk::{kick_off, manifest};
use pager::plain_pager;
use procfs::{cpu_secs, machine_busy_secs};
use results::write_section;
use timed::Proxy;

const GROUP_ID: &str = "synthea-100";

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; it means nothing here.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if args.first().map(String::as_str) == Some("upstream") {
        return upstream(&args[1..]);
    }
    let mut opts = <Opts as clap::Parser>::parse_from(std::iter::once("export".into()).chain(args));
    opts.fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join(&opts.fixture);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(drive(opts))
}

// ---------------------------------------------------------------------------------------------
// Options

/// The options; each also read from the environment.
#[derive(clap::Parser)]
struct Opts {
    /// The fixture (NDJSON per type), relative to the repository unless absolute.
    #[arg(
        long,
        env = "BENCH_FIXTURE",
        default_value = "../shared/fixtures/synthea/bds-r4-100"
    )]
    fixture: PathBuf,
    /// Interleaved rounds per case.
    #[arg(long, env = "BENCH_ROUNDS", default_value_t = 3)]
    rounds: usize,
    /// Added to every upstream search, so the upstream, not the CPUs, is the limit.
    #[arg(long = "latency-ms", env = "BENCH_LATENCY_MS", default_value_t = 10)]
    latency_ms: u64,
    /// Patients × Observations each, for the 1m case.
    #[arg(long, env = "BENCH_SYNTHETIC", default_value = "10000x99", value_parser = patients_by)]
    synthetic: (usize, usize),
    /// The cases to run.
    #[arg(
        long,
        env = "BENCH_CASES",
        default_value = "fixture,fixture0,group,1m",
        value_delimiter = ','
    )]
    cases: Vec<String>,
    /// Write the "Export" section of bench/RESULTS.md.
    #[arg(long)]
    write_results: bool,
}

/// `PATIENTSxPER_PATIENT`, e.g. `10000x99`.
fn patients_by(text: &str) -> Result<(usize, usize)> {
    let (p, n) = text.split_once('x').context("PATIENTSxPER_PATIENT")?;
    Ok((p.parse()?, n.parse()?))
}

// ---------------------------------------------------------------------------------------------
// Upstream mode: the in-memory FHIR server in its own process.

/// `upstream (--fixture DIR | --synthetic PxN)`: prints `READY <base url> <resources>`, then answers
/// stdin commands `latency MS` (→ `ok`) and `counters` (→ `<searches> <pages>`); exits on EOF.
fn upstream(args: &[String]) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let server = match args {
        [flag, dir] if flag == "--fixture" => MemoryFhir::new().load_dir(Path::new(dir))?,
        [flag, shape] if flag == "--synthetic" => {
            let (p, n) = shape.split_once('x').context("PxN")?;
            MemoryFhir::new().synthetic(p.parse()?, n.parse()?)
        }
        _ => bail!("upstream (--fixture DIR | --synthetic PxN)"),
    };
    let running = runtime.block_on(async { server.start().await })?;
    let total: usize = {
        let types = running.types();
        types.iter().map(|t| running.ids(t).len()).sum()
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "READY {} {total}", running.url())?;
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let reply = match line.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["latency", ms] => {
                running
                    .faults
                    .latency_ms
                    .store(ms.parse()?, Ordering::SeqCst);
                "ok".to_owned()
            }
            ["counters"] => format!(
                "{} {}",
                running.counters.searches.load(Ordering::SeqCst),
                running.counters.pages.load(Ordering::SeqCst)
            ),
            _ => format!("error: unknown command {line:?}"),
        };
        writeln!(out, "{reply}")?;
        out.flush()?;
    }
    Ok(())
}

/// The upstream process, seen from the driver.
struct Upstream {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    url: String,
    resources: u64,
}

impl Upstream {
    fn start(source: &[&str]) -> Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("upstream")
            .args(source)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take().context("stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let mut words = line.split_whitespace();
        ensure!(
            words.next() == Some("READY"),
            "the upstream did not start: {line:?}"
        );
        let url = words.next().context("url")?.to_owned();
        let resources = words.next().context("count")?.parse()?;
        Ok(Self {
            child,
            stdin,
            stdout,
            url,
            resources,
        })
    }

    fn command(&mut self, command: &str) -> Result<String> {
        writeln!(self.stdin, "{command}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        Ok(line.trim().to_owned())
    }

    fn set_latency(&mut self, ms: u64) -> Result<()> {
        let reply = self.command(&format!("latency {ms}"))?;
        ensure!(reply == "ok", "upstream: {reply}");
        Ok(())
    }

    /// (searches, pages) served so far.
    fn counters(&mut self) -> Result<(u64, u64)> {
        let reply = self.command("counters")?;
        let (s, p) = reply.split_once(' ').context("counters")?;
        Ok((s.parse()?, p.parse()?))
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// The searches the proxy plans (the same-searches pager's URLs).

/// The searches the proxy plans for `level`, as first-page URLs (same `_count`, `_lastUpdated`
/// bound and sort), computed with the proxy's own planner and pager.
async fn planned_urls(
    http: &reqwest::Client,
    config: &Config,
    upstream_url: &str,
    level: &Level,
) -> Result<(Vec<String>, usize, usize)> {
    let metadata: Value = http
        .get(format!("{upstream_url}/metadata"))
        .send()
        .await?
        .json()
        .await?;
    let upstream_types: Vec<String> = metadata["rest"][0]["resource"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["type"].as_str().map(str::to_owned))
        .collect();
    let patients: Vec<String> = match level {
        Level::Group(id) => {
            let group: Value = http
                .get(format!("{upstream_url}/Group/{id}"))
                .send()
                .await?
                .json()
                .await?;
            group["member"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|m| m["entity"]["reference"].as_str())
                .filter_map(|r| r.rsplit_once("Patient/").map(|(_, id)| id.to_owned()))
                .collect()
        }
        _ => Vec::new(),
    };
    let count: Value = http
        .get(format!("{upstream_url}/Patient?_summary=count"))
        .send()
        .await?
        .json()
        .await?;
    let all_patients = count["total"].as_u64();
    let now = fhir_bulk_proxy::fhir::Instant::now();
    let k = kickoff::parse(&RawKickOff {
        level,
        is_post: false,
        query: "",
        accept: Some("application/fhir+json"),
        prefer: Some("respond-async"),
        body: None,
        now,
    })
    .map_err(|e| anyhow!("{e:?}"))?;
    let e = &config.export;
    let planned = plan::plan(&PlanInput {
        level,
        kickoff: &k,
        can_read: &|_| true,
        upstream_types: Some(&upstream_types),
        patients: &patients,
        batch_size: e.patient_batch_size,
        supporting_types: &e.supporting_types,
        max_ids_bytes: plan::ids_room(e.max_search_url_bytes, upstream_url.len(), &k.type_filters),
        // As the proxy decides: the patients against the upstream's count.
        scan: plan::scan_pays(patients.len(), all_patients, e.scan_min_coverage),
    })
    .map_err(|e| anyhow!("{e}"))?;
    let mut config = config.clone();
    config.upstream.url = upstream_url.to_owned();
    let pager = Pager::new(&config, reqwest::header::HeaderMap::new())?;
    let upper = now.to_string();
    let urls = planned
        .searches
        .iter()
        .map(|(_, search)| pager.search_url(search, None, &upper))
        .collect();
    Ok((urls, planned.types.len(), patients.len()))
}

// ---------------------------------------------------------------------------------------------
// One export through the proxy.

struct ProxyRun {
    wall: Duration,
    resources: u64,
}

/// One export kicked off on the first of `proxies` (replicas of one fleet, or just one proxy),
/// timed until any of them logs "export finished".
async fn proxy_export(
    proxies: &[Proxy],
    http: &reqwest::Client,
    path: &str,
    expected: Option<u64>,
) -> Result<ProxyRun> {
    let proxy = &proxies[0];
    let token = proxy.token(http).await?;
    for p in proxies {
        while p.finished.try_recv().is_ok() {}
    }
    let started = Instant::now();
    let status_url = kick_off(http, &format!("{}{path}", proxy.process.base), &token).await?;
    // Wait for the "export finished" line (the first poll is always 202 anyway).
    let finished = 'wait: loop {
        for p in proxies {
            match p.finished.try_recv() {
                Ok(at) => break 'wait at,
                Err(mpsc::TryRecvError::Empty) => {}
                Err(mpsc::TryRecvError::Disconnected) => bail!("a proxy exited"),
            }
        }
        ensure!(
            started.elapsed() < Duration::from_secs(1800),
            "the export did not finish in 30 minutes"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let wall = finished.saturating_duration_since(started);
    let manifest = manifest(http, &status_url, &token).await?;
    let output = manifest["output"].as_array().context("no output")?;
    let resources: u64 = output.iter().filter_map(|o| o["count"].as_u64()).sum();
    let errors = manifest["error"].as_array().map_or(0, Vec::len);
    ensure!(errors == 0, "the export reported errors: {manifest}");
    if let Some(expected) = expected {
        ensure!(
            resources == expected,
            "the export has {resources} resources, expected {expected}"
        );
    }
    let run = ProxyRun { wall, resources };
    // Delete the job and its files (disk, and the per-client cap on active jobs).
    let _ = http.delete(&status_url).bearer_auth(&token).send().await?;
    Ok(run)
}

/// Downloads every file of a fresh export and counts its lines (a correctness check, untimed
/// against the baseline).
async fn download_check(
    proxy: &Proxy,
    http: &reqwest::Client,
    path: &str,
) -> Result<(u64, u64, Duration)> {
    let token = proxy.token(http).await?;
    while proxy.finished.try_recv().is_ok() {}
    let status_url = kick_off(http, &format!("{}{path}", proxy.process.base), &token).await?;
    let manifest = manifest(http, &status_url, &token).await?;
    let (mut lines, mut bytes) = (0u64, 0u64);
    let started = Instant::now();
    for item in manifest["output"].as_array().into_iter().flatten() {
        let url = item["url"].as_str().context("url")?;
        let mut response = http.get(url).bearer_auth(&token).send().await?;
        ensure!(response.status() == 200, "{url}: {}", response.status());
        let mut file_lines = 0u64;
        while let Some(chunk) = response.chunk().await? {
            bytes += chunk.len() as u64;
            file_lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
        }
        ensure!(
            Some(file_lines) == item["count"].as_u64(),
            "{url}: {file_lines} lines, manifest says {}",
            item["count"]
        );
        lines += file_lines;
    }
    let elapsed = started.elapsed();
    let _ = http.delete(&status_url).bearer_auth(&token).send().await?;
    Ok((lines, bytes, elapsed))
}

// ---------------------------------------------------------------------------------------------
// Cases and rounds.

struct CaseResult {
    name: String,
    latency_ms: u64,
    resources: u64,
    baseline_entries: u64,
    searches_planned: usize,
    baseline: Vec<f64>,
    proxy: Vec<f64>,
    /// Per round, proxy / baseline.
    ratios: Vec<f64>,
    proxy_searches: Vec<u64>,
    proxy_pages: Vec<u64>,
    baseline_pages: Vec<u64>,
    proxy_cpu: Vec<f64>,
    upstream_cpu_proxy: Vec<f64>,
    upstream_cpu_baseline: Vec<f64>,
    other_cpu: Vec<f64>,
    notes: Vec<String>,
}

struct Case<'a> {
    name: &'a str,
    path: &'a str,
    level: Level,
    latency_ms: u64,
}

#[allow(clippy::too_many_lines)]
async fn run_case(
    case: &Case<'_>,
    rounds: usize,
    upstream: &mut Upstream,
    proxy: &Proxy,
    http: &reqwest::Client,
) -> Result<CaseResult> {
    upstream.set_latency(case.latency_ms)?;
    let concurrency = proxy
        .config
        .export
        .workers
        .min(proxy.config.export.max_upstream_concurrency);
    let (urls, types, patients) =
        planned_urls(http, &proxy.config, &upstream.url, &case.level).await?;
    let mut r = CaseResult {
        name: case.name.to_owned(),
        latency_ms: case.latency_ms,
        resources: 0,
        baseline_entries: 0,
        searches_planned: urls.len(),
        baseline: vec![],
        proxy: vec![],
        ratios: vec![],
        proxy_searches: vec![],
        proxy_pages: vec![],
        baseline_pages: vec![],
        proxy_cpu: vec![],
        upstream_cpu_proxy: vec![],
        upstream_cpu_baseline: vec![],
        other_cpu: vec![],
        notes: vec![],
    };
    if let Level::Group(_) = case.level {
        let batch = proxy.config.export.patient_batch_size;
        // Patients in the largest search: the batch after the URL-length cut.
        let effective = urls
            .iter()
            .filter_map(|u| {
                u.split(['?', '&']).find_map(|p| {
                    p.split_once('=')
                        .filter(|(k, _)| ["patient", "subject", "_id"].contains(k))
                        .map(|(_, v)| v.split("%2C").count().max(v.split(',').count()))
                })
            })
            .max()
            .unwrap_or(batch);
        r.notes.push(format!(
            "bound with the configured batch: {types} types × ⌈{patients} patients / {batch}⌉ = {}; \
             the URL cap (export.max_search_url_bytes = {}) cuts batches to ≤ {effective} ids: \
             {types} × ⌈{patients} / {effective}⌉ = {}",
            types * patients.div_ceil(batch),
            proxy.config.export.max_search_url_bytes,
            types * patients.div_ceil(effective.max(1))
        ));
    } else {
        r.notes.push(format!("{types} types: one search each"));
    }
    eprintln!(
        "== {} (latency {} ms, {} searches, concurrency {concurrency})",
        case.name,
        case.latency_ms,
        urls.len()
    );
    for round in 0..rounds {
        let mut baseline_s = 0.0;
        let mut proxy_s = 0.0;
        // Alternate which side goes first.
        let order: [bool; 2] = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for is_proxy in order {
            let (s0, p0) = upstream.counters()?;
            let up0 = cpu_secs(upstream.pid());
            let machine0 = machine_busy_secs();
            let self0 = cpu_secs(std::process::id());
            let proxy0 = cpu_secs(proxy.process.pid());
            let (seconds, resources) = if is_proxy {
                let run = proxy_export(std::slice::from_ref(proxy), http, case.path, None).await?;
                (run.wall.as_secs_f64(), run.resources)
            } else {
                let (elapsed, tally) = plain_pager(&urls, concurrency).await?;
                (
                    elapsed.as_secs_f64(),
                    tally.resources.load(Ordering::Relaxed),
                )
            };
            let (s1, p1) = upstream.counters()?;
            let up = cpu_secs(upstream.pid()) - up0;
            let proxy_cpu = cpu_secs(proxy.process.pid()) - proxy0;
            let own = cpu_secs(std::process::id()) - self0;
            let other = (machine_busy_secs() - machine0 - up - proxy_cpu - own).max(0.0);
            // The baseline counts entries: a resource that two patient batches both return counts
            // twice there, once in the proxy's (deduplicated) export.
            let seen = if is_proxy {
                &mut r.resources
            } else {
                &mut r.baseline_entries
            };
            if *seen == 0 {
                *seen = resources;
            }
            ensure!(
                resources == *seen,
                "{}: {} resources this time, {} before",
                case.name,
                resources,
                *seen
            );
            if is_proxy {
                proxy_s = seconds;
                r.proxy.push(seconds);
                r.proxy_searches.push(s1 - s0);
                r.proxy_pages.push(p1 - p0);
                r.proxy_cpu.push(proxy_cpu);
                r.upstream_cpu_proxy.push(up);
            } else {
                baseline_s = seconds;
                r.baseline.push(seconds);
                r.baseline_pages.push(p1 - p0);
                r.upstream_cpu_baseline.push(up);
            }
            r.other_cpu.push(other / seconds.max(1e-3));
            eprintln!(
                "   round {} {:8} {:8.3} s  {} resources  {} searches {} pages  cpu: upstream {:.2} s, proxy {:.2} s, others {:.2} cores",
                round + 1,
                if is_proxy { "proxy" } else { "baseline" },
                seconds,
                resources,
                s1 - s0,
                p1 - p0,
                up,
                proxy_cpu,
                other / seconds.max(1e-3)
            );
        }
        r.ratios.push(proxy_s / baseline_s);
    }
    Ok(r)
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn list(values: &[f64], digits: usize) -> String {
    values
        .iter()
        .map(|v| format!("{v:.digits$}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[allow(clippy::too_many_lines)]
async fn drive(opts: Opts) -> Result<()> {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let started = Instant::now();
    let date = time::OffsetDateTime::now_utc();
    let mut results: Vec<CaseResult> = Vec::new();
    let mut rss_lines: Vec<String> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    let wants = |c: &str| opts.cases.iter().any(|x| x == c);

    if wants("fixture") || wants("fixture0") || wants("group") {
        if !opts.fixture.join("Patient.ndjson").exists() {
            bail!(
                "the 100-patient fixture is missing: no Patient.ndjson in {} (pass --fixture DIR or \
                 BENCH_FIXTURE, or run only --cases 1m)",
                opts.fixture.display()
            );
        }
        let fixture = opts.fixture.canonicalize()?;
        let loading = Instant::now();
        let mut upstream = Upstream::start(&["--fixture", &fixture.to_string_lossy()])?;
        eprintln!(
            "upstream: fixture {} ({} resources) at {} in {:.1} s",
            fixture.display(),
            upstream.resources,
            upstream.url,
            loading.elapsed().as_secs_f64()
        );
        let proxy = Proxy::start(&upstream.url)?;
        // A first, untimed export: warms the proxy's caches (metadata) and checks the files.
        upstream.set_latency(0)?;
        let (lines, bytes, took) = download_check(&proxy, &http, "/$export").await?;
        notes.push(format!(
            "Fixture check: a system export downloaded {lines} lines ({:.1} MB) in {:.2} s, \
             every file's line count equal to its manifest count.",
            bytes as f64 / 1e6,
            took.as_secs_f64()
        ));
        let mut cases = Vec::new();
        if wants("fixture") {
            cases.push(Case {
                name: "fixture-100 system",
                path: "/$export",
                level: Level::System,
                latency_ms: opts.latency_ms,
            });
        }
        if wants("fixture0") {
            cases.push(Case {
                name: "fixture-100 system",
                path: "/$export",
                level: Level::System,
                latency_ms: 0,
            });
        }
        if wants("group") {
            cases.push(Case {
                name: "fixture-100 Group/synthea-100",
                path: "/Group/synthea-100/$export",
                level: Level::Group(GROUP_ID.into()),
                latency_ms: opts.latency_ms,
            });
        }
        for case in &cases {
            results.push(run_case(case, opts.rounds, &mut upstream, &proxy, &http).await?);
        }
        rss_lines.push(format!(
            "fixture proxy (all fixture cases, one process): VmHWM {:.1} MB, VmRSS at end {:.1} MB",
            proxy.status_field("VmHWM")? as f64 / 1e6,
            proxy.status_field("VmRSS")? as f64 / 1e6
        ));
    }

    if wants("1m") {
        let (p, n) = opts.synthetic;
        let loading = Instant::now();
        let mut upstream = Upstream::start(&["--synthetic", &format!("{p}x{n}")])?;
        eprintln!(
            "upstream: synthetic {p}x{n} ({} resources) at {} in {:.1} s",
            upstream.resources,
            upstream.url,
            loading.elapsed().as_secs_f64()
        );
        let proxy = Proxy::start(&upstream.url)?;
        let rss_start = proxy.status_field("VmHWM")?;
        let case = Case {
            name: "synthetic-1M system",
            path: "/$export",
            level: Level::System,
            latency_ms: opts.latency_ms,
        };
        let mut result = run_case(&case, opts.rounds, &mut upstream, &proxy, &http).await?;
        result.notes.push(format!(
            "synthetic upstream: {p} patients × {n} Observations ({} resources)",
            upstream.resources
        ));
        let hwm = proxy.status_field("VmHWM")?;
        rss_lines.push(format!(
            "1M proxy: VmHWM {:.1} MB after {} exports of {} resources (at start {:.1} MB, VmRSS at end {:.1} MB) — target < 100 MB: {}",
            hwm as f64 / 1e6,
            opts.rounds,
            result.resources,
            rss_start as f64 / 1e6,
            proxy.status_field("VmRSS")? as f64 / 1e6,
            if hwm < 100_000_000 { "met" } else { "NOT met" }
        ));
        results.push(result);
    }

    let total = started.elapsed();
    if !results.is_empty() {
        let report = report(&opts, &results, &rss_lines, &notes, date, total)?;
        println!("{report}");
        if opts.write_results {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/RESULTS.md");
            write_section(&path, "## Export", &report)?;
            eprintln!("wrote the Export section of {}", path.display());
        }
    }
    if wants("fleet") {
        let section = fleet_scaling(&opts, &http).await?;
        println!("{section}");
        if opts.write_results {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/RESULTS.md");
            write_section(&path, "## Fleet scaling", &section)?;
            eprintln!("wrote the Fleet scaling section of {}", path.display());
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Report.

fn report(
    opts: &Opts,
    results: &[CaseResult],
    rss_lines: &[String],
    notes: &[String],
    date: time::OffsetDateTime,
    total: Duration,
) -> Result<String> {
    use std::fmt::Write as _;
    let mut s = String::new();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':').map(|(_, m)| m.trim().to_owned()))
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let mem_gb = proc_meminfo_gb();
    writeln!(s, "## Export\n")?;
    writeln!(
        s,
        "Date: {}. Machine: {cores} × {cpu}, {mem_gb:.0} GB RAM, shared with other work (see \"others\" CPU).",
        date.format(&time::format_description::well_known::Rfc3339)?
    )?;
    writeln!(
        s,
        "Command: `cargo bench --bench export -- --rounds {} --latency-ms {} --synthetic {}x{} --cases {}{}` ({:.1} min in all).\n",
        opts.rounds,
        opts.latency_ms,
        opts.synthetic.0,
        opts.synthetic.1,
        opts.cases.join(","),
        if opts.write_results {
            " --write-results"
        } else {
            ""
        },
        total.as_secs_f64() / 60.0
    )?;
    writeln!(
        s,
        "Baseline: a plain parallel pager in the driver process: the proxy's own planned searches \
         (same types, `_count`, `_lastUpdated` bound and `_sort`), {} at a time (= `export.workers`, \
         ≤ `max_upstream_concurrency`), following `next` links, bodies parsed only for `link` and \
         discarded. Proxy: the release binary, default `[export]` settings, embedded store, wall time \
         from the kick-off request to its \"export finished\" log line (manifest ready). Upstream: \
         `MemoryFhir` in its own process with `latency` ms added per search page. Baseline and proxy \
         alternate within each round; times are medians.\n",
        Config::default()
            .export
            .workers
            .min(Config::default().export.max_upstream_concurrency)
    )?;
    writeln!(
        s,
        "| case | latency | resources | searches | baseline s (median) | proxy s (median) | proxy / baseline (median of rounds) | proxy resources/s | target ≤ 1.2× |"
    )?;
    writeln!(s, "|---|---|---|---|---|---|---|---|---|")?;
    for r in results {
        let (b, p, ratio) = (median(&r.baseline), median(&r.proxy), median(&r.ratios));
        writeln!(
            s,
            "| {} | {} ms | {} | {} | {b:.3} | {p:.3} | {ratio:.2} | {:.0} | {} |",
            r.name,
            r.latency_ms,
            r.resources,
            r.searches_planned,
            r.resources as f64 / p,
            if ratio <= 1.2 { "met" } else { "NOT met" }
        )?;
    }
    writeln!(
        s,
        "\nSearch counts (upstream counters, per proxy export):\n"
    )?;
    for r in results {
        let searches = r.proxy_searches.iter().max().copied().unwrap_or(0);
        writeln!(
            s,
            "- {} ({} ms): {} searches, {} pages (proxy, {} resources); {} pages (baseline, {} entries); planned {} searches. {}",
            r.name,
            r.latency_ms,
            searches,
            r.proxy_pages.iter().max().copied().unwrap_or(0),
            r.resources,
            r.baseline_pages.iter().max().copied().unwrap_or(0),
            r.baseline_entries,
            r.searches_planned,
            r.notes.join("; ")
        )?;
    }
    writeln!(s, "\nMemory (proxy process):\n")?;
    for line in rss_lines {
        writeln!(s, "- {line}")?;
    }
    writeln!(s, "\nRaw per-round numbers:\n")?;
    for r in results {
        writeln!(
            s,
            "- {} ({} ms): baseline [{}] s; proxy [{}] s; ratios [{}]; CPU s per export: proxy [{}], upstream under proxy [{}], upstream under baseline [{}]; other processes' load [{}] cores",
            r.name,
            r.latency_ms,
            list(&r.baseline, 3),
            list(&r.proxy, 3),
            list(&r.ratios, 2),
            list(&r.proxy_cpu, 2),
            list(&r.upstream_cpu_proxy, 2),
            list(&r.upstream_cpu_baseline, 2),
            list(&r.other_cpu, 2)
        )?;
    }
    for note in notes {
        writeln!(s, "\n{note}")?;
    }
    Ok(s)
}

fn proc_meminfo_gb() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1e6)
}

// ---------------------------------------------------------------------------------------------
// Fleet scaling: 1, 2 and 3 replicas on one Redis.

/// Upstream latency per search page for the fleet case: large, so the upstream's concurrency,
/// not the two CPUs, limits an export (the case measures how replicas add workers).
const FLEET_LATENCY_MS: u64 = 60;

/// The Group export of the fixture through 1, 2 and 3 replicas sharing one Redis and one file
/// directory, each replica with 2 workers; the fleet-wide upstream cap is set high so that
/// workers, not the cap, bound the parallelism. Returns the `## Fleet scaling` section.
async fn fleet_scaling(opts: &Opts, http: &reqwest::Client) -> Result<String> {
    let fixture = opts.fixture.display().to_string();
    let mut upstream = Upstream::start(&["--fixture", &fixture])?;
    upstream.set_latency(FLEET_LATENCY_MS)?;
    let redis = RedisProcess::start()?;
    let files = tempfile::tempdir()?;
    let env = [
        ("BULK_PROXY_STORE__BACKEND", "redis".to_owned()),
        ("BULK_PROXY_STORE__REDIS_URL", redis.url()),
        (
            "BULK_PROXY_STORAGE__PATH",
            files.path().display().to_string(),
        ),
        ("BULK_PROXY_EXPORT__WORKERS", "2".to_owned()),
        (
            "BULK_PROXY_EXPORT__MAX_UPSTREAM_CONCURRENCY",
            "64".to_owned(),
        ),
        ("BULK_PROXY_EXPORT__PATIENT_BATCH_SIZE", "10".to_owned()),
    ];
    let path = format!("/Group/{GROUP_ID}/$export");
    let mut rows: Vec<(usize, Vec<f64>, u64)> = Vec::new();
    for replicas in 1..=3 {
        let proxies = (0..replicas)
            .map(|_| Proxy::start_with(&upstream.url, &env))
            .collect::<Result<Vec<_>>>()?;
        let mut times = Vec::new();
        let mut resources = 0;
        for _ in 0..opts.rounds {
            let run = proxy_export(&proxies, http, &path, None).await?;
            times.push(run.wall.as_secs_f64());
            resources = run.resources;
        }
        eprintln!("fleet: {replicas} replica(s): {}", list(&times, 2));
        rows.push((replicas, times, resources));
    }
    let one = median(&rows[0].1);
    let mut out = format!(
        "## Fleet scaling\n\nCommand: `cargo bench --bench export -- --cases fleet --rounds {} --write-results`.\n\n\
         `Group/{GROUP_ID}/$export` of the 100-patient fixture ({} resources, 16 types × 10 patient \
         batches = 160 searches) through 1, 2 and 3 release proxies sharing one Redis and one file \
         directory, 2 workers each, kicked off on the first replica and timed until one of them logs \
         \"export finished\". The upstream adds {FLEET_LATENCY_MS} ms to every search page, so the \
         number of searches in flight, not the 2 CPUs, bounds the export.\n\n\
         | replicas | workers in the fleet | wall s (median) | runs | speed-up vs 1 | per-replica efficiency |\n|---|---|---|---|---|---|\n",
        opts.rounds, rows[0].2
    );
    for (replicas, times, _) in &rows {
        let m = median(times);
        out.push_str(&format!(
            "| {replicas} | {} | {m:.2} | {} | {:.2}× | {:.0}% |\n",
            replicas * 2,
            list(times, 2),
            one / m,
            100.0 * one / m / *replicas as f64
        ));
    }
    Ok(out)
}

/// A private `redis-server` on a free port, killed when dropped.
///
/// Which one: `FBP_REDIS_SERVER`, else the Redis the integration tests build into
/// `~/.cache/fhir-bulk-proxy/redis-6.2.14/` (`$XDG_CACHE_HOME` if set) when there, else the one on
/// PATH.
fn redis_server() -> std::path::PathBuf {
    if let Some(path) = std::env::var_os("FBP_REDIS_SERVER") {
        return path.into();
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache")));
    cache
        .map(|c| c.join("fhir-bulk-proxy/redis-6.2.14/redis-server"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| "redis-server".into())
}

struct RedisProcess {
    child: Child,
    port: u16,
}

impl RedisProcess {
    fn start() -> Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let binary = redis_server();
        let child = Command::new(&binary)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| {
                format!(
                    "{}: run `cargo test` once (it builds one) or set FBP_REDIS_SERVER",
                    binary.display()
                )
            })?;
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(Self { child, port });
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        bail!("redis-server did not start")
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
