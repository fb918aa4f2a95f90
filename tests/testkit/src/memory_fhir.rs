//! A small in-memory FHIR R4 server: the upstream of the one-command demo, of the export tests and
//! of the benchmarks. It is not a product feature and does not pretend to be a complete FHIR
//! server; it implements exactly the search behaviour an export needs, the way real servers do:
//!
//! - `GET {base}/metadata`: a CapabilityStatement listing the types it holds;
//! - `GET {base}/{Type}/{id}`: read;
//! - `GET {base}/{Type}?...`: searchset pages with `next` links (`_count`, stateless `_offset`
//!   cursors); `_id`; the patient parameters `patient`, `subject`, `member`, `actor` (a resource
//!   matches when it references one of the patients anywhere); `_lastUpdated` with `gt|ge|lt|le|eq`
//!   (repeatable, AND); `_sort=_lastUpdated`; `_elements` is accepted and ignored (servers may);
//!   any other parameter matches a top-level string field or a `coding.code` inside that field.
//!
//! Paging the way other servers do ([`Paging`], [`MemoryFhir::paging`]): HAPI's `_getpages`
//! links on the base, opaque cursors, absolute or relative `next` links, `_sort` ignored, `_count`
//! capped, no `Bundle.total`, and no `_lastUpdated` search (left out of the CapabilityStatement's
//! search parameters, and answered with 400 or ignored).
//!
//! Fault injection for tests: [`Faults`] makes chosen requests fail (500 or 429 with
//! `Retry-After`), expires `next` links (410), or adds latency. Every search is counted.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// One stored resource.
struct Stored {
    id: String,
    /// `meta.lastUpdated`, parsed: the search order and the `_lastUpdated` comparisons use it.
    at: time::OffsetDateTime,
    /// Ids of every Patient the resource references.
    patients: Vec<String>,
    json: Value,
}

/// Failures to inject, each counted down atomically.
#[derive(Default)]
pub struct Faults {
    /// The next N searches of any type answer 500.
    pub fail_searches: AtomicU64,
    /// The next N searches answer 429 with `Retry-After: 1`.
    pub throttle_searches: AtomicU64,
    /// The next N requests on `next` links answer 410 Gone (an expired cursor).
    pub expire_next_links: AtomicU64,
    /// Searches of this type always answer 500 (a permanent failure).
    pub broken_type: std::sync::Mutex<Option<String>>,
    /// Added to every search, milliseconds.
    pub latency_ms: AtomicU64,
}

/// Counters readable by tests and benchmarks.
#[derive(Default)]
pub struct Counters {
    /// Searches (first pages) received, counts (`_summary=count`) apart.
    pub searches: AtomicU64,
    /// `_summary=count` requests received.
    pub counts: AtomicU64,
    /// Pages served (first and following).
    pub pages: AtomicU64,
    /// Every page served, in order: its resource type and `_offset`; a resumed export shows here
    /// which pages it fetched again.
    pub served: std::sync::Mutex<Vec<(String, usize)>>,
    /// Searches being answered now, and the most at once so far.
    pub in_flight: AtomicU64,
    pub max_in_flight: AtomicU64,
}

/// Counts a search in `in_flight` until dropped.
struct InFlight<'a>(&'a Counters);

impl<'a> InFlight<'a> {
    fn start(counters: &'a Counters) -> Self {
        let now = counters.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        counters.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Self(counters)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Decides from a request's `Authorization` (if any) whether it may be answered.
pub type Authorize = Arc<dyn Fn(Option<&str>) -> bool + Send + Sync>;

/// How the server pages and what of the search it honours (default: stateless `_offset` links
/// relative to the host, `_sort` and `_count` honoured up to 5000, a total, `_lastUpdated`).
#[derive(Debug, Clone, Default)]
pub struct Paging {
    pub style: PagingStyle,
    /// `next` links as full URLs (`http://host:port/fhir/...`), not just a path.
    pub absolute_links: bool,
    /// Pages come newest first whatever `_sort` asks.
    pub ignore_sort: bool,
    /// At most this many entries a page, whatever `_count` asks.
    pub max_count: Option<usize>,
    /// No `Bundle.total`.
    pub omit_total: bool,
    pub last_updated: LastUpdatedSearch,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PagingStyle {
    /// `{Type}?...&_offset=N` (stateless).
    #[default]
    Offset,
    /// HAPI: `{base}?_getpages=ID&_getpagesoffset=N&_count=N&_bundletype=searchset`, the search
    /// kept on the server under ID.
    GetPages,
    /// `{Type}?_cursor=TOKEN`, TOKEN opaque (a random id the server maps to the position).
    Cursor,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LastUpdatedSearch {
    #[default]
    Supported,
    /// Not in the CapabilityStatement; a search with `_lastUpdated` (or `_sort=_lastUpdated`)
    /// answers 400.
    Rejected,
    /// Not in the CapabilityStatement; `_lastUpdated` and `_sort` are ignored.
    Ignored,
}

struct Inner {
    base: String,
    /// `http://host:port`, for absolute links.
    origin: String,
    paging: Paging,
    /// Searches kept for `_getpages` and cursors: id → (type, parameters); cursor → (id, offset).
    kept: std::sync::Mutex<Kept>,
    bearer: Option<String>,
    authorize: Option<Authorize>,
    smart_configuration: Option<Value>,
    types: HashMap<String, Vec<Stored>>,
    faults: Arc<Faults>,
    counters: Arc<Counters>,
}

/// An in-memory FHIR server under construction.
#[derive(Default)]
struct Kept {
    searches: HashMap<String, (String, Vec<(String, String)>)>,
    cursors: HashMap<String, (String, usize)>,
}

pub struct MemoryFhir {
    paging: Paging,
    base: String,
    types: HashMap<String, Vec<Stored>>,
    clock: u64,
    bearer: Option<String>,
    authorize: Option<Authorize>,
    smart_configuration: Option<Value>,
}

/// A running [`MemoryFhir`].
pub struct RunningFhir {
    pub addr: std::net::SocketAddr,
    base: String,
    pub faults: Arc<Faults>,
    pub counters: Arc<Counters>,
    inner: Arc<Inner>,
}

impl Default for MemoryFhir {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryFhir {
    pub fn new() -> Self {
        Self {
            paging: Paging::default(),
            base: "/fhir".into(),
            types: HashMap::new(),
            clock: 0,
            bearer: None,
            authorize: None,
            smart_configuration: None,
        }
    }

    /// Pages the way `paging` says.
    pub fn paging(mut self, paging: Paging) -> Self {
        self.paging = paging;
        self
    }

    /// The FHIR base path (default `/fhir`; `""` for the root).
    pub fn base(mut self, base: &str) -> Self {
        self.base = base.trim_end_matches('/').into();
        self
    }

    /// Answers 401 to requests without `Authorization: Bearer {token}` (an upstream with its own
    /// authentication).
    pub fn require_bearer(mut self, token: &str) -> Self {
        self.bearer = Some(format!("Bearer {token}"));
        self
    }

    /// Answers 401 to requests whose `Authorization` `authorize` refuses (e.g. tokens a test
    /// token server did not issue, or that expired).
    pub fn require_authorization(mut self, authorize: Authorize) -> Self {
        self.authorize = Some(authorize);
        self
    }

    /// Serves `document` at `{base}/.well-known/smart-configuration`, without authentication.
    pub fn smart_configuration(mut self, document: Value) -> Self {
        self.smart_configuration = Some(document);
        self
    }

    /// Loads every `*.ndjson` file of a directory (bulk-export layout: one type per file).
    pub fn load_dir(mut self, dir: &Path) -> std::io::Result<Self> {
        let mut paths: Vec<_> = std::fs::read_dir(dir)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "ndjson"))
            .collect();
        paths.sort();
        for path in paths {
            let text = std::fs::read_to_string(&path)?;
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let value: Value = serde_json::from_str(line).map_err(|e| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{}: {e}", path.display()),
                    )
                })?;
                self.insert(value);
            }
        }
        Ok(self)
    }

    /// Adds a resource; `meta.lastUpdated` is kept when present, otherwise stamped (one
    /// millisecond apart, in insertion order, as a server loading them would).
    pub fn insert(&mut self, mut value: Value) {
        let Some(resource_type) = value["resourceType"].as_str().map(str::to_owned) else {
            return;
        };
        let Some(id) = value["id"].as_str().map(str::to_owned) else {
            return;
        };
        let last_updated = match value["meta"]["lastUpdated"].as_str() {
            Some(stamp) => stamp.to_owned(),
            None => {
                self.clock += 1;
                let stamp = stamp(self.clock);
                if !value["meta"].is_object() {
                    value["meta"] = json!({});
                }
                value["meta"]["lastUpdated"] = json!(stamp);
                stamp
            }
        };
        let mut patients = Vec::new();
        collect_patient_refs(&value, &mut patients);
        if resource_type == "Patient" {
            patients.push(id.clone());
        }
        patients.sort();
        patients.dedup();
        let at = time::OffsetDateTime::parse(
            &last_updated,
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        self.types.entry(resource_type).or_default().push(Stored {
            id,
            at,
            patients,
            json: value,
        });
    }

    /// Synthetic data: `patients` patients with `per_patient` Observations each (for benchmarks).
    pub fn synthetic(mut self, patients: usize, per_patient: usize) -> Self {
        for p in 0..patients {
            let pid = format!("pat-{p}");
            self.insert(json!({"resourceType": "Patient", "id": pid, "gender": if p % 2 == 0 { "female" } else { "male" }, "birthDate": "1970-01-01"}));
            for o in 0..per_patient {
                self.insert(json!({
                    "resourceType": "Observation", "id": format!("obs-{p}-{o}"), "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
                    "subject": {"reference": format!("Patient/{pid}")},
                    "effectiveDateTime": "2020-01-01T00:00:00Z",
                    "valueQuantity": {"value": 60 + (o % 40), "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}
                }));
            }
        }
        self
    }

    /// How many resources of a type it holds.
    pub fn count(&self, resource_type: &str) -> usize {
        self.types.get(resource_type).map_or(0, Vec::len)
    }

    /// Serves on `listener` in a background task.
    pub fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<RunningFhir> {
        let addr = listener.local_addr()?;
        let mut types = self.types;
        for resources in types.values_mut() {
            resources.sort_by(|a, b| (a.at, &a.id).cmp(&(b.at, &b.id)));
        }
        let inner = Arc::new(Inner {
            origin: format!("http://{addr}"),
            paging: self.paging,
            kept: std::sync::Mutex::new(Kept::default()),
            base: self.base.clone(),
            bearer: self.bearer,
            authorize: self.authorize,
            smart_configuration: self.smart_configuration,
            types,
            faults: Arc::new(Faults::default()),
            counters: Arc::new(Counters::default()),
        });
        let app = Router::new().fallback(handle).with_state(inner.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(RunningFhir {
            addr,
            base: self.base,
            faults: inner.faults.clone(),
            counters: inner.counters.clone(),
            inner,
        })
    }

    /// Serves on a new `127.0.0.1` port.
    pub async fn start(self) -> std::io::Result<RunningFhir> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        self.serve(listener)
    }
}

impl RunningFhir {
    /// The FHIR base URL.
    pub fn url(&self) -> String {
        format!("http://{}{}", self.addr, self.base)
    }

    /// Ids of every resource of a type.
    pub fn ids(&self, resource_type: &str) -> Vec<String> {
        self.inner
            .types
            .get(resource_type)
            .map_or_else(Vec::new, |r| r.iter().map(|s| s.id.clone()).collect())
    }

    /// Ids of the resources of a type that reference one of `patients` (the compartment).
    pub fn ids_for_patients(&self, resource_type: &str, patients: &[String]) -> Vec<String> {
        self.inner
            .types
            .get(resource_type)
            .map_or_else(Vec::new, |r| {
                r.iter()
                    .filter(|s| s.patients.iter().any(|p| patients.contains(p)))
                    .map(|s| s.id.clone())
                    .collect()
            })
    }

    /// Ids of the resources of a type whose `meta.lastUpdated` is after `since` (RFC 3339).
    pub fn ids_updated_after(&self, resource_type: &str, since: &str) -> Vec<String> {
        let since =
            time::OffsetDateTime::parse(since, &time::format_description::well_known::Rfc3339)
                .expect("an RFC 3339 instant");
        self.inner
            .types
            .get(resource_type)
            .map_or_else(Vec::new, |r| {
                r.iter()
                    .filter(|s| s.at > since)
                    .map(|s| s.id.clone())
                    .collect()
            })
    }

    /// Every type it holds.
    pub fn types(&self) -> Vec<String> {
        let mut types: Vec<String> = self.inner.types.keys().cloned().collect();
        types.sort();
        types
    }
}

fn stamp(ms: u64) -> String {
    let base = time::macros::datetime!(2024-01-01 00:00:00 UTC);
    let at = base + Duration::from_millis(ms);
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn collect_patient_refs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                if key == "reference" {
                    if let Some(id) = child
                        .as_str()
                        .and_then(|r| r.rsplit_once("Patient/"))
                        .map(|(_, id)| id)
                    {
                        out.push(id.to_owned());
                    }
                } else {
                    collect_patient_refs(child, out);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| collect_patient_refs(i, out)),
        _ => {}
    }
}

fn take(counter: &AtomicU64) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

fn outcome(status: StatusCode, text: &str) -> Response {
    // The proxy's own builder: the one place OperationOutcomes are made.
    let body = fhir_bulk_proxy::fhir::OperationOutcome::error("processing", text).to_json();
    (
        status,
        [(header::CONTENT_TYPE, "application/fhir+json")],
        body.to_string(),
    )
        .into_response()
}

async fn handle(State(inner): State<Arc<Inner>>, request: Request) -> Response {
    if let Some(document) = &inner.smart_configuration
        && request.uri().path() == format!("{}/.well-known/smart-configuration", inner.base)
    {
        return axum::Json(document.clone()).into_response();
    }
    if let Some(authorize) = &inner.authorize {
        let given = request.headers().get(header::AUTHORIZATION);
        if !authorize(given.and_then(|v| v.to_str().ok())) {
            return outcome(StatusCode::UNAUTHORIZED, "authentication required");
        }
    }
    if let Some(bearer) = &inner.bearer {
        let given = request.headers().get(header::AUTHORIZATION);
        if given.and_then(|v| v.to_str().ok()) != Some(bearer.as_str()) {
            return outcome(StatusCode::UNAUTHORIZED, "authentication required");
        }
    }
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    let Some(rest) = path.strip_prefix(&inner.base) else {
        return outcome(StatusCode::NOT_FOUND, "outside the FHIR base");
    };
    let segments: Vec<&str> = rest
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    match segments.as_slice() {
        [] if query.contains("_getpages=") => {
            let params = parse_query(&query);
            let get = |name: &str| {
                params
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
            };
            let kept = get("_getpages").and_then(|id| {
                let kept = inner.kept.lock().ok()?;
                kept.searches.get(&id).cloned().map(|search| (id, search))
            });
            let Some((id, (resource_type, mut params))) = kept else {
                return outcome(StatusCode::GONE, "unknown or expired _getpages");
            };
            let offset = get("_getpagesoffset")
                .and_then(|o| o.parse().ok())
                .unwrap_or(0);
            params.retain(|(k, _)| k != "_count");
            if let Some(count) = get("_count") {
                params.push(("_count".into(), count));
            }
            search_page(&inner, &resource_type, params, offset, Some(id)).await
        }
        ["metadata"] => capability(&inner),
        [resource_type, id] => {
            let found = inner
                .types
                .get(*resource_type)
                .and_then(|r| r.iter().find(|s| s.id == *id));
            match found {
                Some(stored) => (
                    [(header::CONTENT_TYPE, "application/fhir+json")],
                    stored.json.to_string(),
                )
                    .into_response(),
                None => outcome(
                    StatusCode::NOT_FOUND,
                    &format!("{resource_type}/{id} not found"),
                ),
            }
        }
        [resource_type] => search(&inner, resource_type, &query).await,
        _ => outcome(StatusCode::NOT_FOUND, "unsupported interaction"),
    }
}

fn capability(inner: &Inner) -> Response {
    let mut types: Vec<&String> = inner.types.keys().collect();
    types.sort();
    let resources: Vec<Value> = types
        .iter()
        .map(|t| {
            let mut resource =
                json!({"type": t, "interaction": [{"code": "read"}, {"code": "search-type"}]});
            if inner.paging.last_updated != LastUpdatedSearch::Supported {
                resource["searchParam"] = json!([
                    {"name": "_id", "type": "token"},
                    {"name": "patient", "type": "reference"}
                ]);
            }
            resource
        })
        .collect();
    let body = json!({
        "resourceType": "CapabilityStatement", "status": "active", "kind": "instance",
        "fhirVersion": "4.0.1", "format": ["json"],
        "rest": [{"mode": "server", "resource": resources}]
    });
    (
        [(header::CONTENT_TYPE, "application/fhir+json")],
        body.to_string(),
    )
        .into_response()
}

fn parse_query(query: &str) -> Vec<(String, String)> {
    url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}

async fn search(inner: &Inner, resource_type: &str, query: &str) -> Response {
    let params = parse_query(query);
    if let Some((_, cursor)) = params.iter().find(|(k, _)| k == "_cursor") {
        let kept = inner.kept.lock().ok().and_then(|kept| {
            let (id, offset) = kept.cursors.get(cursor)?.clone();
            Some((id.clone(), kept.searches.get(&id)?.1.clone(), offset))
        });
        let Some((id, params, offset)) = kept else {
            return outcome(StatusCode::GONE, "unknown or expired cursor");
        };
        return search_page(inner, resource_type, params, offset, Some(id)).await;
    }
    let offset: usize = params
        .iter()
        .find(|(k, _)| k == "_offset")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    search_page(inner, resource_type, params, offset, None).await
}

/// One page of a search from `offset`; `kept` is the id of a search the server keeps
/// (`_getpages`, cursors), `None` for a new one or a stateless `_offset` link.
async fn search_page(
    inner: &Inner,
    resource_type: &str,
    params: Vec<(String, String)>,
    offset: usize,
    kept: Option<String>,
) -> Response {
    let paging = &inner.paging;
    if paging.last_updated == LastUpdatedSearch::Rejected
        && params
            .iter()
            .any(|(k, v)| k == "_lastUpdated" || (k == "_sort" && v.contains("_lastUpdated")))
    {
        return outcome(
            StatusCode::BAD_REQUEST,
            "unknown search parameter _lastUpdated",
        );
    }
    let params: Vec<(String, String)> = if paging.last_updated == LastUpdatedSearch::Ignored {
        params
            .into_iter()
            .filter(|(k, _)| k != "_lastUpdated")
            .collect()
    } else {
        params
    };
    let is_next = offset > 0 || kept.is_some();
    let _in_flight = InFlight::start(&inner.counters);
    let faults = &inner.faults;
    let latency = faults.latency_ms.load(Ordering::Relaxed);
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    if is_next && take(&faults.expire_next_links) {
        return outcome(StatusCode::GONE, "the paging cursor has expired");
    }
    if faults
        .broken_type
        .lock()
        .map(|b| b.as_deref() == Some(resource_type))
        .unwrap_or(false)
    {
        return outcome(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("{resource_type} searches are broken"),
        );
    }
    if take(&faults.fail_searches) {
        return outcome(StatusCode::INTERNAL_SERVER_ERROR, "transient failure");
    }
    if take(&faults.throttle_searches) {
        let mut response = outcome(StatusCode::TOO_MANY_REQUESTS, "slow down");
        response.headers_mut().insert(header::RETRY_AFTER, 1.into());
        return response;
    }
    // A count (`_summary=count`) is no page of data: counted apart.
    let summary_count = params.iter().any(|(k, v)| k == "_summary" && v == "count");
    if summary_count {
        inner.counters.counts.fetch_add(1, Ordering::Relaxed);
    } else {
        if !is_next {
            inner.counters.searches.fetch_add(1, Ordering::Relaxed);
        }
        inner.counters.pages.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut served) = inner.counters.served.lock() {
            served.push((resource_type.to_owned(), offset));
        }
    }

    let count: usize = params
        .iter()
        .find(|(k, _)| k == "_count")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(50)
        .clamp(1, paging.max_count.unwrap_or(5000));
    let empty = Vec::new();
    let all = inner.types.get(resource_type).unwrap_or(&empty);
    let bounds = last_updated_bounds(&params);
    let mut matches: Vec<&Stored> = Vec::new();
    for stored in all {
        match matches_all(stored, &params, &bounds) {
            Ok(true) => matches.push(stored),
            Ok(false) => {}
            Err(problem) => return outcome(StatusCode::BAD_REQUEST, &problem),
        }
    }
    if summary_count {
        let body = json!({"resourceType": "Bundle", "type": "searchset", "total": matches.len()});
        return (
            [(header::CONTENT_TYPE, "application/fhir+json")],
            body.to_string(),
        )
            .into_response();
    }
    // Stored sorted by (lastUpdated, id) already: `_sort=_lastUpdated` and the default agree.
    if paging.ignore_sort {
        matches.reverse();
    }
    let page: Vec<Value> = matches
        .iter()
        .skip(offset)
        .take(count)
        .map(|s| json!({"fullUrl": format!("{}/{}", resource_type, s.id), "resource": s.json, "search": {"mode": "match"}}))
        .collect();
    let query: String = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params.iter())
        .finish();
    let mut links = vec![json!({"relation": "self", "url": format!("{resource_type}?{query}")})];
    if offset + count < matches.len() {
        let next_offset = offset + count;
        let next = match paging.style {
            PagingStyle::Offset => {
                let kept: String = url::form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(params.iter().filter(|(k, _)| k != "_offset"))
                    .append_pair("_offset", &next_offset.to_string())
                    .finish();
                format!("{}/{resource_type}?{kept}", inner.base)
            }
            PagingStyle::GetPages => {
                let id = keep(inner, kept, resource_type, &params);
                format!(
                    "{}?_getpages={id}&_getpagesoffset={next_offset}&_count={count}&_bundletype=searchset",
                    inner.base
                )
            }
            PagingStyle::Cursor => {
                let id = keep(inner, kept, resource_type, &params);
                let cursor = uuid::Uuid::new_v4().simple().to_string();
                if let Ok(mut kept) = inner.kept.lock() {
                    kept.cursors.insert(cursor.clone(), (id, next_offset));
                }
                format!("{}/{resource_type}?_cursor={cursor}", inner.base)
            }
        };
        let next = if paging.absolute_links {
            format!("{}{next}", inner.origin)
        } else {
            next
        };
        links.push(json!({"relation": "next", "url": next}));
    }
    let mut body = json!({"resourceType": "Bundle", "type": "searchset", "total": matches.len(), "link": links, "entry": page});
    if paging.omit_total
        && let Some(bundle) = body.as_object_mut()
    {
        bundle.remove("total");
    }
    (
        [(header::CONTENT_TYPE, "application/fhir+json")],
        body.to_string(),
    )
        .into_response()
}

/// The id under which a search is kept (`_getpages`, cursors): `kept` if it is one already.
fn keep(
    inner: &Inner,
    kept: Option<String>,
    resource_type: &str,
    params: &[(String, String)],
) -> String {
    kept.unwrap_or_else(|| {
        let id = uuid::Uuid::new_v4().simple().to_string();
        if let Ok(mut kept) = inner.kept.lock() {
            kept.searches
                .insert(id.clone(), (resource_type.to_owned(), params.to_vec()));
        }
        id
    })
}

/// The instant of each `_lastUpdated` parameter (after its prefix), parsed once per search rather
/// than once per stored resource: on a million resources the parse dominated every page.
fn last_updated_bounds(
    params: &[(String, String)],
) -> Vec<Option<Result<time::OffsetDateTime, String>>> {
    params
        .iter()
        .map(|(key, value)| {
            (key == "_lastUpdated").then(|| {
                let (prefix, instant) = value.split_at(value.len().min(2));
                let instant = if prefix.chars().all(|c| c.is_ascii_alphabetic()) {
                    instant
                } else {
                    value.as_str()
                };
                time::OffsetDateTime::parse(instant, &time::format_description::well_known::Rfc3339)
                    .map_err(|_| format!("invalid _lastUpdated {value}"))
            })
        })
        .collect()
}

fn matches_all(
    stored: &Stored,
    params: &[(String, String)],
    bounds: &[Option<Result<time::OffsetDateTime, String>>],
) -> Result<bool, String> {
    for (i, (key, value)) in params.iter().enumerate() {
        let ok = match key.as_str() {
            "_count" | "_offset" | "_sort" | "_elements" | "_format" | "_total" | "_summary" => {
                true
            }
            "_id" => value.split(',').any(|id| id == stored.id),
            "patient" | "subject" | "member" | "actor" => value
                .split(',')
                .map(|p| p.rsplit_once("Patient/").map_or(p, |(_, id)| id))
                .any(|p| stored.patients.iter().any(|sp| sp == p)),
            "_lastUpdated" => {
                let (prefix, _) = value.split_at(value.len().min(2));
                let op = if prefix.chars().all(|c| c.is_ascii_alphabetic()) {
                    prefix
                } else {
                    "eq"
                };
                let bound = match bounds.get(i) {
                    Some(Some(parsed)) => parsed.clone()?,
                    _ => return Err(format!("invalid _lastUpdated {value}")),
                };
                let at = stored.at;
                match op {
                    "gt" => at > bound,
                    "ge" => at >= bound,
                    "lt" => at < bound,
                    "le" => at <= bound,
                    "eq" => at == bound,
                    other => return Err(format!("unsupported prefix {other}")),
                }
            }
            name if name.starts_with('_') => return Err(format!("unsupported parameter {name}")),
            name => field_matches(&stored.json[name], value),
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

fn field_matches(field: &Value, wanted: &str) -> bool {
    match field {
        Value::String(s) => wanted.split(',').any(|w| w == s),
        Value::Array(items) => items.iter().any(|i| field_matches(i, wanted)),
        Value::Object(map) => {
            map.get("code").is_some_and(|c| field_matches(c, wanted))
                || map.get("coding").is_some_and(|c| field_matches(c, wanted))
        }
        _ => false,
    }
}
