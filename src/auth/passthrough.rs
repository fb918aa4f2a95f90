//! Which passthrough requests a token allows, when `auth.passthrough = true` (SPEC A1.5: the scopes
//! limit what a client can read). The proxy grants read scopes only (SPEC A4.20), so a protected
//! passthrough is read-only: `GET`/`HEAD`, and `POST` to `_search`.
//!
//! A token whose scopes cover every type (`system/*.read`) may read anything. A narrower token may
//! only make requests whose results are resources of the types it covers, and the proxy must be
//! able to tell that from the request alone (DESIGN "One gate": a rule that cannot be checked is
//! refused, not guessed):
//! - reads, version reads, histories and searches of one type (`Patient/1`, `Patient?name=x`,
//!   `Patient/1/_history`, `POST Patient/_search`), with read on that type;
//! - search parameters from an allow-list of result-neutral ones (`_id`, `_count`, `_sort`,
//!   `_elements`, ...) and plain parameters of the type, with modifiers but without chains.
//!
//! Refused: `_include`, `_revinclude`, `_has`, chained parameters (`subject.name=`), `_contained`,
//! `_filter`, `_query` and other `_` parameters not on the list, operations (`$everything`),
//! compartment searches (`Patient/1/Observation`), system-level requests, and paths whose
//! segments decode to `.`, `..` or contain `/` or `\`.

use std::borrow::Cow;

use axum::http::Method;
use percent_encoding::percent_decode_str;

use super::{AuthError, Grant};
use crate::fhir::resource_types::{is_fhir_id, is_resource_type};

/// Search parameters whose results are still resources of the searched type only.
const NEUTRAL_PARAMETERS: &[&str] = &[
    "_id",
    "_lastUpdated",
    "_tag",
    "_profile",
    "_security",
    "_source",
    "_text",
    "_content",
    "_language",
    "_count",
    "_offset",
    "_sort",
    "_summary",
    "_elements",
    "_total",
    "_format",
    "_pretty",
    // History.
    "_since",
    "_at",
];

/// Whether this request needs no token: reads of the CapabilityStatement (`/metadata`, in any
/// format or `mode`), which is public (SPEC A2) and which the proxy answers itself in JSON.
pub fn is_public(method: &Method, path: &str) -> bool {
    (*method == Method::GET || *method == Method::HEAD) && path == "/metadata"
}

/// Whether `grant` may make this request. `path` is the raw request path below the FHIR base
/// (`/Patient/123`); `parameters` are the query's and, for `POST _search`, the form body's.
pub fn check<'a>(
    grant: &Grant,
    method: &Method,
    path: &str,
    parameters: impl IntoIterator<Item = (Cow<'a, str>, Cow<'a, str>)>,
) -> Result<(), AuthError> {
    let segments = decode_segments(path)?;
    let is_search_post =
        *method == Method::POST && segments.last().map(|s| &**s) == Some("_search");
    if !(*method == Method::GET || *method == Method::HEAD || is_search_post) {
        return Err(AuthError::Forbidden(format!(
            "{method} requests (the proxy grants read access only)"
        )));
    }
    if grant.scopes.can_read_all() {
        return Ok(());
    }
    let resource_type = single_type(&segments).ok_or_else(|| {
        AuthError::Unchecked(
            "requests other than reads, histories and searches of one resource type".into(),
        )
    })?;
    grant.require_read([resource_type])?;
    for (name, value) in parameters {
        check_parameter(&name, &value)?;
    }
    Ok(())
}

/// The path's segments, percent-decoded; a trailing `/` is ignored. Segments the upstream could
/// read as path structure are refused.
fn decode_segments(path: &str) -> Result<Vec<Cow<'_, str>>, AuthError> {
    let path = path.strip_prefix('/').unwrap_or(path);
    let path = path.strip_suffix('/').unwrap_or(path);
    if path.is_empty() {
        return Ok(Vec::new());
    }
    path.split('/')
        .map(|raw| {
            let segment = percent_decode_str(raw)
                .decode_utf8()
                .map_err(|_| unchecked_path(raw))?;
            let tricky = segment.is_empty()
                || segment == "."
                || segment == ".."
                || segment.contains(['/', '\\'])
                || segment.chars().any(char::is_control);
            if tricky {
                Err(unchecked_path(raw))
            } else {
                Ok(segment)
            }
        })
        .collect()
}

fn unchecked_path(segment: &str) -> AuthError {
    AuthError::Unchecked(format!("the path segment {segment:?}"))
}

/// The one resource type whose resources the request returns, if the path's shape tells.
fn single_type<'a>(segments: &'a [Cow<'_, str>]) -> Option<&'a str> {
    let first = segments.first().filter(|s| is_resource_type(s))?;
    let shape: Vec<&str> = segments[1..].iter().map(|s| &**s).collect();
    let ok = match shape.as_slice() {
        [] | ["_search"] | ["_history"] => true,
        [id] | [id, "_history"] => is_fhir_id(id),
        [id, "_history", version] => is_fhir_id(id) && is_fhir_id(version),
        _ => false,
    };
    ok.then_some(&**first)
}

/// A search parameter a type-limited token may use.
fn check_parameter(name: &str, value: &str) -> Result<(), AuthError> {
    // `code:text=` and `subject:Patient=` are modifiers; `subject.name=` and
    // `subject:Patient.name=` are chains into other types.
    let base = name.split(':').next().unwrap_or(name);
    let refused = if name.contains('.') {
        true
    } else if base.starts_with('_') {
        !NEUTRAL_PARAMETERS.contains(&base)
    } else {
        base.is_empty()
    };
    if refused {
        let shown: String = name.chars().take(64).collect();
        return Err(AuthError::Unchecked(format!(
            "the search parameter {shown:?}{}",
            if value.is_empty() {
                ""
            } else {
                " (with any value)"
            }
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Scopes;

    fn grant(scopes: &str) -> Grant {
        Grant {
            client_id: "c".into(),
            scopes: Scopes::parse(scopes).unwrap(),
        }
    }

    fn query(query: &str) -> Vec<(Cow<'_, str>, Cow<'_, str>)> {
        url::form_urlencoded::parse(query.as_bytes()).collect()
    }

    fn allowed(grant: &Grant, method: Method, target: &str) -> bool {
        let (path, q) = target.split_once('?').unwrap_or((target, ""));
        check(grant, &method, path, query(q)).is_ok()
    }

    #[test]
    fn reads_of_a_type_need_read_on_that_type() {
        let patients = grant("system/Patient.read");
        for target in [
            "/Patient/1",
            "/Patient",
            "/Patient/",
            "/Patient?name=x&_count=10&_sort=-_lastUpdated",
            "/Patient/1/_history",
            "/Patient/1/_history/2",
            "/Patient/_history?_since=2024-01-01",
            "/%50atient/1",
            "/Patient?general-practitioner:Practitioner=1&name:exact=A",
        ] {
            assert!(allowed(&patients, Method::GET, target), "{target}");
        }
        assert!(allowed(&patients, Method::HEAD, "/Patient"));
        assert!(allowed(&patients, Method::POST, "/Patient/_search"));
        assert!(!allowed(&patients, Method::GET, "/Observation"));
        assert!(
            !allowed(&patients, Method::GET, "/"),
            "system search needs *"
        );
        assert!(allowed(&grant("system/*.rs"), Method::GET, "/_history"));
    }

    #[test]
    fn requests_whose_results_cannot_be_checked_need_every_type() {
        let patients = grant("system/Patient.read");
        let all = grant("system/*.read");
        for target in [
            "/Patient?_revinclude=Observation:patient",
            "/Patient?_include=Patient:organization",
            "/Patient?_include:iterate=Patient:link",
            "/Patient?_has:Observation:patient:code=1234",
            "/Patient?organization.name=Acme",
            "/Patient?general-practitioner:Practitioner.name=x",
            "/Patient?_contained=true",
            "/Patient?_filter=name eq x",
            "/Patient?_query=everything",
            "/Patient?_list=5",
            "/Patient?_type=Observation",
            "/Patient/x/$everything",
            "/Patient/$match",
            "/Patient/x/Observation",
            "/Patient/x/*",
            "/Patient/..%2FObservation",
            "/Patient/%2e%2e/Observation",
            "/Patient/a%2fb",
            "/Patient//1",
            "/Patient/1;x=2",
            "/$export",
            "/_history",
            "/metadata",
        ] {
            assert!(!allowed(&patients, Method::GET, target), "{target}");
            if !target.contains("%2") && !target.contains("//") {
                assert!(allowed(&all, Method::GET, target), "{target}");
            }
        }
    }

    #[test]
    fn writes_are_never_allowed() {
        let all = grant("system/*.read");
        for method in [
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ] {
            assert!(!allowed(&all, method.clone(), "/Patient/1"), "{method}");
        }
        assert!(!allowed(&all, Method::POST, "/Patient"));
    }

    #[test]
    fn a_narrow_grant_refuses_path_tricks_whatever_it_covers() {
        let all = grant("system/*.read");
        for target in ["/Patient/%2e%2e", "/Patient/..%2FObservation", "/a//b"] {
            assert!(!allowed(&all, Method::GET, target), "{target}");
        }
    }
}
