//! File download: `GET {base}/$export-file/{id}/{name}` (SPEC A9). The token's client must own the
//! job and its scopes must cover the file's resource type. Served as `application/fhir+ndjson`,
//! with HTTP Range, and gzip-compressed when the client accepts it (a ranged request is served
//! uncompressed, so byte offsets mean what the client thinks).
//!
//! Local files are served by `tower-http`'s `ServeFile`; objects are streamed from object storage
//! through the proxy (a single byte range is passed on to the store as a ranged GET), so the same
//! token and scope checks hold whichever storage is configured. Presigned URLs, when enabled,
//! bypass this endpoint altogether (see `status`).

use std::convert::Infallible;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tower::ServiceExt;
use tower_http::compression::CompressionLayer;
use tower_http::services::ServeFile;

use super::error::ApiError;
use super::extract::PathParams;
use super::status::owned_job;
use crate::app::AppState;
use crate::job::JobState;

pub use crate::storage::NDJSON;

pub async fn get(
    State(app): State<AppState>,
    PathParams((id, name)): PathParams<(String, String)>,
    mut request: Request,
) -> Result<Response, ApiError> {
    let grant = app.auth.authorize(request.headers())?;
    let job = owned_job(&app, &grant, &id).await?;
    let not_found = || ApiError::NotFound(format!("no file {name} in export {id}"));
    if job.state != JobState::Completed {
        return Err(not_found());
    }
    let file = job
        .output
        .iter()
        .chain(job.error_files.iter())
        .find(|f| f.name == name)
        .ok_or_else(not_found)?;
    if file.resource_type != "OperationOutcome" && !grant.scopes.can_read(&file.resource_type) {
        return Err(ApiError::Forbidden(format!(
            "the access token's scopes do not allow reading {}",
            file.resource_type
        )));
    }
    if request.headers().contains_key(header::RANGE) {
        request.headers_mut().remove(header::ACCEPT_ENCODING);
    }
    let mut response = match app.storage.local_path(&job.id, &file.name)? {
        Some(path) => {
            if !tokio::fs::try_exists(&path).await.unwrap_or(false) {
                return Err(not_found());
            }
            let mime = NDJSON
                .parse()
                .map_err(|_| ApiError::Internal("mime".into()))?;
            let served = compressed(ServeFile::new_with_mime(&path, &mime), request).await?;
            if served.status() == StatusCode::RANGE_NOT_SATISFIABLE {
                let size = served
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("bytes */"))
                    .and_then(|v| v.parse().ok());
                return Err(ApiError::RangeNotSatisfiable { size });
            }
            served
        }
        None => {
            let size = app
                .storage
                .object_size(&job.id, &file.name)
                .await?
                .ok_or_else(not_found)?;
            match requested_range(request.headers(), size) {
                Range::Whole => {
                    let stream = app.storage.object_stream(&job.id, &file.name, None).await?;
                    let mut whole = Response::new(Body::from_stream(stream));
                    whole
                        .headers_mut()
                        .insert(header::CONTENT_LENGTH, HeaderValue::from(size));
                    let mut whole = Some(whole);
                    let service = tower::service_fn(move |_: Request| {
                        std::future::ready(Ok::<_, Infallible>(whole.take().unwrap_or_default()))
                    });
                    compressed(service, request).await?
                }
                Range::Part(range) => {
                    let (first, last) = (range.start, range.end - 1);
                    let stream = app
                        .storage
                        .object_stream(&job.id, &file.name, Some(range))
                        .await?;
                    let mut part = Response::new(Body::from_stream(stream));
                    *part.status_mut() = StatusCode::PARTIAL_CONTENT;
                    let h = part.headers_mut();
                    h.insert(header::CONTENT_LENGTH, HeaderValue::from(last - first + 1));
                    if let Ok(value) =
                        HeaderValue::from_str(&format!("bytes {first}-{last}/{size}"))
                    {
                        h.insert(header::CONTENT_RANGE, value);
                    }
                    part
                }
                Range::Unsatisfiable => {
                    return Err(ApiError::RangeNotSatisfiable { size: Some(size) });
                }
            }
        }
    };
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    Ok(response)
}

/// Runs `service` behind gzip compression (applied when the request accepts it).
async fn compressed<S, B>(service: S, request: Request) -> Result<Response, ApiError>
where
    S: tower::Service<Request, Response = Response<B>> + Send,
    S::Error: std::fmt::Display,
    S::Future: Send,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError> + Send + Sync,
{
    let service = tower::ServiceBuilder::new()
        .layer(CompressionLayer::new().gzip(true))
        .service(service);
    let response = service
        .oneshot(request)
        .await
        .map_err(|e| ApiError::Internal(format!("cannot serve the file: {e}")))?;
    Ok(response.map(Body::new).into_response())
}

/// What a `Range` header asks of an object of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
enum Range {
    Whole,
    /// End exclusive.
    Part(std::ops::Range<u64>),
    Unsatisfiable,
}

/// One byte range (`bytes=a-b`, `bytes=a-`, `bytes=-n`; RFC 9110 §14.1.2). Several ranges, other
/// units or a malformed header are answered with the whole file, as the RFC allows.
fn requested_range(headers: &HeaderMap, size: u64) -> Range {
    let Some(spec) = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("bytes="))
    else {
        return Range::Whole;
    };
    if spec.contains(',') {
        return Range::Whole;
    }
    let Some((first, last)) = spec.split_once('-') else {
        return Range::Whole;
    };
    let (first, last) = (first.trim(), last.trim());
    let parsed = match (first.parse::<u64>(), last.parse::<u64>()) {
        (Ok(a), Ok(b)) if a <= b => Some((a, b.min(size.saturating_sub(1)))),
        (Ok(a), Err(_)) if last.is_empty() => Some((a, size.saturating_sub(1))),
        (Err(_), Ok(n)) if first.is_empty() => {
            if n == 0 {
                return Range::Unsatisfiable;
            }
            Some((size.saturating_sub(n), size.saturating_sub(1)))
        }
        _ => None,
    };
    match parsed {
        None => Range::Whole,
        Some((a, _)) if a >= size => Range::Unsatisfiable,
        Some((a, b)) => Range::Part(a..b + 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(value: &str, size: u64) -> Range {
        let mut headers = HeaderMap::new();
        headers.insert(header::RANGE, HeaderValue::from_str(value).unwrap());
        requested_range(&headers, size)
    }

    #[test]
    fn byte_ranges_follow_rfc_9110() {
        assert_eq!(range("bytes=0-9", 100), Range::Part(0..10));
        assert_eq!(range("bytes=90-200", 100), Range::Part(90..100));
        assert_eq!(range("bytes=95-", 100), Range::Part(95..100));
        assert_eq!(range("bytes=-10", 100), Range::Part(90..100));
        assert_eq!(range("bytes=-500", 100), Range::Part(0..100));
        assert_eq!(range("bytes=100-", 100), Range::Unsatisfiable);
        assert_eq!(range("bytes=-0", 100), Range::Unsatisfiable);
        assert_eq!(range("bytes=0-1,5-6", 100), Range::Whole);
        assert_eq!(range("items=0-1", 100), Range::Whole);
        assert_eq!(range("bytes=9-2", 100), Range::Whole);
        assert_eq!(requested_range(&HeaderMap::new(), 100), Range::Whole);
    }
}
