//! Generated kick-off queries, valid and hostile, sent over a socket to a running proxy's `$export`
//! at all three levels: every answer is 202 or a 4xx with an OperationOutcome, never a 5xx or a
//! dropped connection. `kickoff::parse` alone is checked by its own property test; this one covers
//! everything between the socket and the job store (it would have caught the `_until` panic).

use std::sync::OnceLock;

use proptest::prelude::*;
use testkit::memory_fhir::MemoryFhir;
use testkit::process::Store;
use testkit::{Setup, plain_client};

/// One proxy (and runtime) for every case: starting a proxy per case would take minutes.
fn proxy() -> &'static (tokio::runtime::Runtime, Setup) {
    static PROXY: OnceLock<(tokio::runtime::Runtime, Setup)> = OnceLock::new();
    PROXY.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let setup = runtime.block_on(async {
            // An empty upstream: accepted jobs finish at once instead of competing for the CPU.
            let fhir = MemoryFhir::new().start().await.unwrap();
            Setup::with_upstream(Store::Embedded, fhir, |config| {
                config.export.max_active_jobs_per_client = 10_000;
            })
            .await
        });
        (runtime, setup)
    })
}

const NAMES: &[&str] = &[
    "_type",
    "_since",
    "_until",
    "_typeFilter",
    "_elements",
    "patient",
    "_outputFormat",
    "includeAssociatedData",
    "organizeOutputBy",
    "_count",
    "unknown",
];

const VALUES: &[&str] = &[
    "Patient,Observation",
    "Observation",
    "NotAType",
    ",,,",
    "2020-01-01T00:00:00Z",
    "2020-01-01",
    "2020",
    "0000-01-01T00:00:00Z",
    "9999-12-31T23:59:59.999999999+14:00",
    "-271821-04-20T00:00:00Z",
    "+275760-09-13T00:00:00Z",
    "2020-13-45T25:61:61Z",
    "2020-02-30",
    "1970-01-01T00:00:00-23:59",
    "Observation?code=1234",
    "Observation?",
    "?",
    "Patient?_id=a%26b",
    "id,meta",
    "Patient/1,Patient/2",
    "application/fhir+ndjson",
    "ndjson",
    "%",
    "%zz",
    "%00",
    "%FF%FE",
    "%E2%82%AC",
    "",
];

/// A parameter value: one of the interesting ones, or generated (percent-encoded where it must be).
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => proptest::sample::select(VALUES).prop_map(str::to_owned),
        1 => "[ -~]{0,24}".prop_map(|raw| {
            percent_encoding::utf8_percent_encode(&raw, percent_encoding::NON_ALPHANUMERIC)
                .to_string()
        }),
        1 => "\\PC{0,8}".prop_map(|raw| {
            percent_encoding::utf8_percent_encode(&raw, percent_encoding::NON_ALPHANUMERIC)
                .to_string()
        }),
    ]
}

fn query() -> impl Strategy<Value = String> {
    let name = prop_oneof![
        4 => proptest::sample::select(NAMES).prop_map(str::to_owned),
        1 => "[a-zA-Z_%0-9]{1,10}",
    ];
    proptest::collection::vec((name, value()), 0..5).prop_map(|pairs| {
        pairs
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect::<Vec<_>>()
            .join("&")
    })
}

/// Sends the kick-off and returns why its answer is wrong, if it is.
async fn check(setup: &Setup, path: &str, query: &str) -> Result<(), String> {
    let url = format!("{}?{query}", setup.proxy.url(path));
    let response = plain_client()
        .get(&url)
        .header("accept", "application/fhir+json")
        .header("prefer", "respond-async")
        .bearer_auth(&setup.token)
        .send()
        .await
        .map_err(|e| format!("{url}: no answer: {e}"))?;
    let status = response.status();
    if status == 202 {
        return Ok(());
    }
    let body = response
        .text()
        .await
        .map_err(|e| format!("{url}: {status}, body cut: {e}"))?;
    if !status.is_client_error() {
        return Err(format!("{url}: {status}: {body}"));
    }
    let outcome: serde_json::Value = serde_json::from_str(&body)
        .map_err(|e| format!("{url}: {status} without a JSON body ({e}): {body}"))?;
    if outcome["resourceType"] != "OperationOutcome" {
        return Err(format!(
            "{url}: {status} without an OperationOutcome: {body}"
        ));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn kick_off_answers_202_or_an_operation_outcome_for_any_query(
        level in proptest::sample::select(&["/$export", "/Patient/$export", "/Group/g1/$export"][..]),
        query in query(),
    ) {
        let (runtime, setup) = proxy();
        let verdict = runtime.block_on(check(setup, level, &query));
        prop_assert!(verdict.is_ok(), "{}", verdict.unwrap_err());
    }
}
