//! File download: `GET {base}/$export-file/{id}/{name}` (SPEC A9). The token's client must own the
//! job and its scopes must cover the file's resource type. Served as `application/fhir+ndjson`,
//! with HTTP Range, and gzip-compressed when the client accepts it (a ranged request is served
//! uncompressed, so byte offsets mean what the client thinks).

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use tower::ServiceExt;
use tower_http::compression::CompressionLayer;
use tower_http::services::ServeFile;

use super::error::ApiError;
use super::status::owned_job;
use crate::app::AppState;
use crate::job::JobState;

pub const NDJSON: &str = "application/fhir+ndjson";

pub async fn get(
    State(app): State<AppState>,
    Path((id, name)): Path<(String, String)>,
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
    let path = app.storage.path(&job.id, &file.name)?;
    if !tokio::fs::try_exists(&path).await.unwrap_or(false) {
        return Err(not_found());
    }
    if request.headers().contains_key(header::RANGE) {
        request.headers_mut().remove(header::ACCEPT_ENCODING);
    }
    let service = tower::ServiceBuilder::new()
        .layer(CompressionLayer::new().gzip(true))
        .service(ServeFile::new_with_mime(
            &path,
            &NDJSON
                .parse()
                .map_err(|_| ApiError::Internal("mime".into()))?,
        ));
    let response = service
        .oneshot(request)
        .await
        .map_err(|e| ApiError::Internal(format!("cannot serve {name}: {e}")))?;
    let mut response = response.map(Body::new).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
    Ok(response)
}
