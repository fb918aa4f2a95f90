//! Status and cancel: `GET|DELETE {base}/$export-status/{id}` (SPEC A6, A7, A8).
//!
//! A job belongs to the client that started it; any other client gets 404, as for a job that does
//! not exist. The first poll is always 202 (BDT); polling faster than half the `Retry-After` told
//! answers 429. A completed job answers its manifest (`application/json`, `Expires`); a failed one
//! 500 with an OperationOutcome saying why (A6.5).

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::error::ApiError;
use super::extract::PathParams;
use crate::app::AppState;
use crate::auth::Grant;
use crate::fhir::{FHIR_JSON, OperationOutcome};
use crate::job::{Job, JobState, Progress, now_millis};

/// The job, if it exists and belongs to the token's client.
pub async fn owned_job(app: &AppState, grant: &Grant, id: &str) -> Result<Job, ApiError> {
    let not_found = || ApiError::NotFound(format!("no export job {id}"));
    if id.len() > 64 {
        return Err(not_found());
    }
    match app.store.get_job(id).await? {
        Some(job) if job.client_id == grant.client_id => Ok(job),
        _ => Err(not_found()),
    }
}

pub async fn get(
    State(app): State<AppState>,
    PathParams(id): PathParams<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let grant = app.auth.authorize(&headers)?;
    let job = owned_job(&app, &grant, &id).await?;
    if let Some(t) = job.types.iter().find(|t| !grant.scopes.can_read(t)) {
        return Err(ApiError::Forbidden(format!(
            "the access token's scopes no longer cover {t}"
        )));
    }
    let retry_after = app.config.export.poll_retry_after_secs;
    let min_interval_ms = min_poll_interval_ms(retry_after);
    let now_ms = now_millis();
    if !app
        .store
        .record_poll(&job.id, now_ms, min_interval_ms)
        .await?
    {
        return Err(ApiError::TooManyRequests {
            retry_after,
            message: format!("polling too fast: wait {retry_after} s between status requests"),
        });
    }
    let first_poll = app.store.first_poll(&job.id).await?;

    match job.state {
        JobState::Running => in_progress(&app, &job, retry_after).await,
        // Soon, but never sooner than the rate limit allows.
        _ if first_poll => in_progress(&app, &job, first_poll_retry_after(retry_after)).await,
        JobState::Completed => manifest_response(&app, &headers, &job).await,
        JobState::Failed => Err(ApiError::Internal(format!(
            "export {} failed: {}",
            job.id,
            job.error.as_deref().unwrap_or("unknown error")
        ))),
    }
}

/// Polls closer together than this answer 429: half the `Retry-After` told.
fn min_poll_interval_ms(retry_after: u64) -> u64 {
    retry_after.saturating_mul(1000) / 2
}

/// The `Retry-After` of the first poll of a job that is already done (BDT wants a 202 first):
/// 1 s, or the rate limit's interval rounded up when that is longer, so that a client honouring
/// it is never told 429.
fn first_poll_retry_after(retry_after: u64) -> u64 {
    min_poll_interval_ms(retry_after).div_ceil(1000).max(1)
}

async fn in_progress(app: &AppState, job: &Job, retry_after: u64) -> Result<Response, ApiError> {
    let units = app.store.units(&job.id).await?;
    let progress = Progress::of(&units).describe();
    let mut response = StatusCode::ACCEPTED.into_response();
    let headers = response.headers_mut();
    headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    if let Ok(value) = HeaderValue::from_str(&progress) {
        headers.insert("x-progress", value);
    }
    Ok(response)
}

/// The manifest. Files are downloaded through the proxy with a bearer token, or, with
/// `storage.presigned_urls`, straight from object storage through presigned URLs that expire no
/// later than an access token would (SPEC A9.2); each request for the manifest signs them anew
/// (A9.8).
async fn manifest_response(
    app: &AppState,
    headers: &HeaderMap,
    job: &Job,
) -> Result<Response, ApiError> {
    let base = app.public_base(headers);
    let presigned = app.storage.presigned_urls();
    let lifetime = app.config.auth.token_lifetime_secs;
    let expires_in = match job.expires_at {
        Some(at) => lifetime.min(at.saturating_sub(crate::job::now_unix())),
        None => lifetime,
    };
    let mut items = Vec::new();
    for f in job.output.iter().chain(&job.error_files) {
        let url = match presigned {
            true => app
                .storage
                .signed_url(&job.id, &f.name, std::time::Duration::from_secs(expires_in))
                .await?
                .map(String::from),
            false => None,
        };
        let url = url.unwrap_or_else(|| format!("{base}/$export-file/{}/{}", job.id, f.name));
        items.push(json!({
            "type": f.resource_type,
            "url": url,
            "count": f.count,
        }));
    }
    let errors = items.split_off(job.output.len());
    let manifest = json!({
        "transactionTime": job.transaction_time,
        "request": job.request,
        // Files are behind a token only when the proxy asks for one (A9.2).
        "requiresAccessToken": !presigned && app.auth.enabled(),
        "output": items,
        "deleted": [],
        "error": errors,
    });
    let mut response = (StatusCode::OK, manifest.to_string()).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    // Presigned URLs expire first: the manifest is stale then, and a new request re-signs.
    let expires_at = match presigned {
        true => Some(crate::job::now_unix() + expires_in),
        false => job.expires_at,
    };
    if let Some(expires) = expires_at.and_then(http_date)
        && let Ok(value) = HeaderValue::from_str(&expires)
    {
        h.insert(header::EXPIRES, value);
    }
    Ok(response)
}

/// An HTTP-date (RFC 9110 §5.6.7) for Unix seconds; `None` past the year 9999, which it cannot
/// write (httpdate, as the fast path's `Date` headers).
pub fn http_date(unix: u64) -> Option<String> {
    const YEAR_10000: u64 = 253_402_300_800;
    if unix >= YEAR_10000 {
        return None;
    }
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix);
    Some(httpdate::fmt_http_date(at))
}

pub async fn delete(
    State(app): State<AppState>,
    PathParams(id): PathParams<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let grant = app.auth.authorize(&headers)?;
    let job = owned_job(&app, &grant, &id).await?;
    crate::export::cancel::delete_job(&*app.store, &app.storage, &job).await?;
    tracing::info!(job = %job.id, "export deleted");
    let outcome = OperationOutcome::information(format!("export {} deleted", job.id));
    let mut response = (StatusCode::ACCEPTED, outcome.to_json().to_string()).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    Ok(response)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_first_poll_is_never_told_to_come_back_before_the_rate_limit_allows() {
        for retry_after in 0..=120 {
            let first = super::first_poll_retry_after(retry_after);
            assert!(first >= 1);
            assert!(
                first * 1000 >= super::min_poll_interval_ms(retry_after),
                "{retry_after}"
            );
            assert!(first <= retry_after.max(1), "{retry_after}");
        }
        assert_eq!(super::first_poll_retry_after(2), 1);
        assert_eq!(super::first_poll_retry_after(5), 3);
    }

    #[test]
    fn http_dates_are_imf_fixdate() {
        assert_eq!(
            super::http_date(784_111_777).unwrap(),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
        assert_eq!(
            super::http_date(253_402_300_799).unwrap(),
            "Fri, 31 Dec 9999 23:59:59 GMT"
        );
        assert_eq!(super::http_date(253_402_300_800), None);
        assert_eq!(super::http_date(u64::MAX), None);
    }
}
