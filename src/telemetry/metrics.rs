//! Prometheus metrics. The names are part of the operational interface (dashboards, alerts):
//!
//! - `bulk_proxy_requests_total{route, status}`: responses by route class and status code;
//! - `bulk_proxy_request_duration_seconds{route}`: time to response headers;
//! - `bulk_proxy_requests_in_flight`: requests being handled;
//! - `bulk_proxy_upstream_duration_seconds{route, outcome}`: upstream latency to response headers
//!   (export search pages under `route="export_page"`),
//!   `outcome` = `ok` | `connect_error` | `timeout`;
//! - `bulk_proxy_jobs{state}`: stored jobs by state (`running` | `completed` | `failed`), counted by
//!   the sweeper every `export.sweep_interval_secs`. With Redis every replica reports the whole
//!   fleet's jobs: aggregate with `max`, not `sum`;
//! - `bulk_proxy_jobs_started_total`, `bulk_proxy_jobs_finished_total{state}`: kick-offs accepted,
//!   jobs finalised (`completed` | `failed`);
//! - `bulk_proxy_export_pages_total`, `bulk_proxy_export_resources_total{type}`: upstream search
//!   pages written, and their resources (before finalisation drops duplicates across searches);
//! - `bulk_proxy_units_claimed_total`, `bulk_proxy_units_finished_total{state}` (`done` |
//!   `failed`), `bulk_proxy_units_active` (units this replica works on now),
//!   `bulk_proxy_leases_lost_total` (a unit taken over by another worker, or its job deleted);
//! - `bulk_proxy_store_errors_total{backend}` (`embedded` | `redis`): job store failures;
//! - `bulk_proxy_storage_errors_total{backend}` (`local` | `s3`): export file storage failures
//!   (a missing file is not one);
//! - `bulk_proxy_spliced_bytes_total`: passthrough body bytes moved with splice(2), the only sign
//!   outside the process that a body was spliced rather than copied.
//!
//! The counters a dashboard or an alert takes a `rate` of exist from start-up, at 0.
//!
//! The recorder is process-global (the `metrics` facade); it is installed once even when a test
//! process starts several proxies.

use std::sync::{LazyLock, OnceLock};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const REQUESTS_TOTAL: &str = "bulk_proxy_requests_total";
pub const REQUEST_DURATION: &str = "bulk_proxy_request_duration_seconds";
pub const IN_FLIGHT: &str = "bulk_proxy_requests_in_flight";
pub const UPSTREAM_DURATION: &str = "bulk_proxy_upstream_duration_seconds";
pub const JOBS: &str = "bulk_proxy_jobs";
pub const JOBS_STARTED: &str = "bulk_proxy_jobs_started_total";
pub const JOBS_FINISHED: &str = "bulk_proxy_jobs_finished_total";
pub const EXPORT_PAGES: &str = "bulk_proxy_export_pages_total";
pub const EXPORT_RESOURCES: &str = "bulk_proxy_export_resources_total";
pub const EXPORT_RESOURCES_EXPECTED: &str = "bulk_proxy_export_resources_expected_total";
pub const UNITS_CLAIMED: &str = "bulk_proxy_units_claimed_total";
pub const UNITS_FINISHED: &str = "bulk_proxy_units_finished_total";
pub const UNITS_ACTIVE: &str = "bulk_proxy_units_active";
pub const LEASES_LOST: &str = "bulk_proxy_leases_lost_total";
pub const STORE_ERRORS: &str = "bulk_proxy_store_errors_total";
pub const STORAGE_ERRORS: &str = "bulk_proxy_storage_errors_total";
pub const SPLICED_BYTES: &str = "bulk_proxy_spliced_bytes_total";

/// Creates the export, store and storage series at 0, so that a `rate` over them (dashboards,
/// alerts) has data before the first event. `store` and `storage` name the configured backends.
pub fn init_series(store: &'static str, storage: &'static str) {
    let _ = handle();
    metrics::counter!(JOBS_STARTED).absolute(0);
    metrics::counter!(EXPORT_RESOURCES_EXPECTED).absolute(0);
    for state in ["completed", "failed"] {
        metrics::counter!(JOBS_FINISHED, "state" => state).absolute(0);
    }
    for state in ["done", "failed"] {
        metrics::counter!(UNITS_FINISHED, "state" => state).absolute(0);
    }
    metrics::counter!(EXPORT_PAGES).absolute(0);
    metrics::counter!(UNITS_CLAIMED).absolute(0);
    metrics::counter!(LEASES_LOST).absolute(0);
    metrics::counter!(SPLICED_BYTES).absolute(0);
    metrics::gauge!(UNITS_ACTIVE).set(0.0);
    metrics::counter!(STORE_ERRORS, "backend" => store).absolute(0);
    metrics::counter!(STORAGE_ERRORS, "backend" => storage).absolute(0);
}

/// The stored jobs by state, as the sweeper counted them.
pub fn jobs(running: usize, completed: usize, failed: usize) {
    metrics::gauge!(JOBS, "state" => "running").set(running as f64);
    metrics::gauge!(JOBS, "state" => "completed").set(completed as f64);
    metrics::gauge!(JOBS, "state" => "failed").set(failed as f64);
}

pub fn job_started() {
    metrics::counter!(JOBS_STARTED).increment(1);
}

/// A job's final state was committed (`completed` or `failed`).
pub fn job_finished(state: &'static str) {
    metrics::counter!(JOBS_FINISHED, "state" => state).increment(1);
}

/// A job started whose searches the upstream counted (`_summary=count`): the resources they
/// will write, against which `bulk_proxy_export_resources_total` tells how far exports are.
pub fn resources_expected(resources: u64) {
    metrics::counter!(EXPORT_RESOURCES_EXPECTED).increment(resources);
}

/// One search page written and checkpointed, with `resources` resources of `resource_type`.
pub fn page_written(resource_type: &str, resources: usize) {
    metrics::counter!(EXPORT_PAGES).increment(1);
    metrics::counter!(EXPORT_RESOURCES, "type" => resource_type.to_owned())
        .increment(resources as u64);
}

/// A unit claimed; the returned guard counts it in `bulk_proxy_units_active` until dropped.
pub fn unit_claimed() -> ActiveUnit {
    metrics::counter!(UNITS_CLAIMED).increment(1);
    metrics::gauge!(UNITS_ACTIVE).increment(1.0);
    ActiveUnit(())
}

/// Counts a unit in `bulk_proxy_units_active` until dropped.
pub struct ActiveUnit(());

impl Drop for ActiveUnit {
    fn drop(&mut self) {
        metrics::gauge!(UNITS_ACTIVE).decrement(1.0);
    }
}

/// A unit's final state was recorded (`done` or `failed`).
pub fn unit_finished(state: &'static str) {
    metrics::counter!(UNITS_FINISHED, "state" => state).increment(1);
}

pub fn lease_lost() {
    metrics::counter!(LEASES_LOST).increment(1);
}

/// A job store operation failed (`embedded` or `redis`).
pub fn store_error(backend: &'static str) {
    metrics::counter!(STORE_ERRORS, "backend" => backend).increment(1);
}

/// An export file operation failed (`local` or `s3`).
pub fn storage_error(backend: &'static str) {
    metrics::counter!(STORAGE_ERRORS, "backend" => backend).increment(1);
}

/// `bytes` of a passthrough body went through a pipe with splice(2).
pub fn spliced(bytes: u64) {
    metrics::counter!(SPLICED_BYTES).increment(bytes);
}

const LATENCY_BUCKETS: &[f64] = &[
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// The process-wide Prometheus handle, installing the recorder on first use.
pub fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .expect("the bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (an embedding application): then our
            // handle renders nothing, which is better than failing to start.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Records one upstream exchange.
pub fn upstream(route: &'static str, outcome: &'static str, elapsed: Duration) {
    let seconds = elapsed.as_secs_f64();
    match (
        HOT.route(route),
        OUTCOMES.iter().position(|o| *o == outcome),
    ) {
        (Some(hot), Some(i)) => hot.upstream[i]
            .get_or_init(|| upstream_histogram(route, outcome))
            .record(seconds),
        _ => upstream_histogram(route, outcome).record(seconds),
    }
}

fn upstream_histogram(route: &'static str, outcome: &'static str) -> Histogram {
    metrics::histogram!(UPSTREAM_DURATION, "route" => route, "outcome" => outcome)
}

/// Records one answered request.
pub fn request(route: &'static str, status: u16, elapsed: Duration) {
    let seconds = elapsed.as_secs_f64();
    let Some(hot) = HOT.route(route) else {
        requests_counter(route, status).increment(1);
        metrics::histogram!(REQUEST_DURATION, "route" => route).record(seconds);
        return;
    };
    match common_status(status) {
        Some(i) => hot.requests[i]
            .get_or_init(|| requests_counter(route, status))
            .increment(1),
        None => requests_counter(route, status).increment(1),
    }
    hot.duration
        .get_or_init(|| metrics::histogram!(REQUEST_DURATION, "route" => route))
        .record(seconds);
}

fn requests_counter(route: &'static str, status: u16) -> Counter {
    metrics::counter!(REQUESTS_TOTAL, "route" => route, "status" => status_label(status))
}

/// Counts a request in `bulk_proxy_requests_in_flight` until dropped.
pub struct InFlight(());

impl InFlight {
    pub fn start() -> Self {
        HOT.in_flight.increment(1.0);
        Self(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        HOT.in_flight.decrement(1.0);
    }
}

/// Route classes recorded through kept handles (the `route` label of both families).
const HOT_ROUTES: [&str; 10] = [
    "passthrough",
    "metadata",
    "export",
    "status",
    "file",
    "token",
    "smart",
    "ops",
    "other",
    "ready",
];
const OUTCOMES: [&str; 4] = ["ok", "timeout", "connect_error", "protocol_error"];

/// Metric handles kept after their first use. Looking a handle up through the `metrics` macros
/// builds a key, hashes it and takes a lock on every call, which cost more than the update itself
/// on the passthrough path; a series still appears only once it has been recorded.
struct Hot {
    in_flight: Gauge,
    routes: [RouteHandles; HOT_ROUTES.len()],
}

#[derive(Default)]
struct RouteHandles {
    duration: OnceLock<Histogram>,
    requests: [OnceLock<Counter>; COMMON_STATUSES.len()],
    upstream: [OnceLock<Histogram>; OUTCOMES.len()],
}

static HOT: LazyLock<Hot> = LazyLock::new(|| {
    // Handles taken before the recorder is installed would record nowhere.
    let _ = handle();
    Hot {
        in_flight: metrics::gauge!(IN_FLIGHT),
        routes: Default::default(),
    }
});

impl Hot {
    fn route(&self, route: &str) -> Option<&RouteHandles> {
        let i = HOT_ROUTES.iter().position(|r| *r == route)?;
        Some(&self.routes[i])
    }
}

/// Drains histogram samples into their buckets every few seconds. Without it the recorder keeps
/// every sample until `/metrics` is scraped: memory grows with traffic on an unscraped proxy.
pub fn spawn_upkeep(
    handle: PrometheusHandle,
    shutdown: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = every.tick() => handle.run_upkeep(),
                () = shutdown.cancelled() => return,
            }
        }
    })
}

/// Status codes with a kept counter, and their labels (no allocation for these).
const COMMON_STATUSES: [(u16, &str); 16] = [
    (200, "200"),
    (201, "201"),
    (202, "202"),
    (204, "204"),
    (206, "206"),
    (304, "304"),
    (400, "400"),
    (401, "401"),
    (403, "403"),
    (404, "404"),
    (412, "412"),
    (429, "429"),
    (500, "500"),
    (502, "502"),
    (503, "503"),
    (504, "504"),
];

fn common_status(status: u16) -> Option<usize> {
    COMMON_STATUSES.iter().position(|(code, _)| *code == status)
}

/// The status as a label, without allocating for the common codes.
fn status_label(status: u16) -> metrics::SharedString {
    match common_status(status) {
        Some(i) => COMMON_STATUSES[i].1.into(),
        None => status.to_string().into(),
    }
}
