//! `[export]`: how exports are built (paging, workers, batching, file limits, retries, leases,
//! job lifetime and the sweeper).

use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid};
use crate::fhir::compartment::compartment_param;
use crate::fhir::resource_types::is_resource_type;

/// How exports are built.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExportConfig {
    /// `_count` asked of the upstream for each search page. Default 1000.
    pub page_size: u32,
    /// Units (searches) one replica works on at once. Default 4.
    pub workers: usize,
    /// Cap on concurrent upstream search requests: from all replicas together with the Redis
    /// store, from this replica with the embedded one. Default 8.
    pub max_upstream_concurrency: usize,
    /// Patients per search at Patient and Group level (`patient=a,b,c`). Default 100.
    pub patient_batch_size: usize,
    /// Longest search URL the proxy sends; patient batches are cut to stay below it. Default 4096.
    pub max_search_url_bytes: usize,
    /// Patient and Group exports whose patients are at least this fraction of the upstream's
    /// Patients are fetched by type-level searches whose resources outside those patients'
    /// compartment are dropped, instead of by patient batches (`export::plan::scan_pays`).
    /// 0 scans always, above 1 never. Default 0.5.
    pub scan_min_coverage: f64,
    /// Group-level export leaves out members with `inactive = true` or a `period.end` before the
    /// export's `transactionTime`. Default true.
    pub group_active_members_only: bool,
    /// Levels of nested Groups (a member that is a Group) followed below the Group exported; 0
    /// follows none. Deeper ones are named in the error file. Default 3, at most 10.
    pub group_max_depth: usize,
    /// A new output file is started past this many bytes. Default 256 MiB.
    pub max_file_bytes: u64,
    /// A new output file is started past this many resources. Default 100000.
    pub max_file_resources: u64,
    /// Attempts per upstream page (5xx, 429, timeouts) before the unit fails. Default 5.
    pub retry_max_attempts: u32,
    /// First retry delay in milliseconds, doubled each attempt up to `retry_max_ms`; also the first
    /// delay before a failed finalisation is tried again. Default 500.
    pub retry_base_ms: u64,
    /// Longest retry delay (also caps a `Retry-After`), milliseconds. Default 30000.
    pub retry_max_ms: u64,
    /// Time allowed for one upstream search page, milliseconds. Default 120000.
    pub page_timeout_ms: u64,
    /// Largest search page the proxy reads, bytes. Default 64 MiB.
    pub max_page_bytes: usize,
    /// Sort searches by `_lastUpdated`, so that a unit whose paging cursor expired can resume from
    /// its last `meta.lastUpdated` instead of from scratch. Default true.
    pub sort_by_last_updated: bool,
    /// Seconds a completed job and its files are kept (the manifest's `Expires`). Default 3600.
    pub job_ttl_secs: u64,
    /// Running exports one client may have at once; more answer 429. Default 2.
    pub max_active_jobs_per_client: usize,
    /// `Retry-After` told to status pollers, seconds; polling more than twice as fast answers 429.
    /// Default 2.
    pub poll_retry_after_secs: u64,
    /// Seconds a worker's claim on a unit lasts without a heartbeat. Default 30.
    pub lease_secs: u64,
    /// Seconds between sweeps that delete expired jobs and their files, and finalise jobs whose
    /// units are all done but whose finaliser died. Default 60.
    pub sweep_interval_secs: u64,
    /// Types outside the Patient compartment whose resources a Patient or Group export includes
    /// when the exported resources reference them (and `_type` is absent or names them), fetched
    /// by `_id` at the end of the export. R4 resource types outside the compartment. Default
    /// Organization, Practitioner, PractitionerRole, Location, Medication.
    pub supporting_types: Vec<String>,
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self {
            page_size: 1000,
            workers: 4,
            max_upstream_concurrency: 8,
            patient_batch_size: 100,
            max_search_url_bytes: 4096,
            scan_min_coverage: 0.5,
            group_active_members_only: true,
            group_max_depth: 3,
            max_file_bytes: 256 * 1024 * 1024,
            max_file_resources: 100_000,
            retry_max_attempts: 5,
            retry_base_ms: 500,
            retry_max_ms: 30_000,
            page_timeout_ms: 120_000,
            max_page_bytes: 64 * 1024 * 1024,
            sort_by_last_updated: true,
            job_ttl_secs: 3600,
            max_active_jobs_per_client: 2,
            poll_retry_after_secs: 2,
            lease_secs: 30,
            sweep_interval_secs: 60,
            supporting_types: [
                "Organization",
                "Practitioner",
                "PractitionerRole",
                "Location",
                "Medication",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

impl ExportConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let e = self;
        let positive = [
            ("export.page_size", e.page_size as u64),
            ("export.workers", e.workers as u64),
            (
                "export.max_upstream_concurrency",
                e.max_upstream_concurrency as u64,
            ),
            ("export.patient_batch_size", e.patient_batch_size as u64),
            ("export.max_file_resources", e.max_file_resources),
            ("export.retry_max_attempts", u64::from(e.retry_max_attempts)),
            ("export.page_timeout_ms", e.page_timeout_ms),
            (
                "export.max_active_jobs_per_client",
                e.max_active_jobs_per_client as u64,
            ),
            ("export.poll_retry_after_secs", e.poll_retry_after_secs),
            ("export.lease_secs", e.lease_secs),
            ("export.sweep_interval_secs", e.sweep_interval_secs),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(invalid(key, "0", "must be greater than 0"));
            }
        }
        if e.max_search_url_bytes < 256 {
            return Err(invalid(
                "export.max_search_url_bytes",
                e.max_search_url_bytes.to_string(),
                "must be at least 256",
            ));
        }
        if !(e.scan_min_coverage.is_finite() && e.scan_min_coverage >= 0.0) {
            return Err(invalid(
                "export.scan_min_coverage",
                e.scan_min_coverage.to_string(),
                "must be a number from 0 (always scan) upwards (above 1: never)",
            ));
        }
        if e.group_max_depth > 10 {
            return Err(invalid(
                "export.group_max_depth",
                e.group_max_depth.to_string(),
                "must be at most 10",
            ));
        }
        if e.max_file_bytes < 1024 {
            return Err(invalid(
                "export.max_file_bytes",
                e.max_file_bytes.to_string(),
                "must be at least 1024",
            ));
        }
        for t in &e.supporting_types {
            let reason = if !is_resource_type(t) {
                "is not an R4 resource type"
            } else if compartment_param(t).is_some() {
                "is in the Patient compartment (exported by search at Patient and Group level)"
            } else {
                continue;
            };
            return Err(invalid("export.supporting_types", t, reason));
        }
        if e.retry_base_ms > e.retry_max_ms {
            return Err(invalid(
                "export.retry_base_ms",
                e.retry_base_ms.to_string(),
                "must not exceed export.retry_max_ms",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use crate::config::tests::{assert_each_bad_value_named, load_toml};

    #[test]
    fn supporting_types_are_r4_types_outside_the_patient_compartment() {
        let config = load_toml("").unwrap();
        assert_eq!(
            config.export.supporting_types,
            [
                "Organization",
                "Practitioner",
                "PractitionerRole",
                "Location",
                "Medication"
            ]
        );
        let config = load_toml("[export]\nsupporting_types = [\"Device\"]\n");
        let message = config.unwrap_err();
        assert!(
            message.contains("export.supporting_types")
                && message.contains("Device")
                && message.contains("Patient compartment"),
            "{message}"
        );
        let message = load_toml("[export]\nsupporting_types = [\"Organisation\"]\n").unwrap_err();
        assert!(
            message.contains("Organisation") && message.contains("not an R4 resource type"),
            "{message}"
        );
        let config = load_toml("[export]\nsupporting_types = []\n").unwrap();
        assert!(config.export.supporting_types.is_empty());
        figment::Jail::expect_with(|jail| {
            crate::config::tests::with_upstream(jail);
            jail.set_env(
                "BULK_PROXY_EXPORT__SUPPORTING_TYPES",
                "[Organization, Location]",
            );
            let config = crate::config::Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(config.export.supporting_types, ["Organization", "Location"]);
            Ok(())
        });
    }

    #[test]
    fn each_bad_export_value_names_key_value_and_reason() {
        assert_each_bad_value_named(&[
            ("BULK_PROXY_EXPORT__WORKERS", "0", "export.workers"),
            (
                "BULK_PROXY_EXPORT__GROUP_MAX_DEPTH",
                "11",
                "export.group_max_depth",
            ),
            (
                "BULK_PROXY_EXPORT__RETRY_BASE_MS",
                "999999",
                "export.retry_base_ms",
            ),
        ]);
    }
}
