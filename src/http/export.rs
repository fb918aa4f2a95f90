//! Kick-off: `GET|POST {base}/$export`, `{base}/Patient/$export`, `{base}/Group/{id}/$export`
//! (SPEC A5). Validates the request, resolves the patients (Group members, or every patient),
//! plans the units, stores the job and answers 202 with the status URL in `Content-Location`.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use serde_json::Value;

use super::error::ApiError;
use super::extract::PathParams;
use crate::app::AppState;
use crate::export::kickoff::{self, KickOffError, RawKickOff, is_fhir_id};
use crate::export::plan::{self, PlanError, PlanInput};
use crate::fhir::{FHIR_JSON, Instant, OperationOutcome};
use crate::job::{Job, JobState, Level, Unit, now_unix};
use crate::store::Created;
use crate::telemetry::metrics;

pub async fn system(State(app): State<AppState>, request: Request) -> Result<Response, ApiError> {
    kick_off(app, Level::System, request).await
}

pub async fn patient(State(app): State<AppState>, request: Request) -> Result<Response, ApiError> {
    kick_off(app, Level::Patient, request).await
}

pub async fn group(
    State(app): State<AppState>,
    PathParams(id): PathParams<String>,
    request: Request,
) -> Result<Response, ApiError> {
    if !is_fhir_id(&id) {
        return Err(ApiError::BadRequest(format!(
            "{id:?} is not a valid Group id"
        )));
    }
    kick_off(app, Level::Group(id), request).await
}

impl From<KickOffError> for ApiError {
    fn from(e: KickOffError) -> Self {
        ApiError::BadRequest(e.to_string())
    }
}

impl From<PlanError> for ApiError {
    fn from(e: PlanError) -> Self {
        match e {
            PlanError::Invalid(e) => e.into(),
            PlanError::Forbidden(_) => ApiError::Forbidden(e.to_string()),
        }
    }
}

async fn kick_off(app: AppState, level: Level, request: Request) -> Result<Response, ApiError> {
    let grant = app.auth.authorize(request.headers())?;
    let (parts, body) = request.into_parts();
    let is_post = parts.method == Method::POST;
    let body = if is_post {
        read_json_body(&app, &parts.headers, body).await?
    } else {
        None
    };
    let header = |name: header::HeaderName| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let now = Instant::now();
    let query = parts.uri.query().unwrap_or("");
    let kickoff = kickoff::parse(&RawKickOff {
        level: &level,
        is_post,
        query,
        accept: header(header::ACCEPT),
        prefer: header(header::HeaderName::from_static("prefer")),
        body: body.as_ref(),
        now,
    })?;
    let preference_applied = kickoff.preference_applied();

    let mut warnings = kickoff.ignored.clone();
    let patients = match &level {
        Level::System => Vec::new(),
        Level::Patient if !kickoff.patients.is_empty() => kickoff.patients.clone(),
        Level::Patient => app.exporter_patients().await?,
        Level::Group(id) => {
            if !app.auth.may_export_group(&grant.client_id, id) {
                return Err(ApiError::Forbidden(format!(
                    "client {} may not export Group/{id} (auth.clients.groups)",
                    grant.client_id
                )));
            }
            let resolved = app.group_members(id, now).await?;
            warnings.extend(resolved.warnings);
            let members = resolved.patients;
            if kickoff.patients.is_empty() {
                members
            } else {
                let members: std::collections::HashSet<String> = members.into_iter().collect();
                for p in kickoff.patients.iter().filter(|p| !members.contains(*p)) {
                    warnings.push(format!(
                        "Patient/{p} is not a member of Group/{id}; not exported"
                    ));
                }
                kickoff
                    .patients
                    .iter()
                    .filter(|p| members.contains(*p))
                    .cloned()
                    .collect()
            }
        }
    };
    let upstream_types = app.upstream_types().await;
    let can_read = |t: &str| grant.scopes.can_read(t);
    let e = &app.config.export;
    // Every Patient (listed above) needs no count; a Group or a `patient` list is set against
    // the upstream's total.
    let all_patients = match &level {
        Level::System => None,
        Level::Patient if kickoff.patients.is_empty() => Some(patients.len() as u64),
        _ if patients.is_empty() || e.scan_min_coverage > 1.0 => None,
        _ => app.patient_count().await,
    };
    let planned = plan::plan(&PlanInput {
        level: &level,
        kickoff: &kickoff,
        can_read: &can_read,
        upstream_types: upstream_types.as_deref(),
        patients: &patients,
        batch_size: e.patient_batch_size,
        supporting_types: &e.supporting_types,
        max_ids_bytes: plan::ids_room(
            e.max_search_url_bytes,
            app.upstream.base_url().len(),
            &kickoff.type_filters,
        ),
        scan: plan::scan_pays(patients.len(), all_patients, e.scan_min_coverage),
    })?;
    warnings.extend(planned.warnings);

    let public_base = app.public_base(&parts.headers);
    let path_and_query = parts.uri.path_and_query().map_or("", |pq| pq.as_str());
    let id = uuid::Uuid::new_v4().to_string();
    let job = Job {
        id: id.clone(),
        client_id: grant.client_id.clone(),
        level,
        request: format!(
            "{public_base}{}",
            path_and_query
                .strip_prefix(app.base_path.as_str())
                .unwrap_or(path_and_query)
        ),
        // Whole seconds: the bound every search carries (`_lastUpdated=le…`), and a fraction
        // there more than doubled hfs's time per page (0.92 s against 0.38 s for Observation's
        // 17 pages unbounded, 0.58 s with a whole second). Anything changed in the fraction
        // before the kick-off is in the next export since this one.
        transaction_time: now.whole_seconds().to_string(),
        since: kickoff.since.map(|i| i.to_string()),
        until: kickoff.until.map(|i| i.to_string()),
        types: planned.types,
        named_supporting: planned.named_supporting,
        elements: kickoff.elements,
        state: JobState::Running,
        created_at: now_unix(),
        completed_at: None,
        expires_at: None,
        units_total: planned.searches.len() as u32,
        units_done: 0,
        resources_written: 0,
        warnings,
        output: Vec::new(),
        error_files: Vec::new(),
        error: None,
    };
    let members_only = planned.members_only;
    let counts = app
        .exporter
        .pager
        .count_all(
            &planned.searches,
            job.since.as_deref().map(|s| ("gt", s)),
            &job.transaction_time,
        )
        .await;
    let mut searches: Vec<_> = planned.searches.into_iter().zip(counts).collect();
    plan::largest_first(&mut searches);
    if !members_only && searches.iter().all(|(_, count)| count.is_some()) {
        metrics::resources_expected(searches.iter().filter_map(|(_, c)| *c).sum());
    }
    let units: Vec<Unit> = searches
        .into_iter()
        .enumerate()
        .map(|(i, ((t, search), expected))| Unit {
            members_only,
            expected,
            ..Unit::new(&id, i as u32, &t, search)
        })
        .collect();
    let members = if members_only { &patients[..] } else { &[] };
    // Stored and handed to the workers; a job with no units is finalised by the exporter too.
    match app
        .exporter
        .submit(&job, &units, members, e.max_active_jobs_per_client)
        .await?
    {
        Created::Yes => {}
        Created::TooManyActive => {
            return Err(ApiError::TooManyRequests {
                retry_after: 30,
                message: format!(
                    "client {} already has {} running export(s), the most it may have \
                     (export.max_active_jobs_per_client); wait for one to finish, or cancel one \
                     with DELETE on its status URL",
                    grant.client_id, e.max_active_jobs_per_client
                ),
            });
        }
    }
    tracing::info!(job = %id, client = %grant.client_id, level = ?job.level, units = job.units_total, scans = members_only, "export started");

    let status_url = format!("{public_base}/$export-status/{id}");
    let outcome = OperationOutcome::information(format!("export {id} accepted; poll {status_url}"));
    let mut response = (StatusCode::ACCEPTED, outcome.to_json().to_string()).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    headers.insert(
        header::CONTENT_LOCATION,
        HeaderValue::from_str(&status_url).map_err(|e| ApiError::Internal(e.to_string()))?,
    );
    headers.insert(
        header::HeaderName::from_static("preference-applied"),
        HeaderValue::from_static(preference_applied),
    );
    Ok(response)
}

/// Reads a POST kick-off body: JSON (`application/fhir+json` or `application/json`), bounded.
async fn read_json_body(
    app: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Option<Value>, ApiError> {
    let limit = app.config.server.max_body_bytes;
    let bytes = http_body_util::Limited::new(body, limit)
        .collect()
        .await
        .map_err(|_| ApiError::PayloadTooLarge(format!("the kick-off body exceeds {limit} bytes")))?
        .to_bytes();
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media = content_type.split(';').next().unwrap_or("").trim();
    if !matches!(media, "application/fhir+json" | "application/json") {
        return Err(ApiError::BadRequest(format!(
            "Content-Type {content_type:?} is not supported; send a FHIR Parameters resource as application/fhir+json"
        )));
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| ApiError::BadRequest(format!("the kick-off body is not valid JSON: {e}")))
}
