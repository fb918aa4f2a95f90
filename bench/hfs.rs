//! Export benchmark against a real FHIR server (issue 17): the proxy's system, Patient and Group
//! exports in front of Helios `hfs` loaded with a Synthea fixture, each against a plain pager of
//! type-level searches for the same types (the upstream's own limit: what a hand-written exporter
//! that needs no patient filter would fetch), interleaved in the same run.
//!
//! ```sh
//! ../shared/tools/real-upstream install                  # once: hfs into ~/.cache
//! cargo bench --bench hfs                                 # 3 rounds, bds-r4-100
//! cargo bench --bench hfs -- --rounds 5 --write-results   # ... and write the section of bench/RESULTS.md
//! ```
//!
//! Options: `--fixture DIR` (default `../shared/fixtures/synthea/bds-r4-100`), `--rounds N` (3),
//! `--upstream-url URL` (an hfs already running with that fixture; otherwise one is started with
//! `../shared/tools/real-upstream start` on a free port, its database kept in
//! `~/.cache/fhir-bulk-proxy/bench-hfs-<fixture>` so that later runs skip the load),
//! `--set KEY=VALUE` (more `BULK_PROXY_*` settings for the proxy, e.g.
//! `--set EXPORT__SCAN_MIN_COVERAGE=2` to measure patient batches), `--write-results`.
//!
//! The proxy is the release binary with default settings (auth on, the embedded store, local
//! files), timed from the kick-off to its log line "export finished" (the manifest is ready then),
//! and its manifest's counts are checked against the fixture. Its peak RSS per export is `VmHWM`
//! after resetting it (`/proc/PID/clear_refs`) before the kick-off. The pager runs
//! `min(export.workers, export.max_upstream_concurrency)` searches at once (4 by default: the
//! proxy's own concurrency), `_count` = `export.page_size`, from its first request to its last
//! page.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use fhir_bulk_proxy::export::compartment::compartment_param;

mod bulk;
mod child;
mod pager;
mod procfs;
mod results;
mod timed;
use bulk::{kick_off, manifest};
use pager::plain_pager;
use procfs::{cpu_secs, machine_busy_secs, proc_status};
use timed::Proxy;

#[derive(clap::Parser)]
struct Opts {
    /// The fixture (NDJSON per type, a Group), relative to the repository unless absolute.
    #[arg(long, default_value = "../shared/fixtures/synthea/bds-r4-100")]
    fixture: PathBuf,
    /// Interleaved rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// An hfs already running with the fixture loaded (its FHIR base).
    #[arg(long)]
    upstream_url: Option<String>,
    /// More proxy settings, `KEY=VALUE` for `BULK_PROXY_KEY`.
    #[arg(long = "set")]
    settings: Vec<String>,
    /// The exports to run (system, Patient, Group).
    #[arg(long, value_delimiter = ',', default_value = "system,Patient,Group")]
    cases: Vec<String>,
    /// Write the "Export against hfs" section of bench/RESULTS.md.
    #[arg(long)]
    write_results: bool,
}

fn main() -> Result<()> {
    let args = std::env::args().filter(|a| a != "--bench");
    let mut opts = <Opts as clap::Parser>::parse_from(args);
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    opts.fixture = repo.join(&opts.fixture);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(drive(opts, repo))
}

/// The fixture's resource types and lines per type, and its Group's id.
fn read_fixture(dir: &Path) -> Result<(BTreeMap<String, u64>, String)> {
    let mut counts = BTreeMap::new();
    let mut group = None;
    for entry in std::fs::read_dir(dir).with_context(|| format!("{}", dir.display()))? {
        let path = entry?.path();
        let Some(t) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".ndjson"))
        else {
            continue;
        };
        let text = std::fs::read_to_string(&path)?;
        if t == "Group" {
            let first: serde_json::Value =
                serde_json::from_str(text.lines().next().context("empty Group file")?)?;
            group = first["id"].as_str().map(str::to_owned);
        }
        counts.insert(t.to_owned(), text.lines().count() as u64);
    }
    Ok((counts, group.context("the fixture has no Group")?))
}

/// hfs, started here (and stopped when dropped) or given.
struct Hfs {
    url: String,
    started: Option<(PathBuf, PathBuf)>,
}

impl Hfs {
    fn start(repo: &Path, fixture: &Path) -> Result<Self> {
        let tool = repo.join("../shared/tools/real-upstream");
        ensure!(
            tool.exists(),
            "no {} (run the bench beside ../shared)",
            tool.display()
        );
        let name = fixture.file_name().and_then(|n| n.to_str()).unwrap_or("x");
        let home = std::env::var_os("HOME").context("HOME")?;
        let dir = PathBuf::from(home).join(format!(".cache/fhir-bulk-proxy/bench-hfs-{name}"));
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let status = Command::new(&tool)
            .arg("start")
            .arg(port.to_string())
            .arg(&dir)
            .arg(fixture)
            .status()?;
        ensure!(status.success(), "{} start failed", tool.display());
        Ok(Self {
            url: format!("http://127.0.0.1:{port}"),
            started: Some((tool, dir)),
        })
    }
}

impl Drop for Hfs {
    fn drop(&mut self) {
        if let Some((tool, dir)) = &self.started {
            let _ = Command::new(tool).arg("stop").arg(dir).status();
        }
    }
}

struct Case {
    name: &'static str,
    path: String,
    types: Vec<String>,
    resources: u64,
}

#[derive(Default)]
struct Samples {
    proxy: Vec<f64>,
    pager: Vec<f64>,
    ratios: Vec<f64>,
    rss_mib: Vec<f64>,
    proxy_cpu: Vec<f64>,
    other_cpu: Vec<f64>,
}

async fn drive(opts: Opts, repo: &Path) -> Result<()> {
    let (counts, group) = read_fixture(&opts.fixture)?;
    let hfs = match &opts.upstream_url {
        Some(url) => Hfs {
            url: url.trim_end_matches('/').to_owned(),
            started: None,
        },
        None => Hfs::start(repo, &opts.fixture)?,
    };
    let env: Vec<(String, String)> = opts
        .settings
        .iter()
        .map(|s| {
            let (k, v) = s.split_once('=').context("--set KEY=VALUE")?;
            Ok((format!("BULK_PROXY_{k}"), v.to_owned()))
        })
        .collect::<Result<_>>()?;
    let env_refs: Vec<(&str, String)> = env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let proxy = Proxy::start_with(&hfs.url, &env_refs)?;
    let config = &proxy.config;
    let concurrency = config
        .export
        .workers
        .min(config.export.max_upstream_concurrency);
    let page_size = config.export.page_size;

    // System: every type of the fixture. Patient and Group: those in the Patient compartment.
    let all: Vec<String> = counts.keys().cloned().collect();
    let compartment: Vec<String> = all
        .iter()
        .filter(|t| compartment_param(t).is_some())
        .cloned()
        .collect();
    let sum = |types: &[String]| types.iter().map(|t| counts[t]).sum::<u64>();
    let cases: Vec<Case> = [
        Case {
            name: "system",
            path: format!("/$export?_type={}", all.join(",")),
            types: all.clone(),
            resources: sum(&all),
        },
        Case {
            name: "Patient",
            path: format!("/Patient/$export?_type={}", compartment.join(",")),
            types: compartment.clone(),
            resources: sum(&compartment),
        },
        Case {
            name: "Group",
            path: format!("/Group/{group}/$export?_type={}", compartment.join(",")),
            types: compartment.clone(),
            resources: sum(&compartment),
        },
    ]
    .into_iter()
    .filter(|c| opts.cases.iter().any(|name| name == c.name))
    .collect();
    let http = reqwest::Client::new();
    let mut samples: Vec<Samples> = cases.iter().map(|_| Samples::default()).collect();
    let clear_refs = format!("/proc/{}/clear_refs", proxy.process.pid());
    for round in 0..opts.rounds {
        for (case, s) in cases.iter().zip(&mut samples) {
            let urls: Vec<String> = case
                .types
                .iter()
                .map(|t| format!("{}/{t}?_count={page_size}", hfs.url))
                .collect();
            let mut pager_s = 0.0;
            let mut proxy_s = 0.0;
            let order = if round % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for is_proxy in order {
                if is_proxy {
                    let token = proxy.token(&http).await?;
                    while proxy.finished.try_recv().is_ok() {}
                    std::fs::write(&clear_refs, "5").context("resetting VmHWM")?;
                    let (cpu0, busy0) = (cpu_secs(proxy.process.pid()), machine_busy_secs());
                    let started = Instant::now();
                    let status = kick_off(
                        &http,
                        &format!("{}{}", proxy.process.base, case.path),
                        &token,
                    )
                    .await?;
                    let at = proxy
                        .finished
                        .recv_timeout(Duration::from_secs(1800))
                        .context("the export did not finish")?;
                    proxy_s = at.saturating_duration_since(started).as_secs_f64();
                    let cpu = cpu_secs(proxy.process.pid()) - cpu0;
                    s.proxy_cpu.push(cpu);
                    s.other_cpu
                        .push((machine_busy_secs() - busy0 - cpu).max(0.0));
                    s.rss_mib.push(
                        proc_status(proxy.process.pid(), "VmHWM")? as f64 / (1024.0 * 1024.0),
                    );
                    let manifest = manifest(&http, &status, &token).await?;
                    let got: u64 = manifest["output"]
                        .as_array()
                        .context("no output")?
                        .iter()
                        .filter_map(|o| o["count"].as_u64())
                        .sum();
                    let errors = manifest["error"].as_array().map_or(0, Vec::len);
                    ensure!(
                        errors == 0,
                        "{}: the export reported errors: {manifest}",
                        case.name
                    );
                    if got != case.resources {
                        bail!(
                            "{}: {got} resources exported, the fixture has {}",
                            case.name,
                            case.resources
                        );
                    }
                    let _ = http.delete(&status).bearer_auth(&token).send().await?;
                } else {
                    let (elapsed, tally) = plain_pager(&urls, concurrency).await?;
                    let entries = tally.resources.load(std::sync::atomic::Ordering::Relaxed);
                    ensure!(
                        entries == case.resources,
                        "{}: the pager read {entries}, the fixture has {}",
                        case.name,
                        case.resources
                    );
                    pager_s = elapsed.as_secs_f64();
                }
            }
            s.proxy.push(proxy_s);
            s.pager.push(pager_s);
            s.ratios.push(proxy_s / pager_s);
            eprintln!(
                "round {} {:8}: proxy {proxy_s:.2} s, pager {pager_s:.2} s, ratio {:.2}, VmHWM {:.1} MiB",
                round + 1,
                case.name,
                proxy_s / pager_s,
                s.rss_mib.last().copied().unwrap_or_default()
            );
        }
    }

    let mut table = String::from(
        "| export | resources | proxy (s) | type-level pager (s) | ratio | target | proxy peak RSS (MiB) | proxy CPU (s) | other processes' CPU (s) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (case, s) in cases.iter().zip(&samples) {
        let target = if case.name == "system" { 1.0 } else { 1.3 };
        table.push_str(&format!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | ≤ {target:.1} | {:.1} | {:.2} | {:.2} |\n",
            case.name,
            case.resources,
            median(&s.proxy),
            median(&s.pager),
            median(&s.ratios),
            s.rss_mib.iter().copied().fold(0.0, f64::max),
            median(&s.proxy_cpu),
            median(&s.other_cpu),
        ));
    }
    println!("{table}");
    if opts.write_results {
        let commit = Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .current_dir(repo)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        let settings = if opts.settings.is_empty() {
            "default settings".to_owned()
        } else {
            format!("settings {}", opts.settings.join(" "))
        };
        let section = format!(
            "## Export against hfs (issue 17)\n\n\
             Written by `cargo bench --bench hfs -- {args}` (bench/hfs.rs) at commit {commit}, {date}. Helios hfs 0.2.7 (SQLite) with `{fixture}` loaded, on this machine's 2 cores; \
             the proxy's release build with {settings}. Each export is timed from kick-off to the proxy's \
             \"export finished\"; the baseline pages through one plain type-level search per type \
             (`{{type}}?_count={page_size}`, {concurrency} at once, the proxy's own concurrency), bodies \
             discarded. Medians over {rounds} interleaved rounds; ratio = median of the per-round \
             proxy / pager ratios; peak RSS = the largest `VmHWM` of the proxy over the rounds, reset \
             before each export.\n\n{table}",
            rounds = opts.rounds,
            args = std::env::args()
                .skip(1)
                .filter(|a| a != "--bench")
                .collect::<Vec<_>>()
                .join(" "),
            date = time::OffsetDateTime::now_utc().date(),
            fixture = opts
                .fixture
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or(""),
        );
        results::write_section(
            &repo.join("bench/RESULTS.md"),
            "## Export against hfs",
            &section,
        )?;
    }
    drop(hfs);
    Ok(())
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}
