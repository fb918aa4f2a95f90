//! An exporting proxy set up for a test: the in-memory FHIR server loaded with the 10-patient
//! Synthea fixture, a proxy in front of it with test-friendly export settings on either job store,
//! a registered client and its token; then kick-off, polling (as `Retry-After` says) until the
//! manifest arrives, and downloading every file, with the checks every caller would repeat.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use fhir_bulk_proxy::config::Config;
use reqwest::StatusCode;
use serde_json::Value;

use crate::memory_fhir::{MemoryFhir, RunningFhir};
use crate::process::Store;
use crate::redis::RedisServer;
use crate::smart::SmartClient;
use crate::{TestProxy, plain_client as client};

pub const GROUP: &str = "synthea-10";

/// The in-memory FHIR server loaded with the 10-patient fixture, on a new port.
pub async fn fixture_upstream() -> RunningFhir {
    MemoryFhir::new()
        .load_dir(&fixture_dir())
        .unwrap()
        .start()
        .await
        .unwrap()
}

/// `tests/fixtures/bds-r4-10`: ten Synthea patients and everything they reference.
pub fn fixture_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/bds-r4-10")
}

/// Runs a scenario once per store: `both!(name)` beside `async fn name(store: Store)` makes the
/// tests `name::embedded` and `name::redis` (a module and a function may share a name), so every
/// export behaviour is checked through both `JobStore`s.
#[macro_export]
macro_rules! both {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn embedded() {
                super::$name($crate::process::Store::Embedded).await;
            }
            #[tokio::test]
            async fn redis() {
                super::$name($crate::process::Store::Redis).await;
            }
        }
    };
}

/// The fixture upstream, a proxy in front of it, a registered client and its token.
pub struct Setup {
    pub fhir: RunningFhir,
    pub proxy: TestProxy,
    pub client: SmartClient,
    pub token: String,
    /// The Redis server of a Redis-backed setup (stopped when dropped).
    pub _redis: Option<RedisServer>,
}

impl Setup {
    pub async fn new(store: Store, configure: impl FnOnce(&mut Config)) -> Self {
        let fhir = fixture_upstream().await;
        Self::with_upstream(store, fhir, configure).await
    }

    pub async fn with_upstream(
        store: Store,
        fhir: RunningFhir,
        configure: impl FnOnce(&mut Config),
    ) -> Self {
        let mut config = TestProxy::config(&fhir.url());
        // The embedded store's file goes in the proxy's own directory (TestProxy::start).
        let redis = match store {
            Store::Embedded => None,
            Store::Redis => store.configure(&mut config, std::path::Path::new("")),
        };
        config.export.page_size = 100;
        config.export.poll_retry_after_secs = 1;
        config.export.retry_base_ms = 10;
        config.export.patient_batch_size = 4;
        let client = SmartClient::register(&mut config);
        configure(&mut config);
        let proxy = TestProxy::start(config).await;
        let token = client.token(&proxy).await;
        Self {
            fhir,
            proxy,
            client,
            token,
            _redis: redis,
        }
    }

    /// GET `url` with the client's token.
    pub async fn get(&self, url: &str) -> reqwest::Response {
        crate::get_with_token(url, &self.token).await
    }

    /// GET `url` with the client's token and `headers`.
    pub async fn get_with(&self, url: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut request = client().get(url).bearer_auth(&self.token);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.unwrap()
    }

    /// Asserts that the file at `url`, asked for gzip-coded, comes gzip-coded and decodes to
    /// `plain`; and that a range of it (`bytes=10-19`) comes as is, not coded.
    pub async fn assert_gzip_and_range(&self, url: &str, plain: &[u8]) {
        let gz = self.get_with(url, &[("accept-encoding", "gzip")]).await;
        assert_eq!(gz.headers()["content-encoding"], "gzip");
        assert_eq!(gz.headers()["content-type"], "application/fhir+ndjson");
        let compressed = gz.bytes().await.unwrap();
        let mut decoded = Vec::new();
        let mut decoder = flate2::read::GzDecoder::new(&compressed[..]);
        std::io::Read::read_to_end(&mut decoder, &mut decoded).unwrap();
        assert_eq!(decoded, plain);
        let ranged = [("range", "bytes=10-19"), ("accept-encoding", "gzip")];
        let ranged = self.get_with(url, &ranged).await;
        assert_eq!(ranged.status(), 206);
        assert!(ranged.headers().get("content-encoding").is_none());
        assert_eq!(ranged.bytes().await.unwrap(), plain[10..20]);
    }

    /// DELETE `url` with the client's token.
    pub async fn delete(&self, url: &str) -> reqwest::Response {
        client()
            .delete(url)
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap()
    }

    /// GET kick-off with the headers the IG asks for.
    pub async fn kick_off(&self, path_and_query: &str) -> reqwest::Response {
        crate::kick_off(self.proxy.url(path_and_query), &self.token).await
    }

    /// POST kick-off with a Parameters `body` and the headers the IG asks for.
    pub async fn kick_off_post(
        &self,
        path: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        client()
            .post(self.proxy.url(path))
            .header("accept", "application/fhir+json")
            .header("prefer", "respond-async")
            .header("content-type", "application/fhir+json")
            .bearer_auth(&self.token)
            .body(body)
            .send()
            .await
            .unwrap()
    }

    /// Kicks off and returns the status URL, asserting 202.
    pub async fn start(&self, path_and_query: &str) -> String {
        let response = self.kick_off(path_and_query).await;
        let status = response.status();
        let location = response
            .headers()
            .get("content-location")
            .map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(
            status,
            202,
            "{path_and_query}: {}",
            response.text().await.unwrap()
        );
        location.unwrap()
    }

    /// Polls (as told by Retry-After) until the manifest arrives.
    pub async fn manifest(&self, status_url: &str) -> Value {
        for _ in 0..300 {
            let response = crate::get_with_token(status_url, &self.token).await;
            match response.status() {
                StatusCode::ACCEPTED => {
                    let wait: u64 = crate::retry_after(&response);
                    assert!(wait > 0);
                    tokio::time::sleep(Duration::from_millis(wait * 1000)).await;
                }
                StatusCode::OK => {
                    assert_eq!(response.headers()["content-type"], "application/json");
                    assert!(response.headers().contains_key("expires"));
                    return response.json().await.unwrap();
                }
                other => panic!("status {other}: {}", response.text().await.unwrap()),
            }
        }
        panic!("the export did not finish");
    }

    /// Every resource of the manifest's output, by type.
    pub async fn download(&self, manifest: &Value) -> BTreeMap<String, Vec<Value>> {
        let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for item in manifest["output"].as_array().unwrap() {
            let url = item["url"].as_str().unwrap();
            assert!(url.starts_with("http://"), "absolute url");
            let response = crate::get_with_token(url, &self.token).await;
            assert_eq!(response.status(), 200);
            assert_eq!(
                response.headers()["content-type"],
                "application/fhir+ndjson"
            );
            let text = response.text().await.unwrap();
            let lines: Vec<Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            assert_eq!(
                lines.len() as u64,
                item["count"].as_u64().unwrap(),
                "count of {url}"
            );
            let t = item["type"].as_str().unwrap();
            assert!(
                lines.iter().all(|r| r["resourceType"] == t),
                "one type per file"
            );
            out.entry(t.to_owned()).or_default().extend(lines);
        }
        out
    }

    pub async fn export(&self, path_and_query: &str) -> (Value, BTreeMap<String, Vec<Value>>) {
        let status_url = self.start(path_and_query).await;
        let manifest = self.manifest(&status_url).await;
        let files = self.download(&manifest).await;
        (manifest, files)
    }

    /// The error file's OperationOutcomes.
    pub async fn errors(&self, manifest: &Value) -> Vec<Value> {
        let mut out = Vec::new();
        for item in manifest["error"].as_array().unwrap() {
            assert_eq!(item["type"], "OperationOutcome");
            let text = crate::get_with_token(item["url"].as_str().unwrap(), &self.token)
                .await
                .text()
                .await
                .unwrap();
            out.extend(
                text.lines()
                    .map(|l| serde_json::from_str::<Value>(l).unwrap()),
            );
        }
        out
    }
}

/// Ids per type, asserting none appears twice.
pub fn ids(files: &BTreeMap<String, Vec<Value>>) -> BTreeMap<String, BTreeSet<String>> {
    files
        .iter()
        .map(|(t, resources)| {
            let ids: BTreeSet<String> = resources
                .iter()
                .map(|r| r["id"].as_str().unwrap().to_owned())
                .collect();
            assert_eq!(ids.len(), resources.len(), "an id appears twice in {t}");
            (t.clone(), ids)
        })
        .collect()
}

/// Asserts equal id sets per type, printing only what differs.
pub fn assert_same(
    got: &BTreeMap<String, BTreeSet<String>>,
    want: &BTreeMap<String, BTreeSet<String>>,
) {
    let types = |m: &BTreeMap<String, BTreeSet<String>>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(types(got), types(want), "exported types");
    for (t, ids) in want {
        let missing: Vec<_> = ids.difference(&got[t]).take(3).collect();
        let extra: Vec<_> = got[t].difference(ids).take(3).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{t}: {} exported, {} expected; missing {missing:?}, extra {extra:?}",
            got[t].len(),
            ids.len()
        );
    }
}

pub fn expected(
    fhir: &RunningFhir,
    patients: Option<&[String]>,
) -> BTreeMap<String, BTreeSet<String>> {
    fhir.types()
        .into_iter()
        .map(|t| {
            let ids = match patients {
                None => fhir.ids(&t),
                Some(p) => fhir.ids_for_patients(&t, p),
            };
            (t, ids.into_iter().collect::<BTreeSet<_>>())
        })
        .filter(|(_, ids)| !ids.is_empty())
        .collect()
}

pub fn group_members() -> Vec<String> {
    let text = std::fs::read_to_string(fixture_dir().join("Group.ndjson")).unwrap();
    let group: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    group["member"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            m["entity"]["reference"]
                .as_str()
                .unwrap()
                .trim_start_matches("Patient/")
                .to_owned()
        })
        .collect()
}
